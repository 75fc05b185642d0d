"""Driver-side helpers every Ray Train job shares (`finetune`, `detect`): warning when the cluster lacks
the workers' resources, and Ray Train's storage arguments."""
from __future__ import annotations

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
