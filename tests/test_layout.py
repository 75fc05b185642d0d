"""A frame's labels on the latent grid, without Ray: boxes through the crop (clipped, dropped, counted),
the per-category layout map, the segmentation through the same resize + crop and down to the grid, and
boxes outside their image refused like broken boxes."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from drivedit.data.encode_stages import BadImage, decode_and_crop, frame_labels
from drivedit.data.layout import crop_segmentation, place_boxes, rasterise_layout, segmentation_to_grid

pytestmark = pytest.mark.unit


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_place_boxes_clips_drops_and_counts():
    # a 96x64 source center-cropped to 64: scale 1, 16 px off the left
    t = (1.0, 1.0, 16.0, 0.0)
    placed, clipped, out = place_boxes([[0, 32, 0, 48, 32],     # inside: (16..32, 0..32) of 64
                                        [1, 0, 10, 24, 20],     # cut by the left edge: 0..8
                                        [2, 0, 0, 10, 10],      # entirely in the cropped-away strip
                                        [0, 70, 40, 100, 80]],  # cut on the right and bottom
                                       t, 64)
    assert (clipped, out) == (2, 1)
    np.testing.assert_allclose(placed, [[0, 0.25, 0, 0.5, 0.5], [1, 0, 10 / 64, 8 / 64, 20 / 64],
                                        [0, 54 / 64, 40 / 64, 1, 1]])


def test_rasterise_layout_channels_and_size_rules():
    layout, n = rasterise_layout([[0, 0, 0, 0.5, 0.25],          # 2x1 cells of a 4x4 grid: kept
                                  [1, 0, 0, 0.25, 0.25],         # 1 cell: under min_cells 2
                                  [1, 0.5, 0.5, 1, 1]], 2, 4, min_cells=2.0)  # 2x2 cells, overlapping nothing
    assert n == 2 and layout.shape == (2, 4, 4) and layout.dtype == np.uint8
    assert layout[0].sum() == 2 and layout[0, 0, :2].all()
    assert layout[1].sum() == 4 and layout[1, 2:, 2:].all()
    # overlapping boxes of two categories both stay (why the layout is one channel per category)
    layout, _ = rasterise_layout([[0, 0, 0, 1, 1], [1, 0, 0, 0.5, 0.5]], 2, 4)
    assert layout[0].all() and layout[1, :2, :2].all() and layout[1].sum() == 4
    # DriveDiTFit's rule: a side under 2 cells is skipped, whatever the area
    layout, n = rasterise_layout([[0, 0, 0, 1, 0.25]], 1, 8, min_cells=0, min_side_cells=2.0)  # 8 x 2 cells
    assert n == 1 and layout.sum() == 16
    layout, n = rasterise_layout([[0, 0, 0, 1, 0.2]], 1, 8, min_cells=0, min_side_cells=2.0)   # 8 x 1.6 cells
    assert n == 0 and layout.sum() == 0
    # thinner than a cell: the column under its middle
    layout, n = rasterise_layout([[0, 17 / 32, 1 / 32, 19 / 32, 31 / 32]], 1, 4, min_cells=0.5)
    assert n == 1 and layout[0, :, 2].tolist() == [1, 1, 1, 1] and layout.sum() == 4


def test_segmentation_to_grid_takes_the_majority():
    mask = np.full((8, 8), 255, np.uint8)
    mask[:4, :4] = 13             # a whole cell of car
    mask[:3, 4:] = 0              # 12 of 16 road, the rest ignore
    mask[4:, :4] = 2
    mask[4:6, :4] = 8             # 8 building, 8 vegetation: the tie goes to the smaller id
    grid = segmentation_to_grid(mask, 2)
    assert grid.tolist() == [[13, 0], [2, 255]]


def test_crop_segmentation_follows_the_image_geometry():
    # 96x64 image, mask: left third 1, middle third 2, right third 3 -> crop to 32 keeps the middle part
    mask = np.repeat(np.array([1, 2, 3], np.uint8), 32)[None].repeat(64, 0)
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (64, 1, 3))
    _, t, size = decode_and_crop(_png(ramp), 32)
    crop = crop_segmentation(_png(mask), size, t, 32)
    # 96x64 -> 48x32, left 8: columns 0..7 come from source 16..31 (1), 8..23 from 32..63 (2), 24.. from 3
    assert crop.shape == (32, 32) and crop[0, :8].tolist() == [1] * 8 and (crop[:, 8:24] == 2).all()
    assert (crop[:, 24:] == 3).all()
    with pytest.raises(ValueError, match="segmentation mask is 48x32 but its image is 96x64"):
        crop_segmentation(_png(mask[::2, ::2]), size, t, 32)
    with pytest.raises(ValueError, match="mode RGB"):
        crop_segmentation(_png(ramp), size, t, 32)


def test_frame_labels_boxes_layout_segmentation_and_outside_boxes():
    cfg = {"resolution": 32, "factor": 4, "num_categories": 2, "min_box_cells": 1.0}
    mask = np.zeros((64, 96), np.uint8)
    mask[32:, 40:56] = 13
    t, size = (0.5, 0.5, 8.0, 0.0), (96, 64)   # 96x64 -> 48x32, 8 px off the left
    boxes = [[0, 40, 32, 56, 64, "car"], [-1, 0, 0, 90, 10, "building"], [1, 0, 0, 10, 10, "pedestrian"]]
    out = frame_labels(boxes, _png(mask), t, size, cfg)
    # the car (id 0): crop x 12..20 of 32, y 16..32; the pedestrian lies in the cropped-away strip
    assert json.loads(out["boxes"]) == [[0, 0.375, 0.5, 0.625, 1.0]]
    assert (out["boxes_clipped"], out["boxes_cropped_out"], out["num_objects"]) == (0, 1, 1)
    layout = out["layout"].reshape(2, 8, 8)
    assert layout[0, 4:, 3:5].all() and layout[0].sum() == 8 and layout[1].sum() == 0
    np.testing.assert_array_equal(out["object_mask"].reshape(8, 8), layout.max(0))
    seg = out["segmentation"].reshape(8, 8)
    assert (seg[4:, 3:5] == 13).all() and (seg[:4] == 0).all() and (seg[layout[0] == 0] == 0).all()
    # a box of any category that lies entirely outside its image is broken labelling: the frame is refused
    with pytest.raises(BadImage, match=r"broken box: building \(100, 0, 120, 10\) lies entirely outside the 96x64"):
        frame_labels([[-1, 100, 0, 120, 10, "building"]], None, t, size, cfg)
    with pytest.raises(BadImage, match="bad segmentation mask"):
        frame_labels([], b"not a png", t, size, cfg)
