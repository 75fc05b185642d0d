"""Fault-injection drills of the Ray Train jobs (`drill.stop_at_step`, `drill.kill_rank_at_step`).

Each drill fires once per run: a marker in the run directory records it, so neither Ray Train's
restart nor a rerun of the job fires it again.
"""
from __future__ import annotations

import logging
import os
import signal


def fire_drills(drill, step: int, rank: int, run_dir: str, log: logging.Logger, job_name: str) -> None:
    """Kill this worker or stop the run after `step` when a drill says so (and has not fired yet)."""
    from drivedit import storage

    kill = drill.kill_rank_at_step == step and rank == drill.kill_rank
    stop = drill.stop_at_step == step and rank == 0
    if not (kill or stop):
        return
    marker = storage.join(run_dir, "drills", f"{'kill' if kill else 'stop'}-{step}")
    if storage.exists(marker):
        return
    storage.write_text_atomic(marker, f"rank {rank} pid {os.getpid()}\n")
    if kill:
        log.info(f"[{job_name}] drill: killing rank {rank} (pid {os.getpid()}) after step {step}")
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"drill: stopping the run after step {step} (drill.stop_at_step); rerun with the "
                       f"same run.name to resume from the last checkpoint")
