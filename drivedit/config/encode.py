"""`EncodeJob`: the config of `drivedit encode` (BDD100K-layout dataset -> latent shards)."""
from __future__ import annotations

from pydantic import Field, model_validator

from drivedit.config.base import StrictModel
from drivedit.config.common import DEFAULT_SCENARIOS, CodecConfig, RayConfig, ScalingConfig

DEFAULT_CATEGORIES = ["car", "truck", "bus", "train", "pedestrian", "person", "rider", "bicycle", "bike",
                      "motorcycle", "motor", "traffic light", "traffic sign"]


class EncodeDataConfig(StrictModel):
    """What to read, what to write, and which frames and objects count."""

    input: str = Field(description="dataset root (local path or s3://bucket/prefix) in the BDD100K layout: "
                                   "images under <input>/images, labels in <input>/labels.json")
    output: str = Field(description="where the latent shards go (local path or s3://bucket/prefix)")
    labels: str | None = Field(
        None, description="the label JSON (BDD100K image labels or det_20); default <input>/labels.json")
    images: str | None = Field(
        None, description="folder the label names are relative to; default <input>/images")
    resolution: int = Field(256, ge=8, description="square side in pixels after resize + center crop; must be "
                                                   "divisible by the codec's downsampling factor")
    scenarios: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCENARIOS),
        description="ordered scenario vocabulary; ids are positions in this list and travel with the shards")
    night_scenario: str | None = Field(
        "night", description="scenario every timeofday=night frame gets whatever its weather; null: use weather")
    drop_weathers: list[str] = Field(
        default_factory=lambda: ["undefined", "foggy"], description="weathers whose frames are dropped (counted)")
    object_categories: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CATEGORIES),
        description="box categories rasterised into the object mask; others are ignored")
    min_box_cells: float = Field(
        2.0, ge=0, description="boxes covering fewer latent cells than this (area on the latent grid) are skipped")
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
    """`drivedit encode`: a BDD100K-layout dataset (local or s3://) -> latent shards (Parquet)."""

    data: EncodeDataConfig
    codec: CodecConfig = Field(default_factory=CodecConfig, description="the latent codec")
    shards: ShardConfig = Field(default_factory=ShardConfig, description="shard files")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Ray Data batching")
    scaling: ScalingConfig = Field(
        default_factory=ScalingConfig,
        description="codec actors: num_workers actors, one GPU each when use_gpu, cpus_per_worker CPUs each")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")
