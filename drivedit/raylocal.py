"""Connecting to Ray: the one place every job joins a cluster or starts a local Ray."""
from __future__ import annotations

import os


def connect_ray(address: str | None = None, num_cpus: int | None = None, **init_kwargs):
    """Join the cluster at `address` (or at RAY_ADDRESS: the one a job was submitted to), else start a
    local Ray with `num_cpus` (None: all of this machine's). A process already connected is left as it
    is. Returns the `ray` module."""
    import ray

    if ray.is_initialized():
        return ray
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **init_kwargs)  # num_cpus belongs to the cluster, not to us
    else:
        ray.init(num_cpus=num_cpus, **init_kwargs)
    return ray
