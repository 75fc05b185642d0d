"""Progressive ("spoon") noise schedule: stage betas follow the formula; stages switch by step."""
import math

import numpy as np
import pytest

from drivedit.config.method import MethodConfig
from drivedit.train.schedule import ConstantSchedule, ProgressiveSchedule, build_schedule


def _cos_power_betas(p: float) -> np.ndarray:
    # independent restatement of beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)
    T = 1000
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** p  # noqa: E731
    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])


def test_stage_betas_match_formula():
    sched = ProgressiveSchedule(total_steps=600)
    lin = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(sched.stage_betas(0), lin, rtol=1e-12)
    for k, p in enumerate((6, 5, 4, 3, 2), start=1):
        np.testing.assert_allclose(sched.stage_betas(k), np.minimum(lin, _cos_power_betas(p)), rtol=1e-12)
    np.testing.assert_allclose(sched.final_betas(), np.minimum(lin, _cos_power_betas(2)), rtol=1e-12)
    # each stage lowers the noise: abar_100 rises 0.895 (linear) -> 0.972 (p = 2), abar_400 0.194 -> 0.646
    abar = [np.cumprod(1 - sched.stage_betas(k)) for k in range(6)]
    assert abar[0][100] == pytest.approx(0.895, abs=2e-3) and abar[5][100] == pytest.approx(0.972, abs=2e-3)
    assert abar[0][400] == pytest.approx(0.194, abs=2e-3) and abar[5][400] == pytest.approx(0.646, abs=2e-3)
    assert all((abar[k + 1][1:900] >= abar[k][1:900] - 1e-12).all() for k in range(5))


def test_stage_switching_by_step():
    sched = ProgressiveSchedule(total_steps=600)
    assert [sched.stage_at(s) for s in (0, 99, 100, 199, 200, 499, 500, 599, 600, 10_000)] == \
        [0, 0, 1, 1, 2, 4, 5, 5, 5, 5]
    np.testing.assert_array_equal(sched.betas_at(250), sched.stage_betas(2))
    d1, d2, d3 = sched.diffusion_at(0), sched.diffusion_at(50), sched.diffusion_at(150)
    assert d1 is d2 and d3 is not d1
    np.testing.assert_array_equal(d3.betas, sched.stage_betas(1))
    # uneven division still covers every stage exactly once, in order
    odd = ProgressiveSchedule(total_steps=7, num_stages=3, powers=(4, 2))
    assert [odd.stage_at(s) for s in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="needs 2 powers"):
        ProgressiveSchedule(10, num_stages=3, powers=(6, 5, 4))


def test_build_schedule_defaults_per_method():
    # every method trains on DiT's linear schedule unless told otherwise (driveditfit too: BENCHMARKS' method table)
    for name in ("driveditfit", "bitfit"):
        const = build_schedule(MethodConfig(name=name), 60)
        assert type(const) is ConstantSchedule and const.stage_at(59) == 0
        np.testing.assert_array_equal(const.final_betas(), np.linspace(1e-4, 0.02, 1000))
    assert isinstance(build_schedule(MethodConfig(name="driveditfit", schedule="progressive"), 60), ProgressiveSchedule)
    short = build_schedule(MethodConfig(name="driveditfit", schedule="progressive", num_stages=2, powers=[3]), 10)
    assert short.num_stages == 2 and short.describe()["powers"] == [3.0]
