"""`DetectJob`: train a 2-D object detector on BDD100K-format datasets and score it on held-out frames."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drivedit.config.base import StrictModel
from drivedit.config.common import DEFAULT_SCENARIOS, CodecConfig, RayConfig, ScalingConfig, TrackingConfig
from drivedit.config.finetune import DrillSection, RunSection, drill_problems, tracking_store_problems

# BDD100K's ten detection categories (det_20), and the older image-label names that mean the same thing
BDD100K_CATEGORIES = ["pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
                      "traffic light", "traffic sign"]
BDD100K_ALIASES = {"person": "pedestrian", "motor": "motorcycle", "bike": "bicycle"}


class TrainSource(StrictModel):
    """One training dataset of the mix."""

    uri: str = Field(..., description="BDD100K-format folder (images/ + labels.json), local or s3://")
    weight: float = Field(1.0, gt=0, description="sampling weight: the share of each batch drawn from this "
                                                 "dataset is weight / sum of weights")
    per_step: int | None = Field(
        None, ge=1, description="instead of `weight`: exactly this many images of every step's batch (over all "
                                "workers) come from this dataset, drawn from its own random stream, so adding a "
                                "dataset leaves the others' draws unchanged; give it for every dataset or none "
                                "(their sum is optim.global_batch_size)")
    labels_file: str | None = Field(
        None, description="this dataset's label file inside its folder (default: data.labels_file), e.g. one "
                          "that drivedit.detect.unlabelled wrote beside the generated labels")
    learn_background: bool = Field(
        True, description="false: this dataset's frames teach only their boxes: no anchor or proposal of them is "
                          "sampled as background (fasterrcnn only), for generated frames whose unlabelled content "
                          "cannot be trusted to be background")
    ignore_under: float = Field(
        0.0, ge=0, description="boxes of this dataset whose side (square root of the area, in data.image_size "
                               "pixels) is under this become ignore regions: anchors and proposals mostly inside "
                               "them are neither objects nor background (fasterrcnn only; so are boxes whose "
                               "attributes say \"ignore\": true). For generated data "
                               "whose small boxes do not hold: `drivedit eval`'s layout fidelity by object size "
                               "says which sizes do; COCO's medium/large limit at 128 px is 19.2")


class DetectDataSection(StrictModel):
    """Datasets, categories and the image size everything is scored at."""

    train: list[TrainSource] = Field(default_factory=list, description="training datasets with weights "
                                                                       "(real frames, generated datasets)")
    val: str | None = Field(None, description="held-out BDD100K-format folder the detector is scored on")
    labels_file: str = Field("labels.json", description="label file inside each folder")
    categories: list[str] = Field(
        default_factory=lambda: list(BDD100K_CATEGORIES),
        description="detected categories in order (COCO category id = position + 1); boxes of other "
                    "categories are dropped and counted")
    category_map: dict[str, str] = Field(
        default_factory=lambda: dict(BDD100K_ALIASES),
        description="dataset category name -> one of `categories` (BDD100K's older names by default)")
    scenarios: list[str] = Field(default_factory=lambda: list(DEFAULT_SCENARIOS),
                                 description="scenario vocabulary for per-scenario scores (night wins over weather)")
    image_size: int = Field(128, ge=32, description="images are resized to image_size x image_size (boxes "
                                                    "scaled with them); scores are in these pixels")
    hflip: bool = Field(True, description="mirror half of the training images (and their boxes)")
    cache_images: bool = Field(True, description="keep decoded, resized training images in worker memory")


class DiTBackboneSection(StrictModel):
    """The DiT-feature backbone: codec -> noise to timestep t -> DiT blocks -> simple feature pyramid."""

    source: str = Field("builtin:tiny-dit", description="DiT to take features from: builtin:NAME, a checkpoint, "
                                                        "an adapter bundle directory or models:/NAME/VERSION")
    class_names: list[str] | None = Field(
        None, description="names of a plain checkpoint's class ids (a bundle carries its vocabulary)")
    codec: CodecConfig | None = Field(None, description="the codec the DiT works in (default: the bundle's, or "
                                                        "pixel for a 3-channel checkpoint)")
    timestep: int = Field(20, ge=0, le=999, description="diffusion timestep the latents are noised to (20 scored "
                                                         "best of 20/100/300/600 on the demo data: README)")
    feature_blocks: list[int] = Field(
        default_factory=lambda: [-1], description="blocks whose output tokens are the features (concatenated; "
                                                  "negative counts from the last block)")
    train_from_block: int | None = Field(
        None, description="blocks from this index on are trained with the head; earlier ones stay frozen "
                          "(None: the whole DiT is frozen)")
    scenario_label: bool = Field(True, description="condition on each frame's scenario when the DiT knows it "
                                                   "(else, and when false, the null label)")


class DetectorSection(StrictModel):
    """The detector: a torchvision detection head on a ResNet-FPN or on DiT features."""

    arch: Literal["fasterrcnn", "fcos", "retinanet"] = Field(
        "fasterrcnn", description="torchvision detection model (anchors sized for image_size)")
    backbone: Literal["resnet18", "resnet34", "resnet50", "dit"] = Field(
        "resnet18", description="ResNet-FPN (torchvision's resnet_fpn_backbone) or `dit` (see model.dit)")
    fpn_channels: int = Field(64, ge=8, description="channels of every pyramid level (ResNet-FPN or the DiT's simple "
                                                    "pyramid); torchvision uses 256, 64 keeps the heads cheap on CPU")
    weights: str | None = Field(
        None, description="torchvision-format weights file (.pth/.pt/.safetensors) of the whole detector or of its "
                          "ResNet; default: random initialisation")
    ref: str | None = Field(
        None, description="an existing detector: a `detector` folder of a run, or models:/NAME/VERSION; "
                          "scored by --eval-only, else training starts from it")
    dit: DiTBackboneSection = Field(default_factory=DiTBackboneSection, description="the DiT-feature backbone")


class DetectOptimSection(StrictModel):
    """Optimizer and schedule."""

    total_steps: int = Field(300, ge=1, description="optimizer steps")
    global_batch_size: int = Field(16, ge=1, description="images per step over all workers")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="after warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    grad_clip: float = Field(10.0, ge=0, description="clip the gradient norm (0: off)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    seed: int = Field(0, ge=0, description="step s of rank r draws its batch and noise from (seed, r, s)")


class DetectEvalSection(StrictModel):
    """How the validation set is scored."""

    every_steps: int = Field(0, ge=0, description="score the validation set every this many steps (0: at the end)")
    batch_size: int = Field(16, ge=1, description="validation images per forward pass")
    score_threshold: float = Field(0.01, ge=0, lt=1, description="drop detections scoring below this")
    max_detections: int = Field(100, ge=1, description="detections kept per image (COCO scores the top 100)")
    coco_reference_size: int = Field(
        640, ge=1, description="COCO's small/medium/large limits (32 and 96 px sides) are scaled by "
                               "image_size / this (COCO images are about 640 px on the long side)")


class DetectRunSection(RunSection):
    """Where the run lives. Rerunning with the same name and storage resumes it."""

    name: str = Field("detect", description="run name: the directory under storage_path; reuse it to resume")
    storage_path: str = Field(
        "runs/detect", description="local directory or s3:// prefix holding checkpoints, the detector, scores "
                                   "and (embedded tracking) the MLflow store")
    checkpoint_every: int = Field(100, ge=1, description="save a checkpoint every this many steps (and at the end)")


class DetectJob(StrictModel):
    """Train a 2-D object detector on a weighted mix of BDD100K-format datasets (Ray Train) and score it
    with the COCO evaluator per category, scenario and object size."""

    model: DetectorSection = Field(default_factory=DetectorSection, description="the detector")
    data: DetectDataSection = Field(default_factory=DetectDataSection, description="datasets and categories")
    optim: DetectOptimSection = Field(default_factory=DetectOptimSection, description="optimizer and schedule")
    eval: DetectEvalSection = Field(default_factory=DetectEvalSection, description="scoring")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers")
    run: DetectRunSection = Field(default_factory=DetectRunSection, description="name, storage, checkpoints")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")
    drill: DrillSection = Field(default_factory=DrillSection, description="fault-injection drills (off)")

    @model_validator(mode="after")
    def _check(self) -> "DetectJob":
        problems = []
        if self.optim.global_batch_size % self.scaling.num_workers:
            problems.append(f"optim.global_batch_size ({self.optim.global_batch_size}) is not divisible by "
                            f"scaling.num_workers ({self.scaling.num_workers})")
        if self.model.arch == "fcos" and self.model.fpn_channels % 32:
            problems.append(f"model.fpn_channels ({self.model.fpn_channels}) must be a multiple of 32 for fcos "
                            "(its head normalises in 32 groups)")
        if self.optim.precision == "bf16" and not self.scaling.use_gpu:
            problems.append("optim.precision bf16 needs GPU workers; use auto or fp32 on CPU")
        if len(set(self.data.categories)) != len(self.data.categories) or not self.data.categories:
            problems.append(f"data.categories must be unique and non-empty, got {self.data.categories}")
        # mapping to a BDD100K category left out of `categories` drops those boxes (counted); anything else is a typo
        bad = {k: v for k, v in self.data.category_map.items()
               if v not in self.data.categories and v not in BDD100K_CATEGORIES}
        if bad:
            problems.append(f"data.category_map maps to names that are neither in data.categories nor BDD100K "
                            f"categories: {bad}")
        problems += _per_step_problems(self)
        ignoring = [src.uri for src in self.data.train if src.ignore_under > 0 or not src.learn_background]
        if ignoring and self.model.arch != "fasterrcnn":
            problems.append(f"data.train: ignore_under or learn_background: false is set for {ignoring}, but "
                            f"model.arch {self.model.arch!r} cannot ignore regions; use fasterrcnn or drop them")
        problems += tracking_store_problems(self.run, self.tracking)
        problems += drill_problems(self.drill, self.optim.total_steps, self.run.checkpoint_every,
                                   self.scaling.num_workers)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def fixed_counts(self) -> bool:
        """Whether each dataset gives a fixed number of images per step (`per_step`) instead of a weighted share."""
        return any(src.per_step is not None for src in self.data.train)

    @property
    def micro_batch_size(self) -> int:
        return self.optim.global_batch_size // self.scaling.num_workers


def _per_step_problems(job: DetectJob) -> list[str]:
    counts = [src.per_step for src in job.data.train]
    if all(c is None for c in counts):
        return []
    if any(c is None for c in counts):
        return [f"data.train: per_step is given for some datasets and not others ({counts}); give it for every "
                "dataset or for none"]
    problems = []
    if sum(counts) != job.optim.global_batch_size:
        problems.append(f"data.train: the per_step counts sum to {sum(counts)}, but optim.global_batch_size is "
                        f"{job.optim.global_batch_size}; make them equal")
    odd = [c for c in counts if c % job.scaling.num_workers]
    if odd:
        problems.append(f"data.train: per_step counts {odd} are not divisible by scaling.num_workers "
                        f"({job.scaling.num_workers})")
    return problems
