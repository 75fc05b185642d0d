"""Do generated images look like scenes? A check that rests on no classifier and no scenario label.

The scenario classifier keys on colour: a patchwork in the right colours scores well on it. Driving
frames have a layout instead: sky on top, a horizon, a road that narrows towards it, vehicles along it.
Two measures read that layout off the pixels alone:

- **layout agreement**: the per-pixel mean and standard-deviation maps of luminance over a set of images
  (16×16), correlated (Pearson) with the real frames' maps and averaged. Real frames of the same world
  agree with each other near 1; a set with the colours but not the layout (patchworks, or the real
  frames with their patches shuffled) has flat maps that agree poorly.
- **layout FD**: the Fréchet distance between per-image layout features of real and generated images:
  16×16 luminance, 8×8 vertical and horizontal gradient energy, and the 16 row means of each colour
  channel (where the horizon falls, what lies above and below it). It sees each image, not only the set's
  average, so a set of mean images (or of shuffled ones) does not pass.

`scene_likeness(real, fake)` -> {"layout_agreement", "mean_map_corr", "std_map_corr", "layout_fd", ...};
`LayoutFeatures` is the same as an extractor for `evaluate_folders` (features streamed batch by batch,
`scene_likeness_of_features` on them); `shuffle_patches` makes the negative control.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from drivedit.eval import metrics

MAP_SIZE = 16
GRADIENT_SIZE = 8
IMAGE_SIZE = 64  # images are read at this size: the features are 16x16 at most


def _luminance(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 1, H, W) in [0, 1] (Rec. 601 weights)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0)  # (N, H, W, 3)
    return (x @ torch.tensor([0.299, 0.587, 0.114])).unsqueeze(1)


def _check(name: str, images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise ValueError(f"{name} needs at least 2 images for a layout, got {len(images)}")
    if min(images.shape[1:3]) < MAP_SIZE:
        raise ValueError(f"{name}: images must be at least {MAP_SIZE} px, got {images.shape[1:3]}")


def layout_features(images: np.ndarray) -> np.ndarray:
    """Per-image layout features (N, 16*16 + 2*8*8 + 3*16): coarse luminance, gradient energy, row colours."""
    lum = _luminance(images)                                              # (N, 1, H, W)
    coarse = F.adaptive_avg_pool2d(lum, MAP_SIZE).flatten(1)              # (N, 256)
    dy = (lum[:, :, 1:, :] - lum[:, :, :-1, :]).abs()                     # (N, 1, H-1, W)
    dx = (lum[:, :, :, 1:] - lum[:, :, :, :-1]).abs()                     # (N, 1, H, W-1)
    gy = F.adaptive_avg_pool2d(dy, GRADIENT_SIZE).flatten(1)              # (N, 64): horizontal edges (a horizon)
    gx = F.adaptive_avg_pool2d(dx, GRADIENT_SIZE).flatten(1)              # (N, 64): vertical edges
    rgb = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0).permute(0, 3, 1, 2)  # (N, 3, H, W)
    rows = F.adaptive_avg_pool2d(rgb, (MAP_SIZE, 1)).flatten(1)           # (N, 48): colour per band of rows
    return torch.cat([coarse, gy, gx, rows], 1).numpy().astype(np.float64)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def scene_likeness_of_features(real: np.ndarray, fake: np.ndarray) -> dict:
    """The scene check from `layout_features` of the real (N, D) and generated (M, D) images."""
    for name, x in (("real", real), ("fake", fake)):
        if len(x) < 2:
            raise ValueError(f"the scene check needs at least 2 {name} images, got {len(x)}")
    k = MAP_SIZE * MAP_SIZE  # the first k features are the coarse luminance map
    mean_corr = _pearson(real[:, :k].mean(0), fake[:, :k].mean(0))
    std_corr = _pearson(real[:, :k].std(0, ddof=1), fake[:, :k].std(0, ddof=1))
    return {"layout_agreement": (mean_corr + std_corr) / 2, "mean_map_corr": mean_corr, "std_map_corr": std_corr,
            "layout_fd": metrics.fid(real, fake), "num_real": int(len(real)), "num_fake": int(len(fake))}


def scene_likeness(real: np.ndarray, fake: np.ndarray) -> dict:
    """How much `fake` (uint8 (N, H, W, 3)) has the layout of `real` (same format, any size >= 16 px)."""
    _check("real", real)
    _check("fake", fake)
    return scene_likeness_of_features(layout_features(real), layout_features(fake))


class LayoutFeatures:
    """`layout_features` as an evaluate_folders extractor (name, image_size, __call__)."""

    name = "layout"
    image_size = IMAGE_SIZE

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return layout_features(images)


def shuffle_patches(images: np.ndarray, grid: int = 4, seed: int = 0) -> np.ndarray:
    """Each image cut into grid x grid patches and put back in a random order: the same pixels and colours,
    no layout (the negative control of the scene check)."""
    n, h, w, c = images.shape
    ph, pw = h // grid, w // grid
    rng = np.random.default_rng(seed)
    out = images[:, :ph * grid, :pw * grid].copy()
    patches = out.reshape(n, grid, ph, grid, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, ph, pw, c)
    for i in range(n):
        patches[i] = patches[i][rng.permutation(grid * grid)]
    return patches.reshape(n, grid, grid, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, ph * grid, pw * grid, c)
