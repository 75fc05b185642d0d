"""`ServeApp`: the config of the sampling endpoint (`drivedit serve --config FILE`).

The operator's config fixes everything a request may not choose: the model, the sampler bounds,
the per-request compute budget, batching, replica count and back-pressure. A request only picks
values inside these bounds (see drivedit/serve/schemas.py, which builds its schema from here).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drivedit.config.base import StrictModel
from drivedit.config.common import GUIDANCE_INTERVAL_FIELD, CodecConfig, DtypeSetting, GuidanceInterval, RayConfig

SamplerName = Literal["ddim", "ddpm"]


class ServeModelConfig(StrictModel):
    """Which model the endpoint serves. Set by the operator only; no request can change it."""

    ref: str = Field(
        ..., min_length=1,
        description="the model: `models:/NAME/VERSION` (MLflow registry), an adapter bundle directory or URI "
                    "(local or s3://), an official DiT checkpoint (.pt / .safetensors / diffusers dir) or `builtin:NAME`")
    class_names: list[str] | dict[str, int] | None = Field(
        None, description="checkpoints only (bundles carry their vocabulary): scenario names for class ids, either "
                          "a list (name i is class id i) or a mapping {name: class id}, e.g. {snowplow: 803}")
    codec: CodecConfig | None = Field(
        None, description="how latents become images; default: the bundle's codec, or for a checkpoint the pixel "
                          "codec (3 latent channels) or sd-vae-ft-ema (4 latent channels)")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI used to resolve `models:/` refs; default: the MLFLOW_TRACKING_URI "
                          "of the replica's environment")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where each replica samples; `auto` = the replica's GPU when it has one, else CPU")
    dtype: DtypeSetting = Field(
        "auto", description="autocast dtype of the DiT in each replica: auto = bfloat16 where the device has it "
                            "natively (GPUs, CPUs with AVX512-BF16 or AMX), else float32; float16 on GPUs only")


class ServeSamplerConfig(StrictModel):
    """Sampler defaults a request may omit, and the bounds a request must stay inside."""

    samplers: list[SamplerName] = Field(
        ["ddim", "ddpm"], min_length=1, description="samplers a request may choose")
    default_sampler: SamplerName = Field("ddim", description="sampler of a request that names none")
    default_steps: int = Field(50, ge=1, description="denoising steps of a request that gives none")
    min_steps: int = Field(1, ge=1, description="fewest denoising steps a request may ask for")
    max_steps: int = Field(250, ge=1, description="most denoising steps a request may ask for")
    default_guidance: float = Field(4.0, description="guidance scale of a request that gives none (1 = no guidance)")
    min_guidance: float = Field(1.0, ge=0.0, description="smallest guidance scale a request may ask for")
    max_guidance: float = Field(10.0, ge=0.0, description="largest guidance scale a request may ask for")
    guidance_kind: Literal["cfg", "superclass"] = Field(
        "cfg", description="`cfg`: classifier-free guidance against the null class; `superclass`: guide against "
                           "each scenario's superclass (needs a model with a tiered embedder)")
    guide_channels: int | None = Field(
        None, ge=1, description="guide only the first k latent channels (default: all; the official sample.py uses 3)")
    guidance_interval: GuidanceInterval = GUIDANCE_INTERVAL_FIELD
    max_images: int = Field(8, ge=1, description="most images one request may ask for (`num_images`)")
    max_image_steps: int = Field(
        800, ge=1, description="per-request compute budget: num_images x steps may not exceed this; a request over it "
                               "is refused with the limit stated")


class BatchingConfig(StrictModel):
    """Dynamic batching (`@serve.batch`): concurrent requests with the same sampler settings share one sampler call."""

    enabled: bool = Field(True, description="group concurrent requests; off = one sampler call per request")
    max_batch_size: int = Field(
        16, ge=1, description="most images in one sampler call (a request's num_images all count); must be at "
                              "least sampler.max_images so every request fits")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0.0, le=10.0, description="how long the first request of a batch waits for others to join")


class DeploymentConfig(StrictModel):
    """Replicas, autoscaling and back-pressure of the Ray Serve deployment."""

    name: str = Field("DiTSampler", min_length=1, description="deployment name inside the Serve application")
    min_replicas: int = Field(1, ge=0, description="autoscaling lower bound (0 = scale to zero when idle)")
    max_replicas: int = Field(1, ge=1, description="autoscaling upper bound")
    initial_replicas: int | None = Field(
        None, ge=0, description="replicas at start; default: max(min_replicas, 1)")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="autoscaling target of in-flight requests per replica")
    upscale_delay_s: float = Field(5.0, ge=0, description="how long load must stay high before adding a replica")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long load must stay low before removing a replica")
    max_ongoing_requests: int = Field(
        32, ge=1, description="requests one replica works on at once (batching needs several)")
    max_queued_requests: int = Field(
        64, ge=0, description="requests waiting at each caller (HTTP proxy) for a free replica slot, a burst still "
                              "being routed included; once full, new requests get 503 instead of queueing without "
                              "bound. Size it for the bursts you accept")
    gpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="GPUs each replica takes; `auto` = 1 when the Ray cluster reports GPUs, else 0 (set 1 "
                            "explicitly on an autoscaling cluster whose GPU nodes may currently be at zero)")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs each replica reserves")


class HttpConfig(StrictModel):
    """Where `drivedit serve` listens and how big a request may be.

    Under `serve deploy` the Serve config file's `http_options` own host and port; the body limit still applies.
    """

    host: str = Field("127.0.0.1", description="address the HTTP proxy binds (0.0.0.0 to listen on all interfaces)")
    port: int = Field(8000, ge=1, le=65535, description="port of the HTTP proxy")
    route_prefix: str = Field("/", pattern=r"^/", description="URL prefix of the application's routes")
    max_body_bytes: int = Field(
        4096, ge=64, description="largest accepted request body; a bigger one gets 413")
    request_timeout_s: float | None = Field(
        None, gt=0, description="end-to-end HTTP timeout of the proxy (None: no timeout)")


class ServeApp(StrictModel):
    """Root config of the sampling endpoint.

    Cross-field checks all live here, so one error lists every such problem (pydantic runs them once
    each field is valid on its own).
    """

    app_name: str = Field("drivedit", min_length=1, description="Serve application name")
    model: ServeModelConfig = Field(..., description="the model to serve")
    sampler: ServeSamplerConfig = Field(default_factory=ServeSamplerConfig, description="sampler defaults and bounds")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="dynamic request batching")
    deployment: DeploymentConfig = Field(
        default_factory=DeploymentConfig, description="replicas, autoscaling, back-pressure, resources")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP proxy and request limits")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray cluster `drivedit serve` joins or starts")

    @model_validator(mode="after")
    def _check(self) -> "ServeApp":
        s, b, d = self.sampler, self.batching, self.deployment
        problems = []
        if s.min_steps > s.max_steps:
            problems.append(f"sampler.min_steps ({s.min_steps}) is above sampler.max_steps ({s.max_steps})")
        elif not s.min_steps <= s.default_steps <= s.max_steps:
            problems.append(f"sampler.default_steps ({s.default_steps}) must lie in "
                            f"[min_steps, max_steps] = [{s.min_steps}, {s.max_steps}]")
        if s.min_guidance > s.max_guidance:
            problems.append(f"sampler.min_guidance ({s.min_guidance}) is above sampler.max_guidance ({s.max_guidance})")
        elif not s.min_guidance <= s.default_guidance <= s.max_guidance:
            problems.append(f"sampler.default_guidance ({s.default_guidance}) must lie in "
                            f"[min_guidance, max_guidance] = [{s.min_guidance}, {s.max_guidance}]")
        if s.default_sampler not in s.samplers:
            problems.append(f"sampler.default_sampler {s.default_sampler!r} is not in sampler.samplers {s.samplers}")
        if s.default_steps > s.max_image_steps:
            problems.append(f"sampler.default_steps ({s.default_steps}) exceeds the compute budget "
                            f"sampler.max_image_steps ({s.max_image_steps}): a request with defaults would be refused")
        if s.min_steps > s.max_image_steps:
            problems.append(f"sampler.min_steps ({s.min_steps}) exceeds sampler.max_image_steps "
                            f"({s.max_image_steps}): no request could be served")
        if b.enabled and b.max_batch_size < s.max_images:
            problems.append(f"batching.max_batch_size ({b.max_batch_size}) is below sampler.max_images "
                            f"({s.max_images}): a request for {s.max_images} images could never fit a batch")
        if b.enabled and d.max_ongoing_requests < 2:
            problems.append("deployment.max_ongoing_requests must be >= 2 with batching enabled: a replica that "
                            "holds one request at a time never has two to batch")
        if d.min_replicas > d.max_replicas:
            problems.append(f"deployment.min_replicas ({d.min_replicas}) is above deployment.max_replicas "
                            f"({d.max_replicas})")
        elif d.initial_replicas is not None and not d.min_replicas <= d.initial_replicas <= d.max_replicas:
            problems.append(f"deployment.initial_replicas ({d.initial_replicas}) must lie in "
                            f"[min_replicas, max_replicas] = [{d.min_replicas}, {d.max_replicas}]")
        if isinstance(d.gpus_per_replica, float) and d.gpus_per_replica < 0:
            problems.append(f"deployment.gpus_per_replica must be >= 0 or 'auto', got {d.gpus_per_replica}")
        if problems:
            raise ValueError("\n".join(problems))
        return self
