"""Decoded images -> uint8 pixels, and labelled PNG grids (per-scenario sample grids in MLflow)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from drivedit import storage

PAD = 2  # pixels between tiles
LABEL_PAD = 4


def latents_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] (decoded latents) -> (N, H, W, 3) uint8, rounded, clipped."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}; decode latents first")
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (N, C, H, W)
    x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x.contiguous().numpy()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def grid_image(images: np.ndarray, nrow: int, labels: Sequence[str] | None = None) -> Image.Image:
    """A PIL grid of images (N, H, W, 3) uint8, `nrow` images per row, optional text left of each row."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.shape} {images.dtype}")
    n, h, w, _ = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    if nrow < 1:
        raise ValueError(f"nrow (images per row) must be >= 1, got {nrow}")
    rows = math.ceil(n / nrow)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"got {len(labels)} row labels for {rows} rows of {nrow} images; give one label per row")
    font = _font(max(10, min(h // 6, 24)))
    label_w = 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(int(probe.textlength(str(t), font=font)) for t in labels) + 2 * LABEL_PAD
    cols = min(n, nrow)
    canvas = Image.new("RGB", (label_w + cols * (w + PAD) + PAD, rows * (h + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas.paste(Image.fromarray(images[i]), (label_w + PAD + c * (w + PAD), PAD + r * (h + PAD)))
    for r, text in enumerate(labels or []):
        draw.text((LABEL_PAD, PAD + r * (h + PAD) + h // 2), str(text), fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


OBJECT_COLOUR = (0, 255, 0)  # a box the frame is labelled with
IGNORE_COLOUR = (255, 0, 255)  # an ignore region: a box the generator does not promise (generate/undrawable.py)


def draw_boxes(image: np.ndarray, labels: Sequence[dict]) -> np.ndarray:
    """A copy of an image (H, W, 3) uint8 with its BDD100K labels' box2d drawn in its pixels: objects green,
    ignore regions magenta."""
    from drivedit.data.bdd100k import is_ignore

    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    for lab in labels:
        b = lab["box2d"]
        colour = IGNORE_COLOUR if is_ignore(lab.get("attributes")) else OBJECT_COLOUR
        draw.rectangle([b["x1"], b["y1"], max(b["x1"], b["x2"] - 1), max(b["y1"], b["y2"] - 1)], outline=colour)
    return np.asarray(canvas)


def save_grid(images_uint8: np.ndarray, path: str | Path, nrow: int, labels: Sequence[str] | None = None) -> Path:
    """Write the grid as a PNG (temp name, then rename: never a half-written file)."""
    path = Path(path)
    img = grid_image(images_uint8, nrow, labels)
    with storage.atomic_local_file(path) as tmp:
        img.save(tmp, format="PNG")
    return path
