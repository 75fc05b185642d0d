"""Serve entry point for `ray job submit`.

    ray job submit --working-dir . -- python jobs/serve.py --config configs/demo/serve.yaml --detach

`--detach` leaves the application deployed on the cluster when the job ends; without it the job keeps
the endpoint up until it is stopped.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not pip-installed

from drivedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
