"""`DownstreamBench`: does synthetic data help a detector? The rare-scenario experiment of
`bench/downstream.py` (configs/bench/downstream.yaml), from procedural scenes to the comparison table."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from drivedit.config.base import StrictModel
from drivedit.config.common import GUIDANCE_INTERVAL_FIELD, GuidanceInterval

SCENE_SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]  # the demo encode vocabulary
SCENE_CATEGORIES = ["car", "truck", "bus", "pedestrian", "traffic light", "traffic sign"]


class ScenesSection(StrictModel):
    """The real data: procedural 128 px scenes, some scenarios rare in training, every scenario held out."""

    common: list[str] = Field(default_factory=lambda: ["clear", "overcast", "partly cloudy", "rainy"],
                              description="scenarios with plenty of training frames")
    rare: list[str] = Field(default_factory=lambda: ["night", "snowy"],
                            description="scenarios short in training; the synthetic frames are of these")
    common_per_scenario: int = Field(120, ge=1, description="real training frames of each common scenario")
    rare_share: float = Field(0.05, gt=0, lt=0.5, description="share of all real training frames each rare "
                                                               "scenario gets (BDD100K: about 5 % night-snow)")
    heldout_per_scenario: int = Field(40, ge=1, description="held-out real frames of every scenario (the scoring set)")
    seed: int = Field(0, ge=0, description="scene seeds; the held-out frames use other seeds than the training ones")


class GeneratorSection(StrictModel):
    """Step (1): the demo's fine-tune (configs/demo/finetune.yaml) on the real training frames only, with a
    layout branch beside the scenario adapter."""

    steps: int = Field(1200, ge=1, description="fine-tuning steps")
    layout_kind: Literal["light", "controlnet"] = Field("light", description="the layout branch (models/control.py)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="further fields of the fine-tune config, "
                                                                       "e.g. {optim.lr: 1.0e-3}")


class SyntheticSection(StrictModel):
    """Step (2): labelled frames of the rare scenarios from the generate job (configs/demo/generate.yaml)."""

    mode: Literal["layouts", "transfer", "both"] = Field(
        "layouts", description="`layouts`: the boxes of real common-scenario training frames rendered under each "
                                "rare scenario (spec.layouts); `transfer`: those frames re-rendered into each rare "
                                "scenario by SDEdit (spec.transfer); `both`: one dataset of each")
    per_scenario: int = Field(100, ge=1, description="generated frames per rare scenario (per mode)")
    strength: float = Field(0.5, gt=0, le=1, description="transfer: SDEdit strength")
    transfer_layout_guidance: float | None = Field(
        None, ge=1, description="transfer: steer the SDEdit with the generator's layout branch on each source frame's "
                                "own boxes, with this guidance on the layout (spec.transfer.layout_guidance; label "
                                "survival 0.52 vs 0.02 at s 0.8, BENCHMARKS.md); null: plain SDEdit")
    start: Literal["noise", "inversion"] = Field(
        "noise", description="transfer: how the source latent reaches t = s T (spec.transfer.start; inversion "
                             "needs sampler ddim)")
    layout_guidance: float = Field(4.0, ge=1, description="layouts: guidance on the layout")
    sampler: Literal["ddpm", "ddim"] = Field("ddpm", description="the generate job's sampler")
    sampler_steps: int = Field(25, ge=1, description="denoising steps (a transfer runs strength x steps of them)")
    guidance: float = Field(4.0, ge=1, description="guidance on the scenario")
    guidance_interval: GuidanceInterval = GUIDANCE_INTERVAL_FIELD  # null: what the recorded arms were made with


class DetectorSection(StrictModel):
    """Step (3): the demo detector (configs/demo/detect.yaml) trained in two arms per seed. Both arms take the
    same optimizer steps and draw the same real frames at every step (the detect job's `per_step` counts:
    each dataset from its own random stream); the mixed arm's batches hold `synthetic_per_step` more images."""

    steps: int = Field(400, ge=1, description="optimizer steps of every run")
    categories: list[str] = Field(
        default_factory=lambda: ["car", "truck", "bus"], min_length=1,
        description="detected categories (of the scenes': car, truck, bus, pedestrian, traffic light, traffic sign; "
                    "most pedestrians, lights and signs are under 6 px at 128 px, beyond a short CPU training)")
    real_per_step: int = Field(16, ge=1, description="real training images in every step's batch (both arms)")
    synthetic_per_step: int = Field(8, ge=1, description="synthetic images added to every step's batch (mixed arm)")
    teacher_score: float | None = Field(
        None, gt=0, lt=1, description="mark what the synthetic frames show but their labels do not: each seed's "
                                      "real-only detector's detections scoring at least this that overlap no label "
                                      "(IoU < 0.3) become ignore regions of that seed's mixed arm "
                                      "(drivedit.detect.unlabelled); None: off")
    synthetic_background: bool = Field(
        True, description="false: the synthetic frames teach only their boxes, nothing of them is background "
                          "(the detect job's data.train[].learn_background)")
    synthetic_ignore_under: float = Field(
        0.0, ge=0, description="the synthetic frames' boxes with a side under this (128 px image pixels) are ignore "
                               "regions, not targets (the detect job's data.train[].ignore_under): sizes whose "
                               "layout fidelity is low; 19.2 = COCO's medium/large limit at 128 px, 6.4 its small")
    controls: list[Literal["more-real", "rare-real"]] = Field(
        default_factory=list,
        description="control arms, each with `synthetic_per_step` more *real* images in every step's batch in place "
                    "of the synthetic ones (the same real stream as the other arms, plus a stream of its own): "
                    "`more-real` draws them from all real training frames (is the mixed arm's gain the larger "
                    "batch?), `rare-real` from the real frames of the rare scenarios (oversampling them: does "
                    "synthetic data beat repeating the rare frames one has?)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="one run per arm and seed")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    num_workers: int = Field(2, ge=1, description="Ray Train workers per run")
    overrides: dict[str, Any] = Field(default_factory=dict, description="further fields of the detect config, "
                                                                       "e.g. {model.fpn_channels: 32}")


class GoalSection(StrictModel):
    """What counts as success (AP50 points, i.e. AP50 x 100)."""

    rare_gain: float = Field(3.0, description="mixed - real AP50 on the rare scenarios, beyond the seed spread")
    common_cost: float = Field(0.5, ge=0, description="the most AP50 the common scenarios may lose")


class DownstreamBench(StrictModel):
    """The whole downstream experiment: real scenes -> generator fine-tune -> synthetic rare frames -> detector
    arms x seeds -> per-scenario and per-size scores, paired differences, one markdown table."""

    out: str = Field("runs/bench-downstream", description="everything goes here (datasets, runs, MLflow, table)")
    experiment: str = Field("drivedit-downstream", description="the MLflow experiment of every run")
    scenes: ScenesSection = Field(default_factory=ScenesSection, description="the real data")
    generator: GeneratorSection = Field(default_factory=GeneratorSection, description="(1) the generator fine-tune")
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection, description="(2) the synthetic frames")
    detector: DetectorSection = Field(default_factory=DetectorSection, description="(3) the detector arms")
    goal: GoalSection = Field(default_factory=GoalSection, description="(4) what the table is judged against")
    num_cpus: int = Field(4, ge=1, description="CPUs of the local Ray every stage shares")

    @model_validator(mode="after")
    def _check(self) -> "DownstreamBench":
        s, d = self.scenes, self.detector
        problems = []
        for name, group in (("common", s.common), ("rare", s.rare)):
            unknown = [x for x in group if x not in SCENE_SCENARIOS]
            if unknown:
                problems.append(f"scenes.{name}: unknown scenarios {unknown}; the scenes know {SCENE_SCENARIOS}")
            if not group:
                problems.append(f"scenes.{name}: give at least one scenario")
        if set(s.common) & set(s.rare):
            problems.append(f"scenes: {sorted(set(s.common) & set(s.rare))} are both common and rare")
        if s.rare and s.rare_share * len(s.rare) >= 1:
            problems.append(f"scenes.rare_share ({s.rare_share}) x {len(s.rare)} rare scenarios leaves no common frame")
        parts = 2 if self.synthetic.mode == "both" else 1
        for name, n in (("real_per_step", d.real_per_step), ("synthetic_per_step", d.synthetic_per_step)):
            per = d.num_workers * (parts if name == "synthetic_per_step" else 1)
            if n % per:
                problems.append(f"detector.{name} ({n}) must be divisible by {per} (num_workers"
                                + (" x 2 synthetic datasets)" if per != d.num_workers else ")"))
        unknown = [c for c in d.categories if c not in SCENE_CATEGORIES]
        if unknown:
            problems.append(f"detector.categories: {unknown} are not among the scenes' {SCENE_CATEGORIES}")
        y = self.synthetic
        if y.mode != "layouts" and y.start == "inversion" and y.sampler != "ddim":
            problems.append(f"synthetic.start inversion needs synthetic.sampler ddim, got {y.sampler} (DDPM's fresh "
                            f"noise forgets the inverted start)")
        if len(set(d.controls)) != len(d.controls):
            problems.append(f"detector.controls must be distinct, got {d.controls}")
        if len(set(d.seeds)) != len(d.seeds):
            problems.append(f"detector.seeds must be distinct, got {d.seeds}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @staticmethod
    def as_overrides(fields: dict[str, Any]) -> list[str]:
        """{section.field: value} -> the jobs' `--section.field VALUE` arguments."""
        return [a for k, v in fields.items() for a in (f"--{k}", json.dumps(v))]

    def rare_frames(self) -> int:
        """Real training frames of each rare scenario: rare_share of the whole training set, at least one."""
        common = self.scenes.common_per_scenario * len(self.scenes.common)
        share = self.scenes.rare_share
        return max(1, round(share * common / (1 - share * len(self.scenes.rare))))
