"""Sampling (shared by generate and serve) and the batch generation job."""
