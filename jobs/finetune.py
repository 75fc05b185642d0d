"""Fine-tuning entry point for `ray job submit`.

    ray job submit --working-dir . -- python jobs/finetune.py --config configs/demo/finetune.yaml

Any config field can be overridden: `--optim.total_steps 500 --scaling.num_workers 8`. Without a
cluster (plain `python jobs/finetune.py ...`) the job starts a local Ray.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not pip-installed

from drivedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
