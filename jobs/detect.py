"""Detection entry point for `ray job submit`.

    ray job submit --working-dir . -- python jobs/detect.py --config configs/demo/detect.yaml

Any config field can be overridden: `--optim.total_steps 500 --scaling.num_workers 4`; `--eval-only
--model.ref runs/detect/demo/detector --data.val DIR` scores an existing detector. Without a cluster
(plain `python jobs/detect.py ...`) the job starts a local Ray.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not pip-installed

from drivedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["detect", *sys.argv[1:]]))
