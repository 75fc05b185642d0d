"""`FinetuneJob`: the one config of `drivedit finetune` / `jobs/finetune.py`.

Sections by concern: `model` (the base DiT), `data` (latent shards), `method` (what is trained,
owned by drivedit.config.method), `optim`, `scaling` (the only section that changes between a
laptop and a cluster), `run` (name, storage, checkpoints, restarts), `tracking` (MLflow),
`sampling` (the per-scenario sample grids), `ray`, and `drill` (fault injection to rehearse
recovery, off by default). Checks that need no I/O live here; checks that read the shards,
the base checkpoint or a resumed run live in `drivedit.train.preflight.check`.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from drivedit.config.base import StrictModel
from drivedit.config.common import (GUIDANCE_INTERVAL_FIELD, DtypeSetting, GuidanceInterval, RayConfig, ScalingConfig,
                                    TrackingConfig)
from drivedit.config.method import MethodConfig

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelSection(StrictModel):
    """The pretrained DiT the method adapts."""

    source: str = Field(
        "builtin:tiny-dit",
        description="base checkpoint: `builtin:<name>` (shipped with drivedit), an official DiT .pt, a DiT "
                    "train.py checkpoint, a .safetensors file or a diffusers DiTTransformer2DModel directory")
    name: str | None = Field(
        None, description="expected registry size of the base, e.g. DiT-XL/2; the job refuses a checkpoint of "
                          "another size. None: take whatever the checkpoint holds")
    class_names: list[str] | None = Field(
        None, description="names of the base model's classes, for semantic-init reports and `text` init; "
                          "default: ImageNet's for a 1000-class base, else none")
    grad_checkpointing: bool = Field(
        False, description="recompute block activations in the backward pass: less memory, ~30% more compute")
    compile: bool = Field(False, description="torch.compile the model (GPU workers only)")


class DataSection(StrictModel):
    """The latent shards written by `drivedit encode`."""

    shards: str = Field(..., description="directory (local or s3://) of latent shard Parquet files")
    probe_rows: int = Field(
        256, ge=1, description="shard rows read on each worker for gap measurement and semantic init")
    source_shards: str | None = Field(
        None, description="optional shards of source-domain latents (what the base was trained on) for the gap "
                          "measurement; without them the base model's own behaviour is the source reference")
    materialize: bool = Field(
        False, description="read the shards into Ray's object store once before training (with pyarrow, in the "
                           "driver) instead of streaming them every epoch (small datasets that fit in memory)")
    shuffle_buffer_rows: int = Field(
        0, ge=0, description="rows in each worker's local shuffle buffer on top of Ray Data's file shuffle "
                             "(0: off)")


class OptimSection(StrictModel):
    """AdamW over the trainable tensors, warmup then constant or cosine learning rate."""

    total_steps: int = Field(..., ge=1, description="optimizer steps of the whole run (a resumed run ends here)")
    global_batch_size: int = Field(
        ..., ge=1, description="images per optimizer step over all workers and accumulation micro-steps")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (method lr multipliers apply on top)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to `lr` over this many steps")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warmup: hold `lr`, or cosine-decay to `lr * min_lr_ratio` at total_steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of `lr`")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this (None: off)")
    ema_decay: float = Field(
        0.9999, ge=0, lt=1, description="EMA of the trainable tensors per step (0: the EMA is the raw weights)")
    bundle_weights: Literal["ema", "raw"] = Field(
        "ema", description="which weights the adapter bundle and the sample grids use")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="autocast dtype: auto = bf16 on GPU workers, fp32 on CPU workers")
    seed: int = Field(0, ge=0, description="base seed; rank r at step s draws from seed (seed, r, s)")

    @model_validator(mode="after")
    def _check(self) -> "OptimSection":
        problems = []
        if self.warmup_steps >= self.total_steps and self.warmup_steps > 0:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below total_steps ({self.total_steps})")
        b1, b2 = self.adam_betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            problems.append(f"adam_betas must lie in [0, 1), got {list(self.adam_betas)}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class RunSection(StrictModel):
    """Where the run lives. Rerunning with the same name and storage resumes it."""

    name: str = Field("finetune", description="run name: the directory under storage_path; reuse it to resume")
    storage_path: str = Field(
        "runs/finetune", description="local directory or s3:// prefix holding checkpoints, the bundle and "
                                     "(embedded tracking) the MLflow store")
    checkpoint_every: int = Field(100, ge=1, description="save a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="keep only the newest K checkpoints")
    max_failures: int = Field(
        0, ge=-1, description="worker failures Ray Train recovers from (restarting from the last checkpoint); "
                              "-1: unlimited")
    log_every: int = Field(10, ge=1, description="print a log line and log metrics every this many steps")

    @model_validator(mode="after")
    def _check(self) -> "RunSection":
        if not RUN_NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
        return self


class SamplingSection(StrictModel):
    """Sample grids (one row per scenario) drawn on rank 0 and logged to MLflow."""

    every_steps: int = Field(0, ge=0, description="draw a grid every this many steps (0: only at the end)")
    at_end: bool = Field(True, description="draw a grid after the last step")
    num_per_scenario: int = Field(4, ge=1, description="images per scenario row")
    sampler: Literal["ddim", "ddpm"] = Field("ddim", description="sampling loop")
    steps: int = Field(50, ge=1, description="sampling steps")
    guidance: float = Field(4.0, ge=1.0, description="classifier-free (or superclass) guidance scale")
    guidance_interval: GuidanceInterval = GUIDANCE_INTERVAL_FIELD
    seed: int = Field(0, ge=0, description="item i of a grid uses seed + i, so grids at different steps compare")
    dtype: DtypeSetting = Field(
        "auto", description="compute dtype of the grid's DiT and VAE decode: auto = bfloat16 where the device has it "
                            "natively (GPUs, CPUs with AVX512-BF16 or AMX), else float32; float16 on GPUs only")


class LayoutSection(StrictModel):
    """An optional layout branch trained beside the method (models/control.py), conditioned on the shards'
    per-category box layout map and, with use_segmentation, their segmentation."""

    kind: Literal["none", "controlnet", "light"] = Field(
        "none", description="none | controlnet (PixArt-δ's ControlNet-Transformer: trainable copies of the first "
                            "`depth` blocks, zero-initialised joins; ~18 D^2 parameters per block) | light (a small "
                            "conv layout encoder joined to the tokens and, after each of the first `depth` blocks, "
                            "as a per-token shift and scale; ~3 % of DiT-XL/2's parameters, ~4 % of its MACs)")
    depth: int | None = Field(
        None, ge=1, description="blocks the branch reaches: controlnet copies this many (default: 13 of 28, "
                                "PixArt-δ's share, i.e. depth * 13 // 28, at least 1), light modulates this many "
                                "(default: all)")
    width: int | None = Field(None, ge=1, description="light: layout encoder width (default hidden_size // 4)")
    drop_prob: float = Field(
        0.1, ge=0, lt=1, description="probability that an item's layout is dropped while training, so sampling can "
                                     "guide on the layout")
    use_segmentation: bool = Field(
        False, description="also feed the shards' segmentation (one-hot on the latent grid) to the branch; the "
                           "shards must carry segmentation classes")

    def resolved_depth(self, num_blocks: int) -> int:
        if self.depth is not None:
            return self.depth
        return max(1, num_blocks * 13 // 28) if self.kind == "controlnet" else num_blocks


class DrillSection(StrictModel):
    """Fault injection for rehearsing recovery. Each drill fires once per run (a marker in the run
    directory records it), so Ray Train's restart or a rerun of the job goes on past it."""

    stop_at_step: int | None = Field(
        None, ge=1, description="rank 0 raises after finishing this step and the run stops, as if the job were "
                                "stopped (max_failures permitting); rerun with the same run.name to resume")
    kill_rank_at_step: int | None = Field(
        None, ge=1, description="one worker process is killed (SIGKILL) after finishing this step")
    kill_rank: int = Field(1, ge=0, description="the rank that `kill_rank_at_step` kills")


class FinetuneJob(StrictModel):
    """Fine-tune a pretrained DiT on latent shards with a parameter-efficient method, on Ray Train."""

    model: ModelSection = Field(default_factory=ModelSection, description="the base model")
    data: DataSection = Field(..., description="the training data")
    method: MethodConfig = Field(default_factory=MethodConfig, description="what is trained and how")
    optim: OptimSection = Field(..., description="optimizer and schedule")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers")
    run: RunSection = Field(default_factory=RunSection, description="name, storage, checkpoints, restarts")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="sample grids")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")
    drill: DrillSection = Field(default_factory=DrillSection, description="fault-injection drills (off)")
    layout: LayoutSection = Field(default_factory=LayoutSection, description="an optional layout branch")

    @model_validator(mode="after")
    def _check(self) -> "FinetuneJob":
        problems = cross_field_problems(self.model, self.optim, self.scaling, self.run, self.tracking, self.drill)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def micro_batch_size(self) -> int:
        """Images one worker puts through the model per micro-step."""
        return self.optim.global_batch_size // (self.scaling.num_workers * self.optim.grad_accum_steps)


def cross_field_problems(model: ModelSection | None, optim: OptimSection | None, scaling: ScalingConfig | None,
                         run: RunSection | None, tracking: TrackingConfig | None,
                         drill: DrillSection | None) -> list[str]:
    """Checks across sections. A None section (one that failed its own validation) skips the checks
    that need it, so preflight can still report the others."""
    problems = []
    if optim and scaling:
        per_step = scaling.num_workers * optim.grad_accum_steps
        if optim.global_batch_size % per_step:
            problems.append(
                f"optim.global_batch_size ({optim.global_batch_size}) is not divisible by scaling.num_workers "
                f"x optim.grad_accum_steps ({scaling.num_workers} x {optim.grad_accum_steps} = {per_step}); "
                f"choose a multiple of {per_step}")
    if model and scaling and model.compile and not scaling.use_gpu:
        problems.append("model.compile needs GPU workers (scaling.use_gpu: true); turn it off on CPU")
    if optim and scaling and optim.precision == "bf16" and not scaling.use_gpu:
        problems.append("optim.precision bf16 needs GPU workers; use auto or fp32 on CPU")
    if run and tracking:
        problems += tracking_store_problems(run, tracking)
    if drill:
        problems += drill_problems(drill, optim.total_steps if optim else None, run.checkpoint_every if run else None,
                                   scaling.num_workers if scaling else None)
    return problems


def tracking_store_problems(run, tracking: TrackingConfig) -> list[str]:
    """A remote run.storage_path has no place for the embedded SQLite store (any Ray Train job's run section)."""
    remote = "://" in run.storage_path and not run.storage_path.startswith("file://")
    if remote and tracking.enabled and not tracking.tracking_uri:
        return [f"run.storage_path {run.storage_path} is remote, so the embedded SQLite tracking store has "
                f"no place to live; set tracking.tracking_uri to an MLflow server (http://host:5000)"]
    return []


def drill_problems(drill: DrillSection, total_steps: int | None, checkpoint_every: int | None,
                   num_workers: int | None) -> list[str]:
    """Drills that could not fire or could not be resumed from (None: that section is invalid, skip its checks)."""
    problems = []
    if drill.kill_rank_at_step is not None and num_workers is not None and drill.kill_rank >= num_workers:
        problems.append(f"drill.kill_rank {drill.kill_rank} does not exist with {num_workers} workers")
    for name in ("stop_at_step", "kill_rank_at_step"):
        at = getattr(drill, name)
        if at is None:
            continue
        if total_steps is not None and at >= total_steps:
            problems.append(f"drill.{name} ({at}) must be below optim.total_steps ({total_steps})")
        if checkpoint_every is not None and at < checkpoint_every:
            problems.append(f"drill.{name} ({at}) comes before the first checkpoint (run.checkpoint_every "
                            f"{checkpoint_every}): there would be nothing to resume from")
    return problems
