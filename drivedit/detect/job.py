"""`drivedit detect`: train a detector with Ray Train and score it, or score an existing one (--eval-only).

Training, as `drivedit finetune` does it:
1. `preflight.check` validates the config and reads every label file, listing all problems (an empty
   training set, a validation set without boxes, a missing weights file, a resumed run built
   differently) before Ray starts anything; kept/dropped box counts are printed.
2. The MLflow run is started, or reopened from `mlflow_run.json` in the run directory.
3. A `TorchTrainer` runs `loop.train_loop_per_worker` with `RunConfig(name, storage_path)`: rerunning
   with the same `run.name` resumes from the last checkpoint; `FailureConfig(max_failures)` restarts
   lost workers from it.
4. The final checkpoint carries the detector and its validation scores; they are copied to
   `<run dir>/detector` and `<run dir>/scores`, logged to MLflow (the per-scenario table and the PR
   figure included), the detector is registered as a model version, and `<run dir>/result.json`
   records it all. Rerunning a finished job returns that record.

`--eval-only --model.ref REF --data.val DIR` loads a saved detector (a run's `detector` folder or
`models:/NAME/VERSION`), scores it on DIR in this process and writes the same score files to
`<run dir>/eval/<folder name>`, with its own MLflow run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from drivedit import storage, tracking
from drivedit.config.base import ConfigError, field_help_lines, read_raw_config
from drivedit.config.detect import DetectJob
from drivedit.detect import preflight
from drivedit.detect.loop import DETECTOR_DIR, SCORES_DIR
from drivedit.logs import setup_logging
from drivedit.raylocal import connect_ray
from drivedit.train import driver
from drivedit.train import state as st

RESULT_FILE = "result.json"


def main(argv: list[str] | None = None) -> int:
    """`drivedit detect --config FILE [--eval-only] [--section.field VALUE ...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="drivedit detect", add_help=False,
                                 description="Train a 2-D object detector on BDD100K-format folders with Ray Train "
                                             "and score it per category, scenario and object size (COCO AP); "
                                             "--eval-only scores an existing detector (--model.ref) on --data.val. "
                                             "Any config field can be overridden as --section.field VALUE.")
    ap.add_argument("--config", help="YAML job config (configs/demo/detect.yaml)")
    ap.add_argument("--eval-only", action="store_true", help="score model.ref on data.val; no training")
    ap.add_argument("-h", "--help", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    if args.help:
        print(ap.format_help())
        print("\n".join(field_help_lines(DetectJob)))
        return 0
    setup_logging()
    try:
        raw = read_raw_config(args.config, overrides)
        plan = preflight.check(raw, args.config or "(command line)", eval_only=args.eval_only)
    except ConfigError as e:
        print(f"drivedit detect: {e}", file=sys.stderr)
        return 2
    for uri, r in plan.reports.items():
        print(f"[detect] {preflight.describe(uri, r)}", flush=True)
    summary = evaluate_only(plan) if args.eval_only else run(plan)
    print(json.dumps(summary, indent=1))
    return 0


def run_detect(job: DetectJob, eval_only: bool = False) -> dict:
    """Run (or resume, or return the record of) a validated job; the result summary."""
    plan = preflight.check(job.model_dump(mode="json"), f"run {job.run.name}", eval_only=eval_only)
    return evaluate_only(plan) if eval_only else run(plan)


# ----------------------------------------------------------------------------- tracking


def _start_tracking(plan: preflight.Plan, kind: str, keep_run: bool) -> tracking.TrackedRun | None:
    job = plan.job
    if not job.tracking.enabled:
        return None
    uri = tracking.resolve_tracking_uri(job.tracking.tracking_uri, job.run.storage_path)
    tags = {"drivedit.job": kind, "drivedit.arch": job.model.arch, "drivedit.backbone": job.model.backbone,
            "drivedit.run_dir": plan.run_dir}
    return tracking.start_run(uri, job.tracking.experiment, job.run.name if keep_run else f"{job.run.name}-eval",
                              storage_dir=plan.run_dir if keep_run else None,
                              params=tracking.config_params(job.model_dump(mode="json")), tags=tags)


def _log_scores(tracked: tracking.TrackedRun, scores_dir: Path, metrics: dict, step: int) -> None:
    from drivedit.detect.predict import headline

    tracked.log_metrics(headline(metrics), step)
    tracked.log_artifacts(scores_dir, SCORES_DIR)  # per_scenario.csv, pr_curve.png, predictions, gt, metrics


# ----------------------------------------------------------------------------- training


def _completed(plan: preflight.Plan) -> dict | None:
    return driver.completed_run(plan.run_dir, RESULT_FILE, plan.job.optim.total_steps, "detector_uri", "detector.json")


def run(plan: preflight.Plan) -> dict:
    from ray.train.torch import TorchTrainer

    from drivedit.detect.loop import DetectContext, train_loop_per_worker

    job = plan.job
    done = _completed(plan)
    if done is not None:
        print(f"[detect] run {job.run.name} already finished at step {done['step']}: {done['detector_uri']}",
              flush=True)
        return done
    connect_ray(job.ray.address, job.ray.num_cpus, job.ray.worker_niceness)
    driver.warn_if_short(job.scaling, "detect")
    tracked = _start_tracking(plan, "detect", keep_run=True)
    ctx = DetectContext(tracking=tracked.to_dict() if tracked else None, run_dir=plan.run_dir)

    def make_trainer():
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": job.model_dump(mode="json"), "context": ctx.model_dump(mode="json")},
            scaling_config=driver.scaling_config(job.scaling), run_config=driver.run_config(job))

    return driver.train_or_publish(plan, tracked, make_trainer, _finalize, "detection")


def _finalize(plan: preflight.Plan, checkpoint: Path, tracked: tracking.TrackedRun | None) -> dict:
    from drivedit.detect.models import read_spec

    job = plan.job
    meta = st.read_meta(checkpoint)
    spec = read_spec(checkpoint / DETECTOR_DIR)  # refuse to publish an incomplete detector
    step = int(meta["step"])
    detector_uri, scores_uri = storage.join(plan.run_dir, DETECTOR_DIR), storage.join(plan.run_dir, SCORES_DIR)
    storage.publish_dir(checkpoint / SCORES_DIR, scores_uri)
    storage.publish_dir(checkpoint / DETECTOR_DIR, detector_uri)
    scores = json.loads((checkpoint / SCORES_DIR / "metrics.json").read_text())
    summary = {"run_name": job.run.name, "run_dir": plan.run_dir, "step": step, "arch": spec["arch"],
               "backbone": spec["backbone"], "categories": spec["categories"], "image_size": spec["image_size"],
               "val": {k: scores[k] for k in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")},
               "val_per_scenario": {k: v["AP50"] for k, v in scores["per_scenario"].items()},
               "size_scaling": scores["size_scaling"], "label_reports": plan.reports,
               "train_report": meta.get("train_report", {}), "data_seen": meta.get("data_seen", []),
               "val_skipped": scores.get("skipped", {}), "detector_uri": detector_uri, "scores_uri": scores_uri,
               "checkpoint_uri": storage.join(plan.run_dir, st.checkpoint_dir_name(step)),
               "mlflow_run_id": None, "tracking_uri": None, "model_uri": None}
    if tracked is not None:
        _log_scores(tracked, checkpoint / SCORES_DIR, scores, step)
        tracked.log_artifacts(checkpoint / DETECTOR_DIR, DETECTOR_DIR)
        name = job.tracking.registered_model or f"drivedit-detect-{job.run.name}"
        model_uri = tracked.register(DETECTOR_DIR, name, description=f"{spec['arch']} on {spec['backbone']} of run "
                                     f"{job.run.name} (step {step}), val AP50 {scores['AP50']}",
                                     tags={"run": job.run.name, "step": str(step), "arch": spec["arch"],
                                           "backbone": spec["backbone"]})
        summary.update(mlflow_run_id=tracked.run_id, tracking_uri=storage.redact(tracked.tracking_uri),
                       model_uri=model_uri)
        tracked.set_tags({"drivedit.model_uri": model_uri})
        tracked.log_dict(summary, RESULT_FILE)
        tracked.end("FINISHED")
    storage.write_text_atomic(storage.join(plan.run_dir, RESULT_FILE), json.dumps(summary, indent=1))
    print(f"[detect] done: step {step}, val AP50 {scores['AP50']}, detector {detector_uri}"
          + (f", registered as {summary['model_uri']}" if summary["model_uri"] else ""), flush=True)
    return summary


# ----------------------------------------------------------------------------- --eval-only


def evaluate_only(plan: preflight.Plan) -> dict:
    """Score model.ref on data.val in this process; score files to <run dir>/eval/<folder name>."""
    import torch

    from drivedit.detect.dataset import FrameStore, read_frames
    from drivedit.detect.detector import load_detector
    from drivedit.detect.predict import score

    job = plan.job
    tracked = _start_tracking(plan, "detect-eval", keep_run=False)
    try:
        detector, spec = load_detector(job.model.ref, tracking.resolve_tracking_uri(job.tracking.tracking_uri,
                                                                                     job.run.storage_path))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        detector.to(device)
        frames, report = read_frames(job.data.val, job.data.labels_file, spec["categories"], job.data.category_map,
                                     job.data.scenarios)
        print(f"[detect] {preflight.describe(job.data.val, report.to_dict())}", flush=True)
        store = FrameStore(frames, spec["image_size"], cache=False)
        out = storage.join(plan.run_dir, "eval", Path(job.data.val.rstrip("/")).name)
        with tempfile.TemporaryDirectory() as d:
            metrics = score(detector, spec, store, job.eval.batch_size, device, job.eval.coco_reference_size, Path(d))
            storage.publish_dir(Path(d), out)
            if tracked is not None:
                _log_scores(tracked, Path(d), metrics, 0)
                tracked.end("FINISHED")
    except BaseException:
        if tracked is not None:
            tracked.end("FAILED")
        raise
    return {"model_ref": job.model.ref, "val": job.data.val, "scores_uri": out,
            "metrics": {k: metrics[k] for k in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")},
            "per_scenario_AP50": {k: v["AP50"] for k, v in metrics["per_scenario"].items()},
            "size_scaling": metrics["size_scaling"], "skipped": metrics["skipped"],
            "mlflow_run_id": tracked.run_id if tracked else None}
