"""`GenerateJob`: the config of a synthetic-dataset generation job (`drivedit generate`).

Sections: `model` (what samples), `spec` (how many images of which scenario), `sampler` (how),
`output` (where), `scaling` (on what), `tracking` (MLflow), `ray` (which cluster). Checks that need
the model or an existing dataset (scenario vocabulary, balance counts, spec hash of an output that
already exists) run in the job before any sampling; the checks here need only the config.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from drivedit.config.base import StrictModel
from drivedit.config.common import (GUIDANCE_INTERVAL_FIELD, CodecConfig, DtypeSetting, GuidanceInterval, RayConfig,
                                    ScalingConfig, TrackingConfig)

FRACTION_TOLERANCE = 1e-6


class ModelSection(StrictModel):
    """The model that samples, and how to read its scenario names."""

    ref: str = Field(
        ..., description="`models:/NAME/VERSION` (an MLflow registered bundle), a bundle directory or URI "
                         "(local or s3://), or a DiT checkpoint (official .pt, train.py dict, safetensors, "
                         "diffusers directory)")
    class_names: list[str] | dict[str, int] | None = Field(
        None, description="checkpoints only (bundles carry their vocabulary): scenario names for class ids, "
                          "either a list (name i is class id i) or a mapping {name: class id}, e.g. "
                          "{snowplow: 803} for an ImageNet DiT")
    codec: CodecConfig | None = Field(
        None, description="how latents become images; default: the bundle's codec, or for a checkpoint the "
                          "pixel codec (3 latent channels) or sd-vae-ft-ema (4 latent channels)")


class BalanceSection(StrictModel):
    """Fill in what an existing dataset lacks so that every scenario reaches the same count."""

    source: str = Field(
        ..., description="an existing dataset: a BDD100K-format label file (.json), or a directory / URI of "
                         "latent shards (.parquet)")
    target: int | None = Field(
        None, ge=1, description="the count every scenario should reach; default: the count of the most "
                                "common scenario in the source")
    scenarios: list[str] | None = Field(
        None, description="the scenarios to fill; default: every scenario of the model's vocabulary")


# a side in output pixels (>= 0), or `token`: one DiT token's side (generate/undrawable.py resolves it)
IgnoreUnder = Annotated[float, Field(ge=0)] | Literal["token"]
IGNORE_UNDER_FIELD = Field(  # spec.layouts' and spec.transfer's
    "token", description="boxes whose side (sqrt of the area, in output pixels) is under this are written as ignore "
                         "regions (attributes {\"ignore\": true, \"marked_by\": ...}) rather than as objects: the "
                         "model cannot promise an object smaller than one of its tokens (BENCHMARKS.md: the real-only "
                         "detector finds 1-43 % of the generated objects under 16 px at 128 px, 92-100 % above). "
                         "`token`: one DiT token's side in output pixels (patch size x the codec's downsampling x "
                         "output / native size); 0: every box an object label")


class LayoutsSection(StrictModel):
    """Generate from the layouts of real frames: each source frame's boxes, rendered under every requested
    scenario, `variants` images each (a model with a layout branch). The dataset's labels.json holds the
    boxes and the manifest names the source frame; a branch trained on segmentation also reads each frame's
    mask, which the image gets under labels/sem_seg/masks/ (docs/generated-datasets.md)."""

    source: str = Field(
        ..., description="a BDD100K-format label file (.json, its images under `images`) or a directory / URI of "
                         "latent shards (format 2, with boxes)")
    images: str | None = Field(
        None, description="BDD100K source: the folder its image names are relative to (the image sizes place the "
                          "boxes); default: `images/` beside the label file")
    resize: Literal["crop", "stretch"] = Field(
        "crop", description="BDD100K source: how a source image maps to the square output, as `drivedit encode` "
                            "did for the training shards (`crop`: short side, centre crop; `stretch`)")
    scenarios: list[str] = Field(..., min_length=1, description="the scenarios each layout is rendered under")
    variants: int = Field(1, ge=1, description="images per (source frame, scenario), each with its own seed")
    limit: int | None = Field(None, ge=1, description="use only the first `limit` source frames (in source order)")
    layout_guidance: float = Field(
        4.0, ge=1.0, description="guidance on the layout (1: none), on top of sampler.guidance on the scenario; 4 "
                                 "holds the boxes best at no cost in condition accuracy (BENCHMARKS.md, layout branches)")
    ignore_under: IgnoreUnder = IGNORE_UNDER_FIELD


class TransferSection(StrictModel):
    """Condition transfer (SDEdit): real labelled frames re-rendered into target scenarios, labels carried over.

    Checked with the model's vocabulary before sampling (generate/transfer.py), so that a bad strength,
    an unknown target and a source without labels are reported together.
    """

    source: str = Field(..., description="a labelled dataset folder (local or s3://) in `format`")
    format: Literal["bdd100k", "ithaca365", "coco"] = Field(
        "bdd100k", description="the source's format, read as the encode job reads it (drivedit.data.sources)")
    labels: str | None = Field(None, description="the label file; default: the format's place under `source`")
    images: str | None = Field(None, description="the images folder; default: the format's place under `source`")
    targets: list[str] = Field(..., description="scenarios each source frame is re-rendered into (one image each)")
    strength: float = Field(
        0.6, description="SDEdit strength s in (0, 1]: the source latent is noised to t = s * T and denoised "
                         "under the target; low s keeps the frame (and its labels), high s follows the target")
    start: Literal["noise", "inversion"] = Field(
        "noise", description="how the source latent reaches t = s * T: `noise` draws it there (q_sample, SDEdit: "
                             "each item's seed decides the noise); `inversion` runs the model's deterministic "
                             "DDIM ODE up to it, label-free, so the start keeps the source's structure and the "
                             "denoising under the target redraws less of it (DDIB)")
    max_frames: int | None = Field(None, ge=1, description="use only the first N labelled source frames")
    layout_guidance: float | None = Field(
        None, ge=1.0, description="with a model that has a layout branch: steer the denoising with the branch on "
                                  "each source frame's own carried boxes (and mask, if the branch reads "
                                  "segmentation), with this guidance (>= 1) on the layout as spec.layouts does (1: the "
                                  "branch on, unguided; 4 as spec.layouts). null: plain SDEdit, the branch silent. "
                                  "A model without a branch refuses it")
    ignore_under: IgnoreUnder = IGNORE_UNDER_FIELD


class SpecSection(StrictModel):
    """What to generate: exactly one of `counts`, `fractions` with `total`, `balance`, `layouts` or `transfer`."""

    counts: dict[str, int] | None = Field(
        None, description="images per scenario, e.g. {rainy: 500, snowy: 500, night: 1000}")
    total: int | None = Field(None, ge=1, description="total number of images, split by `fractions`")
    fractions: dict[str, float] | None = Field(
        None, description="share of `total` per scenario; must sum to 1 (counts are rounded by largest "
                          "remainder, so they add up to `total` exactly)")
    balance: BalanceSection | None = Field(
        None, description="generate what each scenario of an existing dataset lacks to reach the same count")
    layouts: LayoutsSection | None = Field(
        None, description="render the layouts of real frames under chosen scenarios (needs a layout branch)")
    transfer: TransferSection | None = Field(
        None, description="re-render real labelled frames into target scenarios (SDEdit), keeping their labels")
    base_seed: int = Field(0, ge=0, description="item i is sampled with seed base_seed + i, so reruns reproduce")
    shard_size: int = Field(
        64, ge=1, le=100_000, description="items per output shard (`images/<shard>/`); a shard is the unit of "
                                          "work and of resumption")

    @model_validator(mode="after")
    def _one_mode(self) -> "SpecSection":
        problems = []
        modes = [name for name, on in (("counts", self.counts is not None),
                                       ("fractions", self.fractions is not None or self.total is not None),
                                       ("balance", self.balance is not None),
                                       ("layouts", self.layouts is not None),
                                       ("transfer", self.transfer is not None)) if on]
        if len(modes) != 1:
            problems.append("give exactly one of `counts`, `fractions` with `total`, `balance`, `layouts` or "
                            "`transfer` "
                            f"(got {', '.join(modes) or 'none'})")
        if self.counts is not None:
            negative = [f"{k}={v}" for k, v in self.counts.items() if v < 0]
            if negative:
                problems.append(f"counts must be >= 0, got {', '.join(negative)}")
            if not negative and sum(self.counts.values()) == 0:
                problems.append("counts ask for no images at all; give at least one scenario a count > 0")
        if (self.fractions is None) != (self.total is None):
            problems.append("`fractions` and `total` go together: give both or neither")
        if self.fractions is not None:
            bad = [f"{k}={v}" for k, v in self.fractions.items() if not (0 <= v <= 1) or math.isnan(v)]
            if bad:
                problems.append(f"fractions must lie in [0, 1], got {', '.join(bad)}")
            s = sum(self.fractions.values())
            if not bad and abs(s - 1.0) > FRACTION_TOLERANCE:
                problems.append(f"fractions must sum to 1, they sum to {s:.6g} "
                                f"({' + '.join(f'{k}={v}' for k, v in self.fractions.items())})")
        empty = [k for k in [*(self.counts or {}), *(self.fractions or {})] if not k.strip()]
        if empty:
            problems.append("scenario names must not be empty")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class SamplerSection(StrictModel):
    """How each image is sampled. Everything here except `batch_size` and `dtype` is part of the spec hash."""

    sampler: Literal["ddim", "ddpm"] = Field("ddim", description="DDIM (deterministic, eta 0) or DDPM (ancestral)")
    steps: int = Field(50, ge=1, le=1000, description="denoising steps")
    guidance: float = Field(4.0, ge=1.0, description="guidance scale; 1 turns guidance off")
    guidance_kind: Literal["cfg", "superclass"] = Field(
        "cfg", description="`cfg`: classifier-free (null label); `superclass`: FineDiffusion's superclass "
                           "guidance, which needs a model with a tiered embedder")
    guide_channels: int | None = Field(
        None, ge=1, description="guide only the first k latent channels (the official sample.py guides 3); "
                                "default: all latent channels, as diffusers' DiTPipeline")
    guidance_interval: GuidanceInterval = GUIDANCE_INTERVAL_FIELD
    batch_size: int = Field(16, ge=1, description="images per forward pass on one actor")
    dtype: DtypeSetting = Field(
        "float32", description="autocast dtype of the DiT: float16 needs GPU actors, bfloat16 runs anywhere, auto = "
                               "bfloat16 where the actor's device has it natively (GPUs, CPUs with AVX512-BF16 or "
                               "AMX), else float32")


class OutputSection(StrictModel):
    """Where the dataset goes and what its images look like."""

    uri: str = Field(..., description="output directory, local or s3://bucket/prefix")
    image_size: int | None = Field(
        None, ge=8, le=4096, description="side of the written PNGs; default: the model's native resolution "
                                         "(its position table fixes the sampling grid), other sizes are "
                                         "resized from it with Lanczos")
    label_formats: list[Literal["coco", "yolo"]] = Field(
        default_factory=list, description="label formats to write beside labels.json once the dataset is "
                                          "complete: `coco` (coco.json) and / or `yolo` (labels/<shard>/<index>.txt "
                                          "+ dataset.yaml for ultralytics), from the same boxes")
    decode_on: Literal["cpu", "actor"] = Field(
        "cpu", description="`cpu`: latents are decoded to images by CPU tasks, so sampler actors only sample; "
                           "`actor`: the sampler actor decodes on its own device (a big VAE on few CPUs)")


class GenerateScaling(ScalingConfig):
    """Sampler actors and the CPU tasks that decode and write."""

    num_workers: int | None = Field(
        None, ge=1, description="sampler actors; default: one per GPU of the cluster with use_gpu, else 1")
    cpus_per_write_task: float = Field(1.0, gt=0, description="CPUs reserved by each decode + PNG + write task")


class GenerateJob(StrictModel):
    """A generation job: model + spec -> images/<shard>/<index>.png, labels.json, manifest.parquet, spec.json."""

    model: ModelSection = Field(..., description="the model that samples")
    spec: SpecSection = Field(..., description="how many images of which scenario")
    sampler: SamplerSection = Field(default_factory=SamplerSection, description="how each image is sampled")
    output: OutputSection = Field(..., description="where the dataset goes")
    scaling: GenerateScaling = Field(default_factory=GenerateScaling, description="actors and tasks")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")
    ray: RayConfig = Field(default_factory=RayConfig, description="which Ray cluster")

    @model_validator(mode="after")
    def _cross_checks(self) -> "GenerateJob":
        problems = []
        if self.sampler.guidance_kind == "superclass" and self.sampler.guidance == 1.0:
            problems.append("sampler.guidance_kind is `superclass` but sampler.guidance is 1, which turns "
                            "guidance off; raise sampler.guidance or use guidance_kind `cfg`")
        if self.model.class_names is not None and self.model.ref.startswith("models:/"):
            problems.append("model.class_names is for checkpoints; a registered bundle (models:/...) carries "
                            "its own scenario vocabulary, remove model.class_names")
        if isinstance(self.model.class_names, list) and len(set(self.model.class_names)) != len(self.model.class_names):
            problems.append("model.class_names has duplicate names")
        if isinstance(self.model.class_names, dict):
            ids = list(self.model.class_names.values())
            if any(i < 0 for i in ids):
                problems.append("model.class_names: class ids must be >= 0")
            if len(set(ids)) != len(ids):
                problems.append("model.class_names maps two names to one class id")
        if self.scaling.use_gpu is False and self.sampler.dtype == "float16":
            problems.append("sampler.dtype float16 needs scaling.use_gpu: true (a CPU has no fast float16); "
                            "on CPU actors use bfloat16 or auto")
        if problems:
            raise ValueError("\n".join(problems))
        return self
