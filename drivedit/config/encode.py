"""`EncodeJob`: the config of `drivedit encode` (a BDD100K, Ithaca365 or COCO dataset -> latent shards)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drivedit.config.base import StrictModel
from drivedit.config.common import DEFAULT_SCENARIOS, CodecConfig, RayConfig, ScalingConfig

# BDD100K det_20's ten box classes; the older image-label names person / bike / motor count as
# pedestrian / bicycle / motorcycle (drivedit.data.bdd100k.CATEGORY_ALIASES)
DEFAULT_CATEGORIES = ["pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
                      "traffic light", "traffic sign"]


class EncodeDataConfig(StrictModel):
    """What to read, what to write, and which frames and objects count."""

    input: str = Field(description="dataset root (local path or s3://bucket/prefix)")
    output: str = Field(description="where the latent shards go (local path or s3://bucket/prefix)")
    format: Literal["bdd100k", "ithaca365", "coco"] = Field(
        "bdd100k", description="how the dataset is laid out: bdd100k (labels JSON, images/, labels/sem_seg/masks/), "
                               "ithaca365 (the v2.2 nuScenes-devkit tables), coco (a COCO detection JSON)")
    labels: str | None = Field(
        None, description="bdd100k: the label JSON (image labels or det_20), default <input>/labels.json; "
                          "ithaca365: the folder of the v2.2 tables, default <input>/v2.2; coco: the COCO JSON, "
                          "default <input>/annotations.json")
    images: str | None = Field(
        None, description="folder the image names are relative to; default <input>/images (ithaca365: <input>, "
                          "the dataroot its sample_data filenames are relative to)")
    segmentation: str | None = Field(
        None, description="bdd100k: folder of semantic segmentation masks (<image stem>.png, uint8 train ids); "
                          "default <input>/labels/sem_seg/masks; frames without a mask get none")
    scenario_attribute: str | None = Field(
        None, description="coco: the field of each `images` entry that names its scenario (e.g. weather)")
    scenario_map: str | None = Field(
        None, description="coco: a JSON file {image file_name or id: scenario name}, instead of or over "
                          "scenario_attribute")
    resolution: int = Field(256, ge=8, description="square side in pixels after the resize (and crop); must be "
                                                   "divisible by the codec's downsampling factor")
    resize: Literal["crop", "stretch"] = Field(
        "crop", description="crop: short side to `resolution`, then center crop (boxes the crop cuts are clipped "
                            "or dropped, and counted); stretch: both sides to `resolution` without keeping the "
                            "aspect (DriveDiTFit on Ithaca365)")
    scenarios: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCENARIOS),
        description="ordered scenario vocabulary; ids are positions in this list and travel with the shards")
    night_scenario: str | None = Field(
        "night", description="scenario every timeofday=night frame gets whatever its weather; null: use weather")
    drop_weathers: list[str] = Field(
        default_factory=lambda: ["undefined", "foggy"], description="weathers whose frames are dropped (counted)")
    object_categories: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CATEGORIES),
        description="the box category vocabulary, in id order: these boxes go into the shards (ids are positions "
                    "here; the layout map has one channel each); other categories are ignored")
    min_box_cells: float = Field(
        2.0, ge=0, description="boxes covering fewer latent cells than this (area on the latent grid) are left out "
                               "of the object mask and layout map (they stay in the boxes column)")
    min_box_side_cells: float = Field(
        0.0, ge=0, description="boxes narrower or shorter than this many latent cells are left out of the object "
                               "mask and layout map (DriveDiTFit: 2)")
    limit: int | None = Field(None, ge=1, description="encode only the first N kept frames (smoke runs)")

    @model_validator(mode="after")
    def _check(self):
        problems = []
        if not self.scenarios:
            problems.append("scenarios: give at least one scenario name")
        if len(set(self.scenarios)) != len(self.scenarios):
            problems.append(f"scenarios: names must be unique, got {self.scenarios}")
        if self.night_scenario is not None and self.night_scenario not in self.scenarios:
            problems.append(f"night_scenario: {self.night_scenario!r} is not in scenarios "
                            f"{self.scenarios}; add it there or set night_scenario: null")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            problems.append("output: must differ from input (shards would mix with the images)")
        if len(set(self.object_categories)) != len(self.object_categories):
            problems.append(f"object_categories: names must be unique, got {self.object_categories}")
        if self.format == "coco" and not (self.scenario_attribute or self.scenario_map):
            problems.append("scenario_attribute / scenario_map: a COCO dataset needs one of them to give each image "
                            "its scenario (an `images` field such as weather, or a JSON file {file_name: scenario})")
        if self.format != "coco":
            for name in ("scenario_attribute", "scenario_map"):
                if getattr(self, name) is not None:
                    problems.append(f"{name}: only used with format: coco (this is {self.format}); remove it")
        if self.format != "bdd100k" and self.segmentation is not None:
            problems.append(f"segmentation: only BDD100K-format datasets have mask folders (this is {self.format}); "
                            "remove it")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class ShardConfig(StrictModel):
    """How rows are grouped into Parquet files."""

    rows_per_shard: int = Field(512, ge=1, description="frames per shard file; frame k of the kept list goes to "
                                                       "shard k // rows_per_shard, so reruns are deterministic")
    compression: str = Field("zstd", description="Parquet compression codec (zstd, snappy, gzip, none)")


class PipelineConfig(StrictModel):
    """Batching of the Ray Data stages."""

    # 64 / 64: on 2 CPU cores the pipeline measured 1.45x the plain loop where 16 / 32 gave 1.17x (fewer,
    # larger tasks pay less scheduling and serialisation per frame; BENCHMARKS.md)
    read_batch_size: int = Field(64, ge=1, description="frames per read + decode task")
    encode_batch_size: int = Field(64, ge=1, description="images per codec call (each also encodes its mirror)")
    max_read_tasks: int | None = Field(
        None, ge=1, description="cap on concurrent read/decode tasks; default: as many as free CPUs allow")
    read_cpus: float = Field(
        0.5, gt=0, description="CPUs per read/decode task; under 1 lets one task's I/O wait overlap another's "
                               "decoding (keep it different from scaling.cpus_per_worker on CPU-only runs, or Ray "
                               "fuses reading into the codec actors)")
    io_threads: int = Field(8, ge=1, description="concurrent reads per read task (object stores are "
                                                 "latency-bound; 1 reads one file after another)")
    read_retries: int = Field(3, ge=0, description="retries of a failed read before the frame is listed as unreadable")


class EncodeJob(StrictModel):
    """`drivedit encode`: a BDD100K, Ithaca365 or COCO dataset (local or s3://) -> latent shards (Parquet)."""

    data: EncodeDataConfig
    codec: CodecConfig = Field(default_factory=CodecConfig, description="the latent codec")
    shards: ShardConfig = Field(default_factory=ShardConfig, description="shard files")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Ray Data batching")
    scaling: ScalingConfig = Field(
        default_factory=ScalingConfig,
        description="codec actors: num_workers actors, one GPU each when use_gpu, cpus_per_worker CPUs each")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")
