"""A frame's labels after the encode job's resize and crop: boxes in [0, 1] crop coordinates, the layout
map and the segmentation on the latent grid. Plain numpy, run inside the encode job's read tasks.

The geometry is the `transform` of `encode_stages.decode_and_crop`: a source pixel x maps to
x * sx - left in the (res, res) crop (y likewise with sy, top), for a center crop as for a stretch.

Layout map: one channel per box category, (K, h, w) uint8, 1 where a cell's centre lies inside a box
of that category. Channels rather than one category-id raster because boxes overlap (a pedestrian
in front of a car, a car behind a bus): a raster keeps one category per cell and loses the other
object, while channels keep both, and they are the one-hot input a layout branch consumes anyway.
Stored as uint8 with zstd, the zeros of K mostly empty channels cost little. `object_mask` is the
union of the channels, so the loss weighting and the layout branch see the same objects.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from drivedit.data.bdd100k import SEGMENTATION_IGNORE

Transform = tuple[float, float, float, float]  # (sx, sy, left, top)


def place_boxes(boxes: list[list[float]], transform: Transform, resolution: int
                ) -> tuple[list[list[float]], int, int]:
    """[[category id, x1, y1, x2, y2] in source pixels] -> ([[category id, x1, y1, x2, y2] in [0, 1] of the
    crop], clipped, cropped_out): a box the crop cuts is clipped to it (counted in `clipped`); a box
    with nothing left inside the crop is dropped (counted in `cropped_out`)."""
    sx, sy, left, top = transform
    placed, clipped, cropped_out = [], 0, 0
    for cat, x1, y1, x2, y2 in boxes:
        a1, a2 = x1 * sx - left, x2 * sx - left   # crop pixels
        b1, b2 = y1 * sy - top, y2 * sy - top
        c1, c2 = min(max(a1, 0.0), resolution), min(max(a2, 0.0), resolution)
        d1, d2 = min(max(b1, 0.0), resolution), min(max(b2, 0.0), resolution)
        if c2 <= c1 or d2 <= d1:
            cropped_out += 1
            continue
        clipped += (c1, c2, d1, d2) != (a1, a2, b1, b2)
        placed.append([int(cat), c1 / resolution, d1 / resolution, c2 / resolution, d2 / resolution])
    return placed, clipped, cropped_out


def rasterise_layout(placed: list[list[float]], num_categories: int, grid: int, min_cells: float = 0.0,
                     min_side_cells: float = 0.0) -> tuple[np.ndarray, int]:
    """Normalised boxes -> ((K, grid, grid) uint8 layout, number of boxes drawn).

    A cell is inside a box when its centre is. A box covering under `min_cells` cells of area, or
    narrower or shorter than `min_side_cells` cells, is not drawn; a drawn box always marks at least the
    cell under its centre (a box thinner than a cell keeps the row or column under its middle)."""
    layout = np.zeros((num_categories, grid, grid), np.uint8)
    drawn = 0
    for cat, x1, y1, x2, y2 in placed:
        a1, a2, b1, b2 = x1 * grid, x2 * grid, y1 * grid, y2 * grid   # latent cells
        w, h = a2 - a1, b2 - b1
        if w * h < max(min_cells, 1e-9) or min(w, h) < min_side_cells:
            continue
        j0, j1 = math.ceil(a1 - 0.5), math.ceil(a2 - 0.5)
        i0, i1 = math.ceil(b1 - 0.5), math.ceil(b2 - 0.5)
        if j1 <= j0:
            j0 = min(int((a1 + a2) / 2), grid - 1)
            j1 = j0 + 1
        if i1 <= i0:
            i0 = min(int((b1 + b2) / 2), grid - 1)
            i1 = i0 + 1
        layout[int(cat), i0:i1, j0:j1] = 1
        drawn += 1
    return layout, drawn


def crop_segmentation(data: bytes, source_size: tuple[int, int], transform: Transform, resolution: int) -> np.ndarray:
    """A mask PNG of the source image -> (res, res) uint8 train ids, through the image's own resize and crop
    (nearest neighbour: ids are labels, not intensities). Raises ValueError when the mask is unreadable,
    not single-channel, or not the image's size."""
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except Exception as e:  # PIL raises many types for broken files
        raise ValueError(f"undecodable segmentation mask: {type(e).__name__}: {e}") from None
    if mask.mode not in ("L", "P"):
        raise ValueError(f"segmentation mask has mode {mask.mode}, expected single-channel train ids (L)")
    if mask.size != tuple(source_size):
        raise ValueError(f"segmentation mask is {mask.size[0]}x{mask.size[1]} but its image is "
                         f"{source_size[0]}x{source_size[1]}")
    sx, sy, left, top = transform
    ow, oh = source_size
    size = (max(resolution, round(ow * sx)), max(resolution, round(oh * sy)))
    mask = Image.fromarray(np.asarray(mask, np.uint8)).resize(size, Image.NEAREST)
    left, top = int(left), int(top)
    return np.asarray(mask.crop((left, top, left + resolution, top + resolution)), np.uint8)


def segmentation_to_grid(mask: np.ndarray, grid: int) -> np.ndarray:
    """(res, res) train ids -> (grid, grid): each cell takes the most frequent value of its res/grid square
    pixels, ignore (255) included, ties to the smaller id."""
    res = mask.shape[0]
    f = res // grid
    cells = mask[:grid * f, :grid * f].reshape(grid, f, grid, f).transpose(0, 2, 1, 3).reshape(grid * grid, f * f)
    keys = np.arange(grid * grid)[:, None] * 256 + cells            # (g*g, f*f): one bin per (cell, value)
    counts = np.bincount(keys.ravel(), minlength=grid * grid * 256).reshape(grid * grid, 256)
    return counts.argmax(1).astype(np.uint8).reshape(grid, grid)


def empty_segmentation(grid: int) -> np.ndarray:
    """The latent-grid segmentation of a frame without a mask: ignore everywhere."""
    return np.full((grid, grid), SEGMENTATION_IGNORE, np.uint8)
