"""Latent codecs behind one interface: images in [-1, 1] <-> latents the DiT works in.

`encode` returns the posterior moments (mean and log-variance, unscaled, (N, 2C, h, w)) so a
shard stores them once and training draws a fresh latent every step with `sample`. `decode`
takes scaled latents back to images. Two codecs:

- `autoencoder_kl`: a diffusers AutoencoderKL (sd-vae-ft-ema / -mse) from a local directory, a
  hub id, or `builtin:tiny-vae` (the factor-4 VAE shipped in drivedit/assets/, loaded by the same
  `AutoencoderKL.from_pretrained` call); the scale factor comes from its config (0.18215 for sd-vae).
- `pixel`: the identity on [-1, 1] images, factor 1, for tiny CPU demos and exact round trips.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from drivedit.models.pixel import PIXEL_LOGVAR

CODEC_KINDS = ("pixel", "autoencoder_kl")


def check_codec(kind: str, source: str | None) -> None:
    """Refuse an unknown codec kind, or an autoencoder_kl without a source, saying what to write."""
    if kind not in CODEC_KINDS:
        raise ValueError(f"unknown codec kind {kind!r}; use 'pixel' or 'autoencoder_kl'")
    if kind == "autoencoder_kl" and not source:
        raise ValueError("codec.source is required for autoencoder_kl: a diffusers directory (local or s3://) "
                         "or a hub id such as stabilityai/sd-vae-ft-ema")


def codec_id(kind: str, source: str | None) -> str:
    """The id shards and bundles record: "pixel" or "autoencoder_kl:<source>"."""
    return "pixel" if kind == "pixel" else f"{kind}:{source}"


def parse_codec_id(codec_id: str) -> tuple[str, str | None]:
    """(kind, source) of a recorded codec id ("pixel", "autoencoder_kl:<source>")."""
    kind, _, source = str(codec_id).partition(":")
    if kind not in CODEC_KINDS:
        raise ValueError(f"unknown codec id {codec_id!r}; expected 'pixel' or 'autoencoder_kl:<source>'")
    return kind, source or None


class PixelCodec:
    """Identity codec: the latent is the image itself (3 channels, factor 1)."""

    kind = "pixel"

    def __init__(self, channels: int = 3):
        self.latent_channels = channels
        self.factor = 1
        self.scale_factor = 1.0
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @property
    def id(self) -> str:
        return "pixel"

    def to(self, device) -> "PixelCodec":
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # images: (N, 3, H, W) in [-1, 1] -> moments (N, 6, H, W)
        mean = images.float()
        return torch.cat([mean, torch.full_like(mean, PIXEL_LOGVAR)], dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1, 1)  # (N, 3, H, W)


class AutoencoderKLCodec:
    """A diffusers AutoencoderKL; moments are `latent_dist.parameters` (mean, logvar clamped to [-30, 20])."""

    kind = "autoencoder_kl"

    def __init__(self, vae, source: str, scale_factor: float | None = None,
                 dtype: str | torch.dtype = torch.float32, channels_last: bool = True):
        self.vae = vae.eval().requires_grad_(False)
        # NHWC convolutions: cuDNN's bf16/fp16 tensor-core kernels want them, and so does oneDNN on a CPU (the
        # tiny VAE on 2 EPYC cores, float32: encode 1.2x, decode 1.6x the images/s of NCHW)
        self.channels_last = channels_last
        self.source = source
        self.latent_channels = vae.config.latent_channels
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale_factor = float(scale_factor if scale_factor is not None else vae.config.scaling_factor)
        self.dtype = dtype  # a setting of drivedit.models.precision, resolved per device in `to`
        self.device = torch.device("cpu")

    @property
    def id(self) -> str:
        return codec_id(self.kind, self.source)

    def to(self, device) -> "AutoencoderKLCodec":
        from drivedit.models.precision import compute_dtype

        self.device = torch.device(device)
        # float16 only on a GPU, bfloat16 where asked (`auto`: where the device runs it natively)
        # nn.Module.to: diffusers' own `to` warns at every dtype cast about modules to keep in float32, a list
        # that is empty for AutoencoderKL
        torch.nn.Module.to(self.vae, self.device, compute_dtype(self.dtype, self.device))
        if self.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        return self

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # images: (N, 3, H, W) in [-1, 1] -> moments (N, 2C, H/f, W/f)
        x = self._layout(images.to(self.device, dtype=next(self.vae.parameters()).dtype))
        return self.vae.encode(x).latent_dist.parameters.float().contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self._layout(latents.to(self.device, dtype=next(self.vae.parameters()).dtype) / self.scale_factor)
        return self.vae.decode(z).sample.float().clamp(-1, 1).contiguous()  # (N, 3, H, W)


def sample_latents(moments: torch.Tensor, scale_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw z = (mean + std * eps) * scale from stored moments (N, 2C, h, w) -> (N, C, h, w)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale_factor


VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def resolve_vae_source(source: str) -> str:
    """`builtin:<name>` -> the shipped diffusers directory; a local directory -> the folder holding its
    config.json (itself or its `vae/` subfolder); a hub id unchanged. A local directory without weights
    is refused here, before anything loads it."""
    from drivedit.models.checkpoint import BUILTIN_PREFIX, resolve_model_source

    text = str(source)
    if text.startswith(BUILTIN_PREFIX):
        path = resolve_model_source(text)
        if not (path / "config.json").is_file():
            raise ValueError(f"{text} is not a VAE (no config.json in {path}); use builtin:tiny-vae")
        text = str(path)
    path = Path(text)
    if not path.is_dir():
        return text  # a hub id
    folder = next((d for d in (path, path / "vae") if (d / "config.json").is_file()), None)
    if folder is None:
        raise ValueError(f"codec.source {source!r} has no config.json (nor vae/config.json); point it at a "
                         f"diffusers AutoencoderKL directory")
    if not any((folder / name).is_file() for name in VAE_WEIGHT_FILES):
        raise ValueError(f"codec.source {source!r} has a config but no weights: {folder} holds none of "
                         f"{', '.join(VAE_WEIGHT_FILES[:2])}; copy the whole VAE directory")
    return str(folder)


def read_vae_config(source: str) -> dict:
    """The AutoencoderKL config.json of a local directory, `builtin:<name>` or cached hub id (no weights read)."""
    resolved = resolve_vae_source(source)
    if Path(resolved).is_dir():
        try:
            return json.loads((Path(resolved) / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"codec.source {source!r}: config.json is not valid JSON ({e})") from None
    from diffusers import AutoencoderKL

    try:
        return dict(AutoencoderKL.load_config(resolved))
    except (OSError, ValueError) as e:
        hint = " (offline: put the weights in a local directory)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ValueError(f"codec.source {source!r} is neither a directory nor a hub id in the local cache{hint}: "
                         f"{str(e).splitlines()[0]}") from None


def vae_geometry(cfg: dict) -> tuple[int, int]:
    """(latent channels, spatial downsampling factor) of an AutoencoderKL config."""
    return int(cfg.get("latent_channels", 4)), 2 ** (len(cfg["block_out_channels"]) - 1)


def load_codec(kind: str = "pixel", source: str | None = None, scale_factor: float | None = None,
               dtype: str | torch.dtype = torch.float32):
    """Build a codec. `source` for autoencoder_kl is a local diffusers directory (a `vae/` subfolder of a
    pipeline works too), `builtin:tiny-vae`, or a hub id already in the local cache. `dtype` is a setting of
    drivedit.models.precision (float32, float16, bfloat16, auto), resolved on the device the codec moves to."""
    check_codec(kind, source)
    if kind == "pixel":
        return PixelCodec()
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(resolve_vae_source(source))
    except OSError as e:
        hint = " (HF_HUB_OFFLINE is set: put the weights in a local directory and point codec.source at it)" \
            if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ValueError(f"could not load AutoencoderKL from {source!r}: {e}{hint}") from None
    return AutoencoderKLCodec(vae, source, scale_factor, dtype)


def sample_clip_range(codec_kind: str) -> float | None:
    """Where a sampler may clip its predicted x0: pixel latents are images in [-1, 1]; VAE latents are
    unbounded (DiT samples them unclipped)."""
    return 1.0 if codec_kind == "pixel" else None
