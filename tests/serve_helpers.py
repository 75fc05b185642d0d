"""A tiny random DiT checkpoint for the serve tests (DiT-N/2 on 16x16 pixel latents, six classes)."""
from __future__ import annotations

from pathlib import Path

import torch

SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]
IMAGE_SIZE = 16


def write_tiny_checkpoint(path: Path) -> Path:
    from drivedit.models.checkpoint import export_safetensors
    from drivedit.models.dit import build_dit, dit_config

    torch.manual_seed(0)
    model = build_dit(dit_config("DiT-N/2", input_size=IMAGE_SIZE, in_channels=3, num_classes=len(SCENARIOS)))
    with torch.no_grad():  # off the adaLN-Zero init, so the output depends on label, seed and settings
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return export_safetensors(model, path)
