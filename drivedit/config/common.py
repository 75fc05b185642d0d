"""Config sections shared by several jobs. Each job's root model lives in its own module here."""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from drivedit.config.base import StrictModel

DEFAULT_SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]


def _ordered_interval(v: tuple[float, float] | None) -> tuple[float, float] | None:
    if v is not None and not (all(map(math.isfinite, v)) and 0 <= v[0] < v[1]):
        raise ValueError(f"must be [lo, hi] with 0 <= lo < hi, got {list(v)}")
    return v


GuidanceInterval = Annotated[tuple[float, float] | None, AfterValidator(_ordered_interval)]
# one definition for generate's and serve's `sampler`, the fine-tune's `sampling` and the downstream bench's `synthetic`
GUIDANCE_INTERVAL_FIELD = Field(
    None, description="guide only the steps whose noise level sigma = sqrt((1 - abar_t) / abar_t) lies in (lo, hi]; "
                      "the rest take one plain conditional forward instead of two (three with a layout). "
                      "Kynkaenniemi et al. 2024: guidance harms at high noise and idles at low noise; their "
                      "(0.28, 5.42] is half of DDPM-50's steps (t = 82..571 on DiT's betas). null: every step")


# compute dtypes (drivedit/models/precision.py resolves them per device; its DTYPE_SETTINGS are these)
DtypeSetting = Literal["float32", "float16", "bfloat16", "auto"]


class CodecConfig(StrictModel):
    """How images become latents and back."""

    kind: Literal["pixel", "autoencoder_kl"] = Field(
        "pixel", description="`pixel`: identity on [-1, 1] images (tiny demos); `autoencoder_kl`: a diffusers VAE")
    source: str | None = Field(
        None, description="AutoencoderKL: a local diffusers directory or a hub id such as stabilityai/sd-vae-ft-ema "
                          "(hub ids need the weights in the local Hugging Face cache when offline)")
    scale_factor: float | None = Field(
        None, description="latent scale; default: the VAE config's scaling_factor (0.18215 for sd-vae-ft-*)")
    dtype: DtypeSetting = Field(
        "float32", description="dtype of the codec's weights: float16 on GPUs only (a CPU keeps float32), "
                               "bfloat16 anywhere, auto = bfloat16 where the device has it natively (GPUs, CPUs "
                               "with AVX512-BF16 or AMX: 3x the tiny VAE's images/s on a 2-core EPYC), else float32")


class RayConfig(StrictModel):
    """Where the job's Ray work runs."""

    address: str | None = Field(
        None, description="Ray address; None joins the cluster this job was submitted to, or starts a local Ray")
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a local Ray started by the job (ignored when joining a cluster)")
    worker_niceness: int = Field(
        0, ge=0, le=19, description="niceness of the worker processes of a local Ray started by the job: 0 = the "
                                    "job's own priority; Ray's default, 15, gives every other process on the machine "
                                    "28x their CPU weight (ignored when joining a cluster)")


class TrackingConfig(StrictModel):
    """MLflow: where runs, metrics, artifacts and registered models go."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:///path.db); default: an SQLite "
                          "store under the job's run directory")
    experiment: str = Field("drivedit", description="MLflow experiment name")
    registered_model: str | None = Field(
        None, description="register the produced bundle as a new version of this model name")
    enabled: bool = Field(True, description="turn MLflow off entirely (runs still write their files)")


class ScalingConfig(StrictModel):
    """How many Ray workers and what each one takes. Only this section changes between a laptop and a cluster."""

    num_workers: int = Field(1, ge=1, description="number of workers (train: DDP ranks; data: actors)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra custom resources per worker, e.g. {accelerator_type:H100: 0.001}")
