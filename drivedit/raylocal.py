"""Connecting to Ray: the one place every job joins a cluster or starts a local Ray."""
from __future__ import annotations

import os

from drivedit.logs import quiet_ray_noise

# every worker process of a Ray we start filters Ray's noise too (see drivedit.logs)
QUIET_WORKERS_HOOK = "drivedit.logs.quiet_ray_noise"


def connect_ray(address: str | None = None, num_cpus: int | None = None, worker_niceness: int = 0, **init_kwargs):
    """Join the cluster at `address` (or at RAY_ADDRESS: the one a job was submitted to), else start a
    local Ray with `num_cpus` (None: all of this machine's) whose workers run at `worker_niceness`. A process
    already connected is left as it is. Returns the `ray` module."""
    import ray

    quiet_ray_noise()
    if ray.is_initialized():
        return ray
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **init_kwargs)  # num_cpus and the runtime env belong to the cluster's job
    else:
        start_local_ray(num_cpus, worker_niceness, **init_kwargs)
    return ray


# GNU OpenMP (torch's CPU threads) spins 300,000 times at a barrier before it sleeps. Where the cores are shared,
# a descheduled thread keeps the others spinning through their time slices: the tiny DiT's 2-thread training step
# ran 30 img/s beside two busy loops with the default and 71 with 10,000 spins (alone 198 vs 241 in one run, 218 vs
# 196 in another: within this VM's noise; BENCHMARKS.md "Sharing the cores"). Set in a local Ray's workers unless
# the environment already chose a wait policy.
SHARED_CORE_OPENMP_ENV = {"GOMP_SPINCOUNT": "10000"}
OPENMP_WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def prefer_short_openmp_spins() -> None:
    """SHARED_CORE_OPENMP_ENV for this process and the local Ray it may start, unless the environment already
    chose a wait policy. OpenMP reads it once, when torch loads: the CLI calls this before importing a job."""
    if not any(k in os.environ for k in OPENMP_WAIT_VARIABLES):
        os.environ.update(SHARED_CORE_OPENMP_ENV)


def start_local_ray(num_cpus: int | None = None, worker_niceness: int = 0, **init_kwargs) -> None:
    """Start a local Ray whose workers filter Ray's noise, run at `worker_niceness` and wait at OpenMP barriers
    without spinning for long (SHARED_CORE_OPENMP_ENV).

    Ray nices its workers to 15 so that a node's raylet and drivers stay responsive; on a shared machine that
    leaves a job's workers 36 / 1024 of a plain process's CPU weight under Linux's scheduler, so any busy
    neighbour starves them (the demo's encode had not finished after 6 minutes beside two busy loops). A local
    Ray is the job's own, so its workers get the job's priority unless asked otherwise."""
    import ray

    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", QUIET_WORKERS_HOOK)
    if not any(k in os.environ for k in OPENMP_WAIT_VARIABLES):  # else the workers inherit the driver's choice
        runtime_env["env_vars"] = {**SHARED_CORE_OPENMP_ENV, **(runtime_env.get("env_vars") or {})}
    system_config = {"worker_niceness": int(worker_niceness), **(init_kwargs.pop("_system_config", None) or {})}
    ray.init(num_cpus=num_cpus, runtime_env=runtime_env, _system_config=system_config, **init_kwargs)
