"""Test material for the fine-tuning tests: a tiny "pretrained" DiT and demo-like latent shards.

The shards are written with the shard writer itself (no Ray, no encode job), from pixel-codec
images whose scenarios differ in brightness and colour, each with one object box, so a tiny
model has something learnable at 16 px.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SCENARIOS = ["clear", "night", "snowy"]
SIZE = 16


def write_base_model(path: Path, num_classes: int = 4, seed: int = 0) -> Path:
    """A DiT-N/2 on 3x16x16 latents whose zero-initialised layers are perturbed, like a trained model
    (modulators multiply weights, so an all-zero output layer would have nothing to scale)."""
    from drivedit.models.checkpoint import export_safetensors
    from drivedit.models.dit import build_dit, dit_config

    torch.manual_seed(seed)
    model = build_dit(dit_config("DiT-N/2", input_size=SIZE, in_channels=3, num_classes=num_classes))
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.02)
        model.final_layer.adaLN_modulation[-1].weight.normal_(0, 0.02)
        model.final_layer.linear.weight.normal_(0, 0.05)
    return export_safetensors(model, path)


BOX_CATEGORIES = ["car", "pedestrian"]


def write_shards(directory: Path, rows_per_shard: int = 24, num_shards: int = 2, seed: int = 0,
                 size: int = SIZE, with_layout: bool = False, codec_id: str = "pixel", resolution: int | None = None,
                 channels: int = 3) -> Path:
    """Pixel-codec shards of `size` px scenario images with one object box each; `with_layout` writes the
    box as a `car` in a layout map over BOX_CATEGORIES (version 2 label columns); `codec_id`, `resolution`
    and `channels` (extra channels repeat the grey level) let a test stand them in for a VAE's latents."""
    from drivedit.data.shards import ShardMetadata, build_shard_table, shard_name, write_shard

    rng = np.random.default_rng(seed)
    meta = ShardMetadata(codec_id, 1.0, resolution or size, (channels, size, size), list(SCENARIOS),
                         box_categories=list(BOX_CATEGORIES) if with_layout else [])
    tone = {0: (0.4, 0.5, 0.7), 1: (-0.8, -0.8, -0.6), 2: (0.9, 0.9, 0.95)}
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        rows = {k: [] for k in ("frame_id", "source_uri", "scenario", "weather", "timeofday", "moments",
                                "moments_flip", "object_mask", "num_objects")}
        for i in range(rows_per_shard):
            sc = (s * rows_per_shard + i) % len(SCENARIOS)
            img = np.ones((3, size, size), np.float32) * np.array(tone[sc], np.float32)[:, None, None]
            img[:, size // 2:, :] -= 0.3  # the road
            y0, x0 = rng.integers(2, size - 6, size=2)
            img[0, y0:y0 + 4, x0:x0 + 4] = 0.9  # a red object
            img[1:, y0:y0 + 4, x0:x0 + 4] = -0.9
            img = np.clip(img + rng.normal(0, 0.05, img.shape).astype(np.float32), -1, 1)
            img = np.concatenate([img] + [img.mean(0, keepdims=True)] * (channels - 3))  # (channels, size, size)
            mask = np.zeros((size, size), np.uint8)
            mask[y0:y0 + 4, x0:x0 + 4] = 1
            logvar = np.full_like(img, -20.0)
            rows["frame_id"].append(f"f{s}-{i}")
            rows["source_uri"].append(f"mem://{s}/{i}")
            rows["scenario"].append(sc)
            rows["weather"].append(SCENARIOS[sc])
            rows["timeofday"].append("night" if sc == 1 else "daytime")
            rows["moments"].append(np.concatenate([img, logvar]).reshape(-1))
            rows["moments_flip"].append(np.concatenate([img[..., ::-1], logvar]).reshape(-1))
            rows["object_mask"].append(mask.reshape(-1))
            rows["num_objects"].append(1)
            if with_layout:
                layout = np.zeros((len(BOX_CATEGORIES), size, size), np.uint8)
                layout[0] = mask
                rows.setdefault("layout", []).append(layout.reshape(-1))
        table = build_shard_table({k: np.asarray(v) for k, v in rows.items()}, meta)
        write_shard(str(directory / shard_name(s)), table)
    return directory


def job_dict(shards: Path, base: Path, storage: str, name: str, **sections) -> dict:
    """A small two-worker job; `sections` are merged into the matching sections."""
    cfg = {
        "model": {"source": str(base), "name": "DiT-N/2"},
        "data": {"shards": str(shards), "probe_rows": 24},
        "method": {"name": "driveditfit", "rank": 2, "scenario_init": "denoise", "init_samples": 2,
                   "init_timesteps": [200, 600]},
        "optim": {"total_steps": 12, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "ema_decay": 0.5,
                  "seed": 1},
        "scaling": {"num_workers": 2},
        "run": {"name": name, "storage_path": storage, "checkpoint_every": 4, "keep_checkpoints": 2,
                "log_every": 2},
        "tracking": {"experiment": "test-finetune"},
        "sampling": {"every_steps": 0, "num_per_scenario": 2, "steps": 4, "guidance": 2.0},
    }
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    return cfg
