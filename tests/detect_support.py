"""Test material for the detection tests: procedural scene folders, a random tiny factor-4 VAE and a random
tiny DiT on its 4-channel latents (the shape of the tiny-VAE world at 128 px), and small job configs."""
from __future__ import annotations

from pathlib import Path

import torch


def write_scenes(directory: Path, num: int, seed: int) -> Path:
    from drivedit.data.scenes import write_scenes_dataset

    write_scenes_dataset(str(directory), num, size=128, seed=seed, image_format="png")
    return directory


def write_tiny_vae(directory: Path) -> Path:
    """A random AutoencoderKL with 3 levels (factor 4), 4 latent channels, narrow enough for a CPU."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    vae.save_pretrained(str(directory))
    return directory


def write_tiny_dit(path: Path, num_classes: int = 6, seed: int = 0) -> Path:
    """A random DiT-N/2 (2 blocks) on 4x32x32 latents, every weight non-zero (adaLN-Zero would make the
    blocks the identity)."""
    from drivedit.models.checkpoint import export_safetensors
    from drivedit.models.dit import build_dit, dit_config

    torch.manual_seed(seed)
    model = build_dit(dit_config("DiT-N/2", input_size=32, in_channels=4, num_classes=num_classes))
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.02)
    return export_safetensors(model, path)


def job_dict(train: Path, val: Path, storage: Path, name: str, **sections) -> dict:
    """A small car-only job; `sections` are merged into the matching sections."""
    cfg = {
        "model": {"arch": "fasterrcnn", "backbone": "resnet18", "fpn_channels": 32},
        "data": {"train": [{"uri": str(train), "weight": 1.0}], "val": str(val), "categories": ["car"]},
        "optim": {"total_steps": 6, "global_batch_size": 4, "lr": 1e-3, "warmup_steps": 2},
        "scaling": {"num_workers": 1},
        "run": {"name": name, "storage_path": str(storage), "checkpoint_every": 3, "log_every": 3},
        "tracking": {"experiment": "test-detect"},
    }
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    return cfg
