"""Sample grids during fine-tuning: one row per scenario, the same seeds at every step so grids compare."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from drivedit.config.finetune import SamplingSection


def codec_for(codec_id: str, scale_factor: float, dtype: str = "float32"):
    """The codec that wrote the shards, from their metadata's codec id ("pixel", "autoencoder_kl:<source>"),
    computing in `dtype` (a setting of drivedit.models.precision)."""
    from drivedit.models.codec import load_codec, parse_codec_id

    kind, source = parse_codec_id(codec_id)
    return load_codec(kind, source, scale_factor, dtype)


@torch.no_grad()
def draw_grid(model, meta, sampling: SamplingSection, betas: np.ndarray, device: torch.device, path: Path,
              superclass: bool = False) -> Path:
    """Sample `num_per_scenario` images per scenario with `model` (eval mode) and write a labelled PNG grid.

    meta: the shards' metadata (scenarios, codec id, scale factor). superclass: FineDiffusion's
    superclass guidance instead of classifier-free guidance.
    """
    from drivedit.generate.grid import latents_to_uint8, save_grid
    from drivedit.generate.sampler import DiTSampler, SamplerSettings

    k, scenarios = sampling.num_per_scenario, list(meta.scenarios)
    labels = torch.arange(len(scenarios)).repeat_interleave(k)  # (S*k,)
    seeds = [sampling.seed + i for i in range(len(labels))]
    settings = SamplerSettings(sampler=sampling.sampler, steps=sampling.steps, guidance=sampling.guidance,
                               guidance_kind="superclass" if superclass else "cfg",
                               guidance_interval=sampling.guidance_interval)
    uncond = model.y_embedder.superclass_of(labels.to(device)) if superclass else None
    codec = codec_for(meta.codec_id, meta.scale_factor, sampling.dtype).to(device)
    sampler = DiTSampler.for_setting(model, betas, device, sampling.dtype, codec.kind)
    latents = sampler.sample(labels, seeds, settings, uncond)  # (S*k, C, h, w)
    images = codec.decode(latents)  # (S*k, 3, H, W) in [-1, 1]
    return save_grid(latents_to_uint8(images), path, nrow=k, labels=scenarios)
