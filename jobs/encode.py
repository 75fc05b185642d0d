"""Encode entry point for `ray job submit`.

    ray job submit --working-dir . -- python jobs/encode.py --config configs/demo/encode.yaml \
        --data.input s3://bucket/bdd100k --data.output s3://bucket/shards/bdd100k-256 --scaling.use_gpu true
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not pip-installed

import drivedit.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(drivedit.cli.main(["encode", *sys.argv[1:]]))
