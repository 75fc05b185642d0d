"""The `method` section of the fine-tuning config: which parameters train and how.

Fields left at None take the published method's own value (see `MethodConfig.resolve`), so the
default config reproduces each paper and the logged params show what was actually used.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drivedit.config.base import StrictModel

MethodName = Literal["full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit"]

# what `None` means per method: the settings each paper used
METHOD_DEFAULTS: dict[str, dict] = {
    "full": {"lr_multiplier": 1.0, "schedule": "linear", "train_table": True},
    # BitFit's published set is the biases alone: its scenario rows stay at their semantic init
    "bitfit": {"lr_multiplier": 1.0, "schedule": "linear", "train_table": False},
    "difffit": {"lr_multiplier": 10.0, "schedule": "linear", "train_table": True},  # "10x the pre-training lr"
    "finediffusion": {"lr_multiplier": 1.0, "schedule": "linear", "train_table": True},
    "lora": {"lr_multiplier": 1.0, "schedule": "linear", "train_table": True},
    # linear, not the paper's progressive ("spoon") schedule: at the demo's 1,600 steps the method table found
    # progressive level on FID and far behind on condition accuracy (0.37 vs 0.64: night never drawn)
    "driveditfit": {"lr_multiplier": 1.0, "schedule": "linear", "train_table": True},
}


class MethodConfig(StrictModel):
    """Parameter-efficient fine-tuning method and its options."""

    name: MethodName = Field(
        "driveditfit", description="full | bitfit | difffit | finediffusion | lora | driveditfit "
                                   "(weight modulators + scenario embeddings, DriveDiTFit)")
    rank: int = Field(4, description="rank of the weight modulators (driveditfit) or of LoRA")
    lora_alpha: float | None = Field(None, description="LoRA scale numerator (update = alpha/rank * B A); "
                                                       "default: rank (scale 1)")
    select: Literal["paper", "gap", "random"] = Field(
        "paper", description="driveditfit: `paper` modulates DriveDiTFit's fixed set (attention qkv/proj, adaLN, "
                             "timestep MLP, final layer); `gap` measures the source/target gap per module and "
                             "modulates the largest-gap modules until `budget` is spent; `random` spends the same "
                             "budget on modules drawn at random (seed probe_seed): the control for `gap`")
    train_table: bool | None = Field(
        None, description="train the scenario table (rows start at their semantic init either way); default: "
                          "false for bitfit (its published set is the biases alone), true for the others")
    budget: float | None = Field(
        None, description="select=gap or random: trainable-parameter budget, a count (> 1) or a fraction of the model "
                          "(0 < f <= 1); default: what the paper set costs at this rank")
    gap_timesteps: list[int] = Field(
        [50, 200, 400, 600, 800], description="diffusion steps at which the gap is measured")
    source_samples: int = Field(
        32, description="select=gap without source latents: how many class-conditional samples of the frozen "
                        "model stand in for the source domain")
    source_steps: int = Field(25, description="DDIM steps used to draw those source samples")
    source_guidance: float = Field(1.5, description="classifier-free guidance scale of those source samples")
    scenario_init: Literal["auto", "denoise", "text", "name", "random"] = Field(
        "auto", description="scenario embeddings start from the source class rows under which the frozen DiT "
                            "denoises the scenario's latents best (`denoise`), whose names are closest to the "
                            "scenario name (`text`, needs class names), of the class with the scenario's own "
                            "name (`name`: continued pre-training on the base's classes), or N(0, 0.02) "
                            "(`random`); `auto`: text where the base's class names are known (given, or "
                            "ImageNet's for a 1000-class model), else random (bench/methods_table.py: text beat "
                            "denoise and random at 300 steps, no init was ahead at 1600)")
    top_k: int = Field(1, description="semantic init: the row is the mean of the top-k classes' rows")
    init_timesteps: list[int] = Field(
        [100, 300, 500, 700], description="scenario_init=denoise: diffusion steps at which eps MSE is compared")
    init_samples: int = Field(8, description="scenario_init=denoise: latents per scenario used for the comparison")
    probe_seed: int = Field(0, description="seed of the fixed noise used by gap measurement and semantic init")
    lr_multiplier: float | None = Field(
        None, description="learning-rate multiplier of the trainable set; default: 10 for difffit, else 1")
    difffit_blocks: int | None = Field(
        None, description="difffit: blocks (from the first) that get gamma scales; default: the first half")
    superclasses: dict[str, list[str]] | None = Field(
        None, description="finediffusion: superclass name -> its scenario names (each scenario in exactly one); "
                          "a dropped label becomes its superclass; default: one superclass holding all scenarios")
    lambda_obj: float = Field(2.0, description="small-object loss weight: lambda inside object boxes, 1 outside")
    size_aware: bool = Field(False, description="weigh smaller objects more (bounded by max_obj_weight); "
                                                "not in the paper")
    max_obj_weight: float | None = Field(
        None, description="size_aware: upper bound of an object's weight; default: 2 * lambda_obj")
    schedule: Literal["linear", "progressive"] | None = Field(
        None, description="noise schedule while training: `linear` (DiT's) or `progressive` (DriveDiTFit's stages "
                          "of min(linear, cosine^p)); the final betas are stored for sampling; "
                          "default: linear (BENCHMARKS.md: the method table)")
    num_stages: int = Field(6, description="progressive: number of equal training stages")
    powers: list[float] = Field([6, 5, 4, 3, 2], description="progressive: cosine power p of stages 1.. (stage 0 "
                                                             "is linear); num_stages - 1 values")

    @model_validator(mode="after")
    def _check(self) -> MethodConfig:
        problems = []
        if self.rank < 1:
            problems.append(f"method.rank must be >= 1, got {self.rank}")
        if self.top_k < 1:
            problems.append(f"method.top_k must be >= 1, got {self.top_k}")
        if self.lora_alpha is not None and self.name != "lora":
            problems.append("method.lora_alpha only applies to method.name: lora")
        if self.select != "paper" and self.name != "driveditfit":
            problems.append(f"method.select: {self.select} places weight modulators, so it needs method.name: "
                            "driveditfit")
        if self.budget is not None:
            if self.select == "paper":
                problems.append("method.budget only applies with method.select: gap or random")
            if self.budget <= 0 or (self.budget > 1 and self.budget != int(self.budget)):
                problems.append(f"method.budget must be a fraction in (0, 1] or a whole count > 1, got {self.budget}")
        for key in ("gap_timesteps", "init_timesteps"):
            ts = getattr(self, key)
            if not ts or any(not 0 <= t < 1000 for t in ts):
                problems.append(f"method.{key} must be a non-empty list of steps in [0, 1000), got {ts}")
        for key in ("source_samples", "source_steps", "init_samples"):
            if getattr(self, key) < 1:
                problems.append(f"method.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr_multiplier is not None and self.lr_multiplier <= 0:
            problems.append(f"method.lr_multiplier must be > 0, got {self.lr_multiplier}")
        if self.difffit_blocks is not None and (self.name != "difffit" or self.difffit_blocks < 0):
            problems.append("method.difffit_blocks applies to method.name: difffit and must be >= 0")
        if self.superclasses is not None:
            if self.name != "finediffusion":
                problems.append("method.superclasses only applies to method.name: finediffusion")
            names = [s for members in self.superclasses.values() for s in members]
            dup = sorted({s for s in names if names.count(s) > 1})
            if dup:
                problems.append(f"method.superclasses lists these scenarios more than once: {dup}")
            if any(not members for members in self.superclasses.values()):
                problems.append("method.superclasses: every superclass needs at least one scenario")
        if self.lambda_obj < 1:
            problems.append(f"method.lambda_obj must be >= 1 (objects weigh at least as much as background), "
                            f"got {self.lambda_obj}")
        if self.max_obj_weight is not None and self.max_obj_weight < self.lambda_obj:
            problems.append(f"method.max_obj_weight ({self.max_obj_weight}) must be >= lambda_obj ({self.lambda_obj})")
        if self.num_stages < 1:
            problems.append(f"method.num_stages must be >= 1, got {self.num_stages}")
        elif len(self.powers) != self.num_stages - 1:
            problems.append(f"method.powers needs num_stages - 1 = {self.num_stages - 1} values, got {len(self.powers)}")
        if any(p <= 0 for p in self.powers):
            problems.append(f"method.powers must be positive, got {self.powers}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolve(self) -> MethodConfig:
        """A copy with every None that has a per-method default filled in (log this one)."""
        defaults = METHOD_DEFAULTS[self.name]
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.max_obj_weight is None:
            updates["max_obj_weight"] = 2.0 * self.lambda_obj
        return self.model_copy(update=updates)

    def superclass_ids(self, scenarios: list[str]) -> tuple[list[int], list[str]]:
        """(superclass id of each scenario, superclass names) for finediffusion's tiered table."""
        if self.superclasses is None:
            return [0] * len(scenarios), ["any"]
        names = list(self.superclasses)
        of = {s: i for i, members in enumerate(self.superclasses.values()) for s in members}
        missing = [s for s in scenarios if s not in of]
        unknown = sorted(set(of) - set(scenarios))
        problems = []
        if missing:
            problems.append(f"method.superclasses does not place these scenarios: {missing}")
        if unknown:
            problems.append(f"method.superclasses names scenarios that are not in the vocabulary {scenarios}: {unknown}")
        if problems:
            raise ValueError("; ".join(problems))
        return [of[s] for s in scenarios], names
