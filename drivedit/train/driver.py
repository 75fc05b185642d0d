"""Driver-side helpers every Ray Train job shares (`finetune`, `detect`): warning when the cluster lacks
the workers' resources, Ray Train's storage arguments, running the trainer (a failure says where a rerun
resumes), and the worker side's common edges (resume state, reporting, DDP wrapping)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from drivedit import storage


def warn_if_short(scaling, job_name: str) -> None:
    """Ray Train waits (for an autoscaler) when the cluster lacks the workers' resources; say so up front."""
    import ray

    s = scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker, **{k: v * s.num_workers for k, v in s.resources_per_worker.items()}}
    if s.use_gpu:
        need["GPU"] = need.get("GPU", 0) + s.num_workers
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        what = ", ".join(f"{k} {want:g} (cluster has {got:g})" for k, (want, got) in short.items())
        print(f"[{job_name}] warning: the workers need {what}; Ray Train waits until the cluster provides them "
              f"(an autoscaler adds nodes; a fixed cluster never does: lower scaling.num_workers)", flush=True)


def storage_args(storage_path: str) -> dict:
    """RunConfig's storage_path (and filesystem for s3://)."""
    if storage.is_remote(storage_path):
        fs, path = storage.filesystem_for(storage_path)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(Path(storage.filesystem_for(storage_path)[1]))}


def completed_run(run_dir: str, result_file: str, total_steps: int, output_key: str, marker: str) -> dict | None:
    """The result a finished run left (its output published with `marker`), or None: a rerun of a finished
    run returns it instead of training again."""
    import json

    uri = storage.join(run_dir, result_file)
    if not storage.exists(uri):
        return None
    done = json.loads(storage.read_bytes(uri))
    if done.get("step") == total_steps and storage.exists(storage.join(done[output_key], marker)):
        return {**done, "already_complete": True}
    return None


def fit(trainer, run_dir: str, run_name: str, what: str):
    """trainer.fit(), its Result with a checkpoint; a failure names the step a rerun resumes from."""
    from drivedit.train.preflight import latest_checkpoint

    try:
        result = trainer.fit()
    except Exception as e:
        latest = latest_checkpoint(run_dir)
        where = f"step {latest['step']}" if latest else "the start (no checkpoint was written)"
        raise RuntimeError(f"{what} run {run_name} failed: {e}\nrerun with the same run.name and "
                           f"storage to resume from {where}") from e
    if result.checkpoint is None:
        raise RuntimeError(f"{what} run {run_name} ended without a checkpoint")
    return result


def worker_edges(**ddp_kwargs):
    """Inside a Ray Train worker: (rank, world size, device, the state restored from the run's checkpoint or
    None, report(metrics, checkpoint dir or None, dir name), wrap(model, names DDP ignores) -> model)."""
    import ray.train
    import ray.train.torch
    import torch

    from drivedit.train import state as st

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    restored = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restored = st.load_state(d)

    def report(metrics: dict, directory: str | None, name: str) -> None:
        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if directory else None)

    def wrap(model: torch.nn.Module, ignore: list[str]) -> torch.nn.Module:
        if world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                                             parallel_strategy_kwargs=ddp_kwargs or None)

    return rank, world, ray.train.torch.get_device(), restored, report, wrap


def run_config(job):
    """Ray Train's RunConfig of a job: its run name and storage (a rerun with both resumes), failures, checkpoints."""
    import ray.train

    return ray.train.RunConfig(
        name=job.run.name, **storage_args(job.run.storage_path),
        failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints))


def scaling_config(scaling):
    import ray.train

    s = scaling
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                   resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker})


def train_or_publish(plan, tracked, make_trainer, finalize, what: str) -> dict:
    """Publish a run trained to the end before; otherwise fit the trainer `make_trainer()` builds and publish
    its last checkpoint with `finalize(plan, checkpoint dir, tracked)`. The MLflow run ends FAILED on any error."""
    job = plan.job
    try:
        latest = plan.latest
        if latest is not None and latest.get("final") and int(latest.get("step", -1)) == job.optim.total_steps:
            with tempfile.TemporaryDirectory() as d:  # trained to the end before: only publishing is left
                storage.download_dir(latest["uri"], d)
                return finalize(plan, Path(d), tracked)
        result = fit(make_trainer(), plan.run_dir, job.run.name, what)
        with result.checkpoint.as_directory() as d:
            return finalize(plan, Path(d), tracked)
    except BaseException:
        if tracked is not None:
            tracked.end("FAILED")
        raise
