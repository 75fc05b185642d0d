"""Connecting to Ray: the one place every job joins a cluster or starts a local Ray."""
from __future__ import annotations

import os

from drivedit.logs import quiet_ray_noise

# every worker process of a Ray we start filters Ray's noise too (see drivedit.logs)
QUIET_WORKERS_HOOK = "drivedit.logs.quiet_ray_noise"


def connect_ray(address: str | None = None, num_cpus: int | None = None, **init_kwargs):
    """Join the cluster at `address` (or at RAY_ADDRESS: the one a job was submitted to), else start a
    local Ray with `num_cpus` (None: all of this machine's). A process already connected is left as it
    is. Returns the `ray` module."""
    import ray

    quiet_ray_noise()
    if ray.is_initialized():
        return ray
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **init_kwargs)  # num_cpus and the runtime env belong to the cluster's job
    else:
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", QUIET_WORKERS_HOOK)
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, **init_kwargs)
    return ray
