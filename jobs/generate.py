"""Generate entry point for `ray job submit`.

    ray job submit --working-dir . -- python jobs/generate.py --config configs/demo/generate.yaml \
        --output.uri s3://bucket/synthetic/rain-snow-night --scaling.use_gpu true
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not pip-installed

import drivedit.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(drivedit.cli.main(["generate", *sys.argv[1:]]))
