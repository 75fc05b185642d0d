"""Noise schedules over training: DiT's constant linear betas, or DriveDiTFit's progressive ("spoon") stages.

Progressive: training is split into `num_stages` equal parts by step. Stage 0 uses the linear
betas; stage k >= 1 uses min(linear, cosine^p_k) elementwise with p_k = powers[k - 1] (6, 5, 4, 3, 2),
which lowers the noise at small and mid t a little more each stage, so more of the uniformly drawn
t fall in the detail regime. The last stage's betas are the ones stored with the adapter and used
for sampling. DriveDiTFit switches stages by epoch (`epoch // (epochs // 6)`); we switch by step,
which is the same when the step count divides evenly and still defined when it does not.
"""
from __future__ import annotations

import numpy as np

from drivedit.models.diffusion import NUM_TRAIN_TIMESTEPS, GaussianDiffusion, cosine_power_betas, linear_betas


class ConstantSchedule:
    """One beta schedule for the whole run (DiT's linear one)."""

    num_stages = 1

    def __init__(self, total_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.num_timesteps = num_timesteps
        self._diffusion: GaussianDiffusion | None = None
        self._stage = -1

    def stage_at(self, step: int) -> int:
        return 0

    def stage_betas(self, stage: int) -> np.ndarray:
        return linear_betas(self.num_timesteps)

    def betas_at(self, step: int) -> np.ndarray:
        return self.stage_betas(self.stage_at(step))

    def final_betas(self) -> np.ndarray:
        return self.stage_betas(self.num_stages - 1)

    def diffusion_at(self, step: int) -> GaussianDiffusion:
        """The GaussianDiffusion of the stage `step` falls in (built once per stage)."""
        stage = self.stage_at(step)
        if self._stage != stage:
            self._diffusion, self._stage = GaussianDiffusion(self.stage_betas(stage)), stage
        return self._diffusion

    def describe(self) -> dict:
        return {"kind": "linear", "num_timesteps": self.num_timesteps}


class ProgressiveSchedule(ConstantSchedule):
    """DriveDiTFit's staged schedule: stage 0 linear, stage k min(linear, cosine^powers[k-1])."""

    def __init__(self, total_steps: int, num_stages: int = 6, powers: tuple[float, ...] = (6, 5, 4, 3, 2),
                 num_timesteps: int = NUM_TRAIN_TIMESTEPS):
        super().__init__(total_steps, num_timesteps)
        if len(powers) != num_stages - 1:
            raise ValueError(f"a {num_stages}-stage schedule needs {num_stages - 1} powers, got {len(powers)}")
        self.num_stages = num_stages
        self.powers = tuple(float(p) for p in powers)

    def stage_at(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return min(step * self.num_stages // self.total_steps, self.num_stages - 1)

    def stage_betas(self, stage: int) -> np.ndarray:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {stage}")
        lin = linear_betas(self.num_timesteps)
        if stage == 0:
            return lin
        return np.minimum(lin, cosine_power_betas(self.num_timesteps, power=self.powers[stage - 1]))

    def describe(self) -> dict:
        return {"kind": "progressive", "num_stages": self.num_stages, "powers": list(self.powers),
                "num_timesteps": self.num_timesteps}


def build_schedule(method, total_steps: int) -> ConstantSchedule:
    """The schedule a MethodConfig asks for (its `schedule` None means the method's default)."""
    method = method.resolve()
    if method.schedule == "progressive":
        return ProgressiveSchedule(total_steps, method.num_stages, tuple(method.powers))
    return ConstantSchedule(total_steps)
