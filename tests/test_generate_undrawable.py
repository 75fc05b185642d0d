"""Labels the generator can promise (unit: no Ray): boxes under one DiT token are written as ignore regions,
which the COCO export writes as iscrowd, YOLO leaves out and counts, and label survival scores alike on both
sides."""
from __future__ import annotations

import json

import numpy as np
import pytest

from drivedit.data.bdd100k import Box, Frame, is_ignore
from drivedit.generate.undrawable import mark_undrawable, resolve_ignore_under, token_side


def test_one_token_in_output_pixels():
    assert token_side(128, 32, 4) == 16.0  # the tiny DiT: patch 4 on the factor-4 VAE's 32 x 32 grid
    assert token_side(256, 32, 2) == 16.0  # DiT-XL/2 at 256 px through the factor-8 SD VAE
    assert token_side(256, 32, 4) == 32.0  # the tiny DiT's frames written at 256 px: a token is 32 px there
    assert resolve_ignore_under("token", 128, 32, 4) == 16.0 and resolve_ignore_under(7, 128, 32, 4) == 7.0


def test_boxes_under_the_side_are_marked_and_nothing_else_changes():
    boxes = [Box("car", 0, 0, 15, 15), Box("car", 10, 10, 26, 26), Box("bus", 0, 0, 40, 4),  # sqrt(160) < 16
             Box("car", 1, 1, 3, 3, attributes={"ignore": True, "marked_by": "someone"}),
             Box("car", 50, 50, 58, 90, attributes={"occluded": True})]  # sqrt(320) = 17.9: kept
    out = mark_undrawable(boxes, 16.0)
    assert [is_ignore(b.attributes) for b in out] == [True, False, True, True, False]
    assert out[0].attributes["marked_by"].startswith("generate: side under 16 px")
    assert out[3].attributes["marked_by"] == "someone" and out[4].attributes == {"occluded": True}
    assert [(b.category, b.x1, b.y1, b.x2, b.y2) for b in out] == [(b.category, b.x1, b.y1, b.x2, b.y2) for b in boxes]
    assert boxes[0].attributes == {}  # the caller's boxes are not changed
    assert mark_undrawable(boxes, 0.0) is boxes


def test_coco_writes_ignore_regions_as_crowd_and_yolo_leaves_them_out(tmp_path):
    from PIL import Image

    from drivedit.data.bdd100k import write_label_file
    from drivedit.generate.label_formats import convert_folder

    (tmp_path / "images").mkdir()
    Image.new("RGB", (128, 128)).save(tmp_path / "images" / "a.png")
    frame = Frame("a.png", boxes=mark_undrawable([Box("car", 10, 10, 50, 50), Box("car", 60, 60, 66, 66)], 16.0))
    write_label_file([frame], str(tmp_path / "labels.json"))
    report = convert_folder(str(tmp_path), ["coco", "yolo"])
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert [(a["bbox"], a["iscrowd"]) for a in coco["annotations"]] == [([10, 10, 40, 40], 0), ([60, 60, 6, 6], 1)]
    assert len((tmp_path / "labels" / "a.txt").read_text().splitlines()) == 1  # the object only
    assert report.skipped_boxes == {"yolo: ignore region (the format has no way to say ignore)": 1}


def test_survival_counts_the_transfers_ignore_regions_on_neither_side(tmp_path):
    from drivedit.detect.evaluate import GroundTruthImage, coco_ground_truth
    from drivedit.eval.survival import label_survival_from_scores

    cats, big, small = ["car"], [10, 10, 60, 60], [70, 70, 76, 76]
    one = np.ones(1, np.int64)
    folders = {  # the original with both boxes; the transfer marked the small one (under 16 px) as ignore
        "orig": coco_ground_truth([GroundTruthImage("a.png", "clear", 128, 128, np.array([big, small]),
                                                    np.ones(2, np.int64))], cats),
        "moved": coco_ground_truth([GroundTruthImage("a.png", "clear", 128, 128, np.array([big]), one,
                                                     np.array([small], np.float32), one)], cats)}
    preds = {"orig": [big, small], "moved": [big]}  # the transfer lost the small object
    for name, gt in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "gt.json").write_text(json.dumps(gt))
        (tmp_path / name / "predictions.json").write_text(json.dumps(
            [{"image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.9}
             for x1, y1, x2, y2 in preds[name]]))
    out = label_survival_from_scores(str(tmp_path / "moved"), str(tmp_path / "orig"), ignore_under=16)
    assert out["survival"] == pytest.approx(1.0)  # the large box, the one it promised, held
    assert out["survival_all_boxes"] == pytest.approx(51 / 101, abs=1e-6)  # 1 of the 2 carried boxes


def test_the_preview_grid_draws_objects_green_and_ignore_regions_magenta(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from drivedit.generate.grid import IGNORE_COLOUR, OBJECT_COLOUR, draw_boxes
    from drivedit.generate.report import preview_grid

    grey = np.full((32, 32, 3), 100, np.uint8)
    labels = [{"category": "car", "box2d": {"x1": 4, "y1": 4, "x2": 20, "y2": 20}, "attributes": {}},
              {"category": "car", "box2d": {"x1": 24, "y1": 24, "x2": 28, "y2": 28}, "attributes": {"ignore": True}}]
    drawn = draw_boxes(grey, labels)
    assert tuple(drawn[4, 10]) == OBJECT_COLOUR and tuple(drawn[19, 4]) == OBJECT_COLOUR  # top and bottom-left edges
    assert tuple(drawn[24, 26]) == IGNORE_COLOUR and tuple(drawn[12, 12]) == (100, 100, 100)  # the inside untouched
    assert (grey == 100).all()  # the caller's image is not changed

    # a dataset of one labelled and one unlabelled frame: the first tile gets its boxes, the second none
    (tmp_path / "images" / "00000").mkdir(parents=True)
    for name in ("00000/00000000.png", "00000/00000001.png"):
        Image.fromarray(grey).save(tmp_path / "images" / name)
    pq.write_table(pa.table({"scenario": ["night", "rainy"], "name": ["00000/00000000.png", "00000/00000001.png"],
                             "labels": [json.dumps(labels), None]}), tmp_path / "manifest.parquet")
    grid = np.asarray(Image.open(preview_grid(str(tmp_path), tmp_path / "preview.png")).convert("RGB"))
    assert (grid == np.array(OBJECT_COLOUR, np.uint8)).all(-1).sum() > 0
    assert (grid == np.array(IGNORE_COLOUR, np.uint8)).all(-1).sum() > 0
    second_row = grid[grid.shape[0] // 2 + 2:]  # the rainy row: no box drawn
    assert not (second_row == np.array(OBJECT_COLOUR, np.uint8)).all(-1).any()
