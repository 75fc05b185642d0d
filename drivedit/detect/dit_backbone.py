"""A (fine-tuned) DiT as a detection backbone.

The image goes through the DiT's codec (the posterior mean, scaled as in training), is noised to a
fixed timestep t, and runs through the DiT with its scenario label (or the null label). The output
tokens of chosen blocks are concatenated, normalised and laid back on the patch grid; ViTDet's simple
feature pyramid (Li et al. 2022: deconvolutions up, identity, max-pooling down, then a 1x1 and a 3x3
convolution per level) turns that single-scale map into the five levels the torchvision heads take.
Blocks before `train_from_block` (and the embedders and the codec) are frozen and run without
autograd; blocks after the last feature block are dropped.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

LEVEL_STRIDES = (4, 8, 16, 32)  # "0".."3"; "pool" (stride 64) is a max-pool of "3", as LastLevelMaxPool


def resolve_blocks(feature_blocks: list[int], depth: int) -> list[int]:
    """Negative indices count from the last block; raises for an index the DiT does not have."""
    out = []
    for b in feature_blocks:
        i = b + depth if b < 0 else b
        if not 0 <= i < depth:
            raise ValueError(f"feature block {b} does not exist in a DiT with {depth} blocks")
        out.append(i)
    return sorted(set(out))


def _resample(channels: int, ratio: float) -> nn.Module:
    """ratio > 1: that many x2 transposed convolutions (GroupNorm + GELU between); 1: identity; < 1: max-pool."""
    if ratio == 1:
        return nn.Identity()
    if ratio < 1:
        return nn.MaxPool2d(kernel_size=round(1 / ratio), stride=round(1 / ratio))
    layers: list[nn.Module] = []
    for k in range(int(math.log2(ratio))):
        if k:
            layers += [nn.GroupNorm(1, channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """One (N, C, g, g) map at stride `token_stride` -> levels "0".."3" at strides 4..32 and "pool" at 64."""

    def __init__(self, in_channels: int, out_channels: int, token_stride: int):
        super().__init__()
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        for s in LEVEL_STRIDES:
            ratio = token_stride / s
            if ratio != 2 ** round(math.log2(ratio)):
                raise ValueError(f"the DiT's token stride {token_stride} px is not a power-of-two multiple of {s}")
            self.stages.append(nn.Sequential(
                _resample(in_channels, ratio),
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.GroupNorm(1, out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(1, out_channels)))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))  # (N, C, S/4 .. S/32)
        out["pool"] = F.max_pool2d(out["3"], 1, 2, 0)  # (N, C, S/64)
        return out


class DiTFeatureBackbone(nn.Module):
    """Images normalised to [-1, 1] (N, 3, S, S) -> the five pyramid levels. Call `set_labels` with the
    batch's DiT labels first (torchvision's detectors pass the backbone images only)."""

    def __init__(self, dit: nn.Module, codec, alpha_bar: float, timestep: int, feature_blocks: list[int],
                 train_from_block: int | None, channels: int, image_size: int, null_label: int):
        super().__init__()
        depth = len(dit.blocks)
        self.feature_blocks = resolve_blocks(feature_blocks, depth)
        last = self.feature_blocks[-1]
        if train_from_block is not None and not 0 <= train_from_block <= last:
            raise ValueError(f"train_from_block {train_from_block} must lie in 0..{last} (the last feature block)")
        dit.blocks = dit.blocks[:last + 1]  # later blocks cannot change the features
        dit.final_layer = nn.Identity()
        self.dit = dit.eval().requires_grad_(False)
        self.train_from = train_from_block
        if train_from_block is not None:
            for block in self.dit.blocks[train_from_block:]:
                block.requires_grad_(True)
        self.codec = codec
        self.vae = getattr(codec, "vae", None)  # a submodule, so it moves and saves with the detector
        self.timestep, self.image_size, self.null_label = timestep, image_size, null_label
        self.register_buffer("signal", torch.tensor(math.sqrt(alpha_bar)), persistent=False)
        self.register_buffer("noise_level", torch.tensor(math.sqrt(1 - alpha_bar)), persistent=False)
        self.native = dit.config.input_size * codec.factor  # image side the DiT was trained at
        grid = dit.config.input_size // dit.config.patch_size
        hidden = dit.config.hidden_size * len(self.feature_blocks)
        self.norm = nn.LayerNorm(hidden)
        self.pyramid = SimpleFeaturePyramid(hidden, channels, image_size // grid)
        self.out_channels = channels
        self._labels: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "DiTFeatureBackbone":
        super().train(mode)
        self.dit.eval()  # no label dropout: the label is the frame's scenario or the null label by choice
        if self.vae is not None:
            self.vae.eval()
        return self

    def set_labels(self, labels: torch.Tensor | None) -> None:
        self._labels = labels

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> noised latents (N, C, h, w) at the DiT's timestep."""
        if images.shape[-1] != self.native:
            images = F.interpolate(images, size=(self.native, self.native), mode="bilinear", align_corners=False)
        self.codec.device = images.device
        mean = self.codec.encode(images).chunk(2, dim=1)[0] * self.codec.scale_factor  # (N, C, h, w)
        if self.training:
            noise = torch.randn_like(mean)  # the training loop seeds each step
        else:  # scoring is deterministic
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)).to(mean.device, mean.dtype)
        return self.signal * mean + self.noise_level * noise

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        n = images.shape[0]
        y = self._labels if self._labels is not None else torch.full((n,), self.null_label, dtype=torch.long)
        y = y.to(images.device)
        with torch.no_grad():
            x = self.dit.x_embedder(self.latents(images))  # (N, T, D)
            if self.dit.config.posenc == "abs":
                x, rope = x + self.dit.pos_embed, None
            else:
                rope = (self.dit.rope_cos.to(x.dtype), self.dit.rope_sin.to(x.dtype))
            t = torch.full((n,), self.timestep, device=images.device, dtype=torch.long)
            c = self.dit.t_embedder(t) + self.dit.y_embedder(y, False)  # (N, D)
        feats = []
        for i, block in enumerate(self.dit.blocks):
            frozen = self.train_from is None or i < self.train_from
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                x = block(x, c, rope)  # (N, T, D)
            if i in self.feature_blocks:
                feats.append(x)
        tokens = self.norm(torch.cat(feats, dim=-1))  # (N, T, D * k)
        g = int(math.isqrt(tokens.shape[1]))
        grid = tokens.transpose(1, 2).reshape(n, -1, g, g)  # (N, D * k, g, g)
        return self.pyramid(grid)
