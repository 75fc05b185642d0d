"""What a generation job tells MLflow: one run per dataset (a resumed dataset logs into the run that
started it), tagged with the model version it sampled, the summary of every execution as
metrics and JSON, and a per-scenario preview grid of the finished dataset (labelled frames with their boxes drawn)."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from drivedit import storage
from drivedit.generate import dataset

EMBEDDED_TRACKING_DIR = "runs/generate"
PREVIEW_PER_SCENARIO = 8


def start_tracking(job, model, spec_hash: str):
    """Start (or reopen) the dataset's MLflow run; None when tracking is off."""
    if not job.tracking.enabled:
        return None
    from drivedit import tracking

    uri = job.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        tracking.embedded_tracking_uri(EMBEDDED_TRACKING_DIR)
    tags = {"drivedit.job": "generate", "drivedit.model_ref": job.model.ref,
            "drivedit.model_version": model.version, "drivedit.model_digest": model.digest,
            "drivedit.spec_hash": spec_hash, "drivedit.output": job.output.uri}
    # the run id lives beside the dataset, so resuming a dataset logs into the run that started it
    return tracking.start_run(uri, job.tracking.experiment, f"generate-{spec_hash[:8]}",
                              storage_dir=job.output.uri, params=tracking.config_params(job.model_dump(mode="json")),
                              tags=tags)


def log_summary(run, summary: dict) -> None:
    """Metrics at step k for the k-th execution of this dataset's job, the summary JSON, and (once the
    dataset is complete) the preview grid."""
    metrics = {"images_written": summary["images_written"], "images_per_s": summary["images_per_s"],
               "seconds": summary["seconds"], "shards_written": summary["shards_written"],
               "shards_skipped": summary["shards_skipped"]}
    metrics.update({f"count.{s}": c for s, c in summary["per_scenario"].items()})
    step = len(run.client.get_metric_history(run.run_id, "images_written"))
    run.log_metrics(metrics, step=step)
    run.log_dict(summary, f"generate/summary-{step}.json")
    if summary["complete"] and summary["images_written"]:
        with tempfile.TemporaryDirectory() as tmp:
            grid = preview_grid(summary["output"], Path(tmp) / "preview.png")
            if grid is not None:
                run.log_artifact(grid, "generate")


def preview_grid(uri: str, path: Path) -> Path | None:
    """A grid with the first images of each scenario, one row per scenario, from manifest.parquet; labelled items
    (layouts, transfer) with their boxes drawn (objects green, ignore regions magenta)."""
    import json

    import pyarrow.parquet as pq
    from PIL import Image

    from drivedit.generate.grid import draw_boxes, save_grid

    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, dataset.MANIFEST_FILE))),
                          columns=["scenario", "name", "labels"]).to_pydict()
    rows: dict[str, list[tuple[str, str | None]]] = {}
    for scenario, name, labels in zip(table["scenario"], table["name"], table["labels"]):
        picked = rows.setdefault(scenario, [])
        if len(picked) < PREVIEW_PER_SCENARIO:
            picked.append((name, labels))
    if not rows:
        return None
    width = max(len(v) for v in rows.values())
    tiles = []
    for items in rows.values():
        images = []
        for name, labels in items:
            image = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(uri, dataset.IMAGES_DIR, name))))
                               .convert("RGB"))
            images.append(draw_boxes(image, json.loads(labels)) if labels else image)
        blank = np.full_like(images[0], 255)
        tiles += images + [blank] * (width - len(images))  # ragged rows padded white
    return save_grid(np.stack(tiles), path, nrow=width, labels=list(rows))
