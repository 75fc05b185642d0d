"""A local Ray a job starts: its workers run at the job's priority (worker_niceness, 0 unless asked), filter
Ray's noise, and a cluster address is joined as it is."""
from __future__ import annotations

import os

import pytest

from drivedit import raylocal
from drivedit.config.common import RayConfig


@pytest.fixture
def init_calls(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_a_local_ray_runs_its_workers_at_the_jobs_priority(init_calls, monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    raylocal.connect_ray(None, 3, RayConfig().worker_niceness)
    (kw,) = init_calls
    assert kw["num_cpus"] == 3 and kw["_system_config"] == {"worker_niceness": 0}
    assert kw["runtime_env"]["worker_process_setup_hook"] == raylocal.QUIET_WORKERS_HOOK
    assert kw["runtime_env"]["env_vars"] == {"GOMP_SPINCOUNT": "10000"}  # short OpenMP spins on shared cores
    raylocal.start_local_ray(2, 15, include_dashboard=False, _system_config={"object_timeout_milliseconds": 100})
    kw = init_calls[1]
    assert kw["_system_config"] == {"worker_niceness": 15, "object_timeout_milliseconds": 100}
    assert kw["include_dashboard"] is False


def test_a_cluster_is_joined_as_it_is(init_calls):
    raylocal.connect_ray("ray://head:10001", 3, 0)
    assert init_calls == [{"address": "ray://head:10001"}]


def test_niceness_is_bounded_in_the_config():
    from pydantic import ValidationError

    assert RayConfig(worker_niceness=19).worker_niceness == 19
    with pytest.raises(ValidationError, match="worker_niceness"):
        RayConfig(worker_niceness=20)


def test_an_openmp_wait_policy_the_user_chose_is_kept(init_calls, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    raylocal.start_local_ray(1, runtime_env={"env_vars": {"X": "1"}})
    assert init_calls[0]["runtime_env"]["env_vars"] == {"X": "1"}  # workers inherit the driver's environment
    monkeypatch.delenv("OMP_WAIT_POLICY")
    raylocal.start_local_ray(1, runtime_env={"env_vars": {"GOMP_SPINCOUNT": "500"}})
    assert init_calls[1]["runtime_env"]["env_vars"] == {"GOMP_SPINCOUNT": "500"}


def test_the_cli_sets_short_spins_before_a_job_loads_torch(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    raylocal.prefer_short_openmp_spins()
    assert os.environ["GOMP_SPINCOUNT"] == "10000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    raylocal.prefer_short_openmp_spins()
    assert "GOMP_SPINCOUNT" not in os.environ  # the user's choice stands
