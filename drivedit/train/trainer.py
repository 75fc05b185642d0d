"""`drivedit finetune`: check the job, run `WorkerLoop` on Ray Train, publish and register the bundle.

The driver's part of a fine-tuning run:
1. `preflight.check` validates the config and reads the shards, the base checkpoint and any run
   being resumed, listing every problem before Ray starts anything.
2. The MLflow run is started, or reopened from `mlflow_run.json` in the run directory.
3. A `TorchTrainer` (Ray Train V2) runs `train_loop_per_worker` with `RunConfig(name,
   storage_path)`: rerunning the job with the same `run.name` and storage resumes from the last
   checkpoint (`ray.train.get_checkpoint()` in the loop), and `FailureConfig(max_failures)` lets Ray
   restart lost workers from it without the user.
4. The final checkpoint carries the adapter bundle; it is copied to `<run dir>/bundle`, logged to
   MLflow and registered as a new version of the model, and `<run dir>/result.json` records it.
   Rerunning a finished job returns that record instead of training again.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from drivedit import storage, tracking
from drivedit.config.base import ConfigError, field_help_lines, read_raw_config
from drivedit.config.finetune import FinetuneJob
from drivedit.logs import setup_logging
from drivedit.raylocal import connect_ray
from drivedit.train import driver, preflight
from drivedit.train import state as st
from drivedit.train.loop import data_columns

RESULT_FILE = "result.json"
log = logging.getLogger("drivedit.finetune")


# ----------------------------------------------------------------------------- entry points


def run_finetune(job: FinetuneJob) -> dict:
    """Run (or resume, or return the record of) the fine-tuning job. Returns the result summary."""
    return _run(preflight.check(job.model_dump(mode="json"), f"run {job.run.name}"))


def main(argv: list[str] | None = None) -> int:
    """`drivedit finetune --config FILE [--section.field VALUE ...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="drivedit finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a DiT on latent shards with Ray Train and register the adapter bundle in MLflow.",
        epilog="config fields (set in the YAML or override as --section.field VALUE):\n"
               + "\n".join(field_help_lines(FinetuneJob)))
    ap.add_argument("--config", help="YAML job config (e.g. configs/demo/finetune.yaml)")
    args, overrides = ap.parse_known_args(argv)
    source = args.config or "(command line)"
    setup_logging()
    try:
        plan = preflight.check(read_raw_config(args.config, overrides), source)
    except ConfigError as e:
        print(storage.redact(f"drivedit finetune: {e}"), file=sys.stderr)
        return 2
    summary = _run(plan)
    print(storage.redact(json.dumps(summary, indent=1)))
    return 0


# ----------------------------------------------------------------------------- the run


def _start_tracking(plan: preflight.Plan) -> tracking.TrackedRun | None:
    job = plan.job
    if not job.tracking.enabled:
        return None
    uri = tracking.resolve_tracking_uri(job.tracking.tracking_uri, job.run.storage_path)
    tags = {"drivedit.job": "finetune", "drivedit.method": job.method.name, "drivedit.base": plan.base_ref,
            "drivedit.run_dir": plan.run_dir}
    return tracking.start_run(uri, job.tracking.experiment, job.run.name, storage_dir=plan.run_dir,
                              params=tracking.config_params(job.model_dump(mode="json")), tags=tags)


def _completed(plan: preflight.Plan) -> dict | None:
    return driver.completed_run(plan.run_dir, RESULT_FILE, plan.job.optim.total_steps, "bundle_uri", "bundle.json")


def _run(plan: preflight.Plan) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from drivedit.data.shards import read_latent_dataset
    from drivedit.train.loop import TRAIN_DATASET, LoopContext, train_loop_per_worker

    job = plan.job
    done = _completed(plan)
    if done is not None:
        log.info(f"run {job.run.name} already finished at step {done['step']}: {done['bundle_uri']}")
        return done
    connect_ray(job.ray.address, job.ray.num_cpus, job.ray.worker_niceness)
    driver.warn_if_short(job.scaling, "finetune")
    tracked = _start_tracking(plan)
    ctx = LoopContext(base_path=str(plan.base_path), base_ref=plan.base_ref, base_sha256=storage.sha256_path(plan.base_path),
                      tracking=tracked.to_dict() if tracked else None, run_dir=plan.run_dir)

    def make_trainer():
        dataset = read_latent_dataset(job.data.shards, columns=data_columns(job), in_memory=job.data.materialize)
        # every epoch is a new execution of the dataset on each worker: without this each one printed its
        # progress bars and plan (the demo's 750 steps: ~200 lines of them between the training lines)
        dataset.context.enable_progress_bars = False
        dataset.context.print_on_execution_start = False
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": job.model_dump(mode="json"), "context": ctx.model_dump(mode="json")},
            scaling_config=driver.scaling_config(job.scaling), run_config=driver.run_config(job),
            datasets={TRAIN_DATASET: dataset})

    return driver.train_or_publish(plan, tracked, make_trainer, _finalize, "fine-tuning")


def _finalize(plan: preflight.Plan, checkpoint: Path, tracked: tracking.TrackedRun | None) -> dict:
    from drivedit.models.bundle import load_bundle

    job = plan.job
    meta = st.read_meta(checkpoint)
    bundle_dir = checkpoint / st.BUNDLE_DIR
    bundle = load_bundle(bundle_dir)  # refuse to publish a broken bundle
    bundle_uri = storage.join(plan.run_dir, "bundle")
    storage.publish_dir(bundle_dir, bundle_uri)  # on S3 bundle.json sorts last: it lands after the weights
    step = int(meta["step"])
    checkpoint_name = st.checkpoint_dir_name(step)
    summary = {"run_name": job.run.name, "run_dir": plan.run_dir, "step": step, "method": job.method.name,
               "scenarios": bundle.scenarios, "metrics": meta.get("metrics", {}), "bundle_uri": bundle_uri,
               "checkpoint_uri": storage.join(plan.run_dir, checkpoint_name), "bundle_weights":
               job.optim.bundle_weights, "mlflow_run_id": None, "tracking_uri": None, "model_uri": None}
    if tracked is not None:
        tracked.log_artifacts(bundle_dir, "bundle")
        name = job.tracking.registered_model or f"drivedit-{job.run.name}"
        model_uri = tracked.register("bundle", name, description=f"{job.method.name} adapter bundle of run "
                                     f"{job.run.name} (step {step})",
                                     tags={"run": job.run.name, "step": str(step), "method": job.method.name})
        summary.update(mlflow_run_id=tracked.run_id, tracking_uri=storage.redact(tracked.tracking_uri),
                       model_uri=model_uri)
        tracked.set_tags({"drivedit.model_uri": model_uri})
        tracked.log_dict(summary, RESULT_FILE)
        tracked.end("FINISHED")
    storage.write_text_atomic(storage.join(plan.run_dir, RESULT_FILE), json.dumps(summary, indent=1))
    log.info(f"done: step {step}, bundle {bundle_uri}" + (f", registered as {summary['model_uri']}"
                                                          if summary["model_uri"] else ""))
    return summary
