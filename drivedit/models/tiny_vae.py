"""The architecture of the shipped tiny VAE (`builtin:tiny-vae`): a plain diffusers AutoencoderKL.

Factor 4 (three resolution levels), 4 latent channels, one ResNet block per level, no attention in
the middle block (at a 32x32 latent grid the attention would cost more than the rest of the encoder
on a CPU and the procedural scenes do not need it). Nothing here is drivedit-specific: the saved
directory loads with `AutoencoderKL.from_pretrained` like sd-vae-ft-ema does.
"""
from __future__ import annotations

from diffusers import AutoencoderKL

TINY_VAE_LATENT_CHANNELS = 4


def build_tiny_vae(block_out_channels=(16, 32, 64), norm_num_groups: int = 8, sample_size: int = 128,
                   latent_channels: int = TINY_VAE_LATENT_CHANNELS) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL with 2 ** (len(block_out_channels) - 1) downsampling."""
    levels = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(block_out_channels),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                         sample_size=sample_size, mid_block_add_attention=False)
