"""Run a detector over a folder's frames and write what scoring produces: `gt.json` (COCO instances at
the scored image size), `predictions.json` (COCO results), `metrics.json`, `per_scenario.csv` and
`pr_curve.png`. Used by the training job's validation and by `drivedit detect --eval-only`."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from drivedit.detect.dataset import FrameStore, to_batch
from drivedit.detect.detector import run_detector
from drivedit.detect.evaluate import (GroundTruthImage, coco_ground_truth, coco_results, evaluate, pr_figure,
                                      scenario_table)

SCORE_FILES = ("gt.json", "predictions.json", "metrics.json", "per_scenario.csv", "pr_curve.png")


@torch.no_grad()
def predict(detector, spec: dict, store: FrameStore, batch_size: int, device: torch.device,
            autocast=contextlib.nullcontext) -> tuple[dict, list[dict]]:
    """(COCO ground truth, COCO detections) of every decodable frame in `store`; corrupt images are skipped
    and listed in `store.report`."""
    was_training = detector.training
    detector.eval()
    images, results = [], []
    kept = [(i, item) for i in range(len(store.frames)) if (item := store.get(i)) is not None]
    for start in range(0, len(kept), batch_size):
        chunk = kept[start:start + batch_size]
        x, _ = to_batch([item for _, item in chunk])  # (n, 3, S, S)
        scenarios = [store.frames[i].scenario for i, _ in chunk]
        with autocast():
            out = run_detector(detector, spec, x.to(device), scenarios)
        for (i, (img, boxes, labels, ignore, ignore_labels)), det in zip(chunk, out):
            f = store.frames[i]
            images.append(GroundTruthImage(f.name, f.scenario, img.shape[1], img.shape[0], boxes, labels,
                                           ignore, ignore_labels))
            results += coco_results(len(images), det["boxes"].float().cpu().numpy(), det["scores"].float().cpu().numpy(),
                                    det["labels"].cpu().numpy())
    detector.train(was_training)
    return coco_ground_truth(images, spec["categories"]), results


def score(detector, spec: dict, store: FrameStore, batch_size: int, device: torch.device, reference: int,
          out_dir: Path, autocast=contextlib.nullcontext) -> dict:
    """Predict, evaluate and write the score files to the local `out_dir`; returns the metrics."""
    gt, results = predict(detector, spec, store, batch_size, device, autocast)
    if not any(a["iscrowd"] == 0 for a in gt["annotations"]):  # ignore regions are no boxes to find
        raise ValueError("the validation frames hold no box of the configured categories (or every image was "
                         "corrupt): there is nothing to score")
    metrics = evaluate(gt, results, spec["image_size"], reference)
    metrics["skipped"] = store.report.to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gt.json").write_text(json.dumps(gt))
    (out_dir / "predictions.json").write_text(json.dumps(results))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out_dir / "per_scenario.csv").write_text(scenario_table(metrics))
    pr_figure(metrics, out_dir / "pr_curve.png")
    return metrics


def headline(metrics: dict, prefix: str = "val") -> dict[str, float]:
    """Flat numbers for MLflow: overall, per category and per scenario (None left out)."""
    out = {f"{prefix}/{k}": metrics[k] for k in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
           if metrics.get(k) is not None}
    for name, r in metrics["per_category"].items():
        if r["AP50"] is not None:
            out[f"{prefix}/AP50/{name.replace(' ', '_')}"] = r["AP50"]
    for name, r in metrics["per_scenario"].items():
        if r["AP50"] is not None:
            out[f"{prefix}/AP50/scenario/{name.replace(' ', '_')}"] = r["AP50"]
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}
