"""The sampling endpoint (Ray Serve + FastAPI): see drivedit/serve/app.py."""
