"""COCO scoring of detections (pycocotools): perfect and shifted predictions, per-size and per-scenario splits
on a hand-made case, and a rescore of the written JSON files with pycocotools' defaults."""
from __future__ import annotations

import json

import numpy as np
import pytest

from drivedit.detect.evaluate import (GroundTruthImage, area_ranges, coco_ground_truth, coco_results, evaluate,
                                      scenario_table)

CATEGORIES = ["car", "pedestrian"]


def hand_made() -> list[GroundTruthImage]:
    # at 128 px: small < 6.4^2 = 40.96 px^2 <= medium < 19.2^2 = 368.64 px^2 <= large
    clear = GroundTruthImage("a.png", "clear", 128, 128, np.array(
        [[0, 0, 4, 4], [10, 10, 25, 25], [40, 40, 80, 80]], np.float32), np.array([1, 1, 1]))  # 16, 225, 1600
    night = GroundTruthImage("b.png", "night", 128, 128, np.array(
        [[0, 0, 30, 30], [50, 50, 55, 60]], np.float32), np.array([1, 2]))  # 900 (car), 50 (pedestrian)
    empty = GroundTruthImage("c.png", "clear", 128, 128, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    return [clear, night, empty]


def predictions(images, shift: float = 0.0) -> list[dict]:
    out = []
    for i, im in enumerate(images, start=1):
        boxes = im.boxes.copy()
        widths = boxes[:, 2] - boxes[:, 0]
        boxes[:, [0, 2]] += shift * widths[:, None]
        out += coco_results(i, boxes, np.full(len(boxes), 0.9), im.labels)
    return out


def test_size_limits_scale_with_the_image():
    assert area_ranges(640)[1][1] == pytest.approx(32 ** 2) and area_ranges(640)[2][1] == pytest.approx(96 ** 2)
    assert area_ranges(128)[1][1] == pytest.approx(6.4 ** 2) and area_ranges(128)[2][1] == pytest.approx(19.2 ** 2)


def test_perfect_predictions_score_one_and_splits_count_the_boxes():
    images = hand_made()
    gt = coco_ground_truth(images, CATEGORIES)
    m = evaluate(gt, predictions(images), image_size=128)
    for key in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"):
        assert m[key] == pytest.approx(1.0), key
    assert m["num_boxes"] == {"all": 5, "small": 1, "medium": 2, "large": 2}
    assert m["num_images"] == 3
    assert m["per_scenario"]["clear"]["num_boxes"] == {"all": 3, "small": 1, "medium": 1, "large": 1}
    assert m["per_scenario"]["clear"]["num_images"] == 2
    assert m["per_scenario"]["night"]["num_boxes"] == {"all": 2, "small": 0, "medium": 1, "large": 1}
    assert m["per_scenario"]["night"]["AP_small"] is None  # no small box at night: COCO reports no value
    assert m["per_category"]["car"]["num_boxes"] == 4 and m["per_category"]["pedestrian"]["num_boxes"] == 1
    assert m["per_category"]["pedestrian"]["AP"] == pytest.approx(1.0)
    table = scenario_table(m).splitlines()
    assert table[0].startswith("scenario,images,boxes,mAP")
    assert table[1].startswith("clear,2,3,1.0000") and table[-1].startswith("all,3,5,1.0000")


def test_shifted_boxes_score_lower_and_no_detections_score_zero():
    images = hand_made()
    gt = coco_ground_truth(images, CATEGORIES)
    perfect = evaluate(gt, predictions(images), 128)
    slightly = evaluate(gt, predictions(images, shift=0.2), 128)  # IoU 0.67: kept at 0.5, lost at 0.75
    badly = evaluate(gt, predictions(images, shift=0.5), 128)  # IoU 0.33: lost at 0.5
    assert slightly["AP50"] == pytest.approx(1.0) and slightly["AP75"] == pytest.approx(0.0)
    assert perfect["mAP"] > slightly["mAP"] > badly["mAP"]
    assert badly["AP50"] == pytest.approx(0.0)
    none = evaluate(gt, [], 128)
    assert none["mAP"] == 0.0 and none["num_boxes"]["all"] == 5


def test_written_json_rescored_by_pycocotools_defaults_gives_the_same_map(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = hand_made()
    gt = coco_ground_truth(images, CATEGORIES)
    rng = np.random.default_rng(0)
    preds = predictions(images, shift=0.1) + predictions(images, shift=0.4)
    for p in preds:
        p["score"] = float(rng.random())
    m = evaluate(gt, preds, 128)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "predictions.json").write_text(json.dumps(preds))
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(tmp_path / "predictions.json")), "bbox")  # COCO's default settings
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert 0.0 < m["mAP"] < 1.0
    assert ev.stats[0] == pytest.approx(m["mAP"], abs=1e-9) and ev.stats[1] == pytest.approx(m["AP50"], abs=1e-9)
