"""What several benchmarks share: presets applied to argparse results, and randomly initialised models
(throughput does not depend on the weights' values, and nothing can be downloaded)."""
from __future__ import annotations

import torch


def apply_preset(args, presets: dict[str, dict]) -> dict:
    """Fill every argument left at None from `args.preset` (default: gpu when CUDA is visible, else cpu)."""
    preset = presets[args.preset or ("gpu" if torch.cuda.is_available() else "cpu")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return preset


# dense bf16 tensor-core peak, TFLOP/s, by the card's name (vendor data sheets; SXM unless named)
BF16_PEAK_TFLOPS = {"H100 PCIE": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a card from its CUDA name ("NVIDIA H100 80GB HBM3" -> 989), None if unknown."""
    name = device_name.upper()
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIE" before "H100"
        if all(part in name for part in key.split()):
            return BF16_PEAK_TFLOPS[key]
    return None


def random_vae(factor: int, full: bool):
    """A randomly initialised AutoencoderKL: 4 latent channels, the given downsampling factor; `full` is the
    sd-vae-ft-* width, otherwise a narrow one that a CPU runs in seconds."""
    from diffusers import AutoencoderKL

    levels = {2: 2, 4: 3, 8: 4}[factor]
    widths = (128, 256, 512, 512)[:levels] if full else (32, 32, 64, 64)[:levels]
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=widths,
                         layers_per_block=2 if full else 1, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels).eval()


def random_dit(name: str, input_size: int):
    """A registry DiT with 1000 classes (DiTPipeline's null id is 1000) and every weight random."""
    from drivedit.models.dit import build_dit, dit_config

    model = build_dit(dit_config(name, input_size=input_size, num_classes=1000))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adaLN-Zero init outputs zeros: give every weight a value
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()
