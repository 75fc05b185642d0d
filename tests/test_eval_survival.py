"""Label survival: AP50 from COCO detection results against BDD100K labels, and its ratio."""
from __future__ import annotations

import json
import math

import pytest

from drivedit.data.bdd100k import Box, Frame, write_label_file
from drivedit.eval.survival import ap50, label_survival

FRAMES = [Frame("a.png", boxes=[Box("car", 10, 10, 30, 30), Box("pedestrian", 40, 5, 50, 35)]),
          Frame("b.png", boxes=[Box("car", 0, 0, 20, 10)])]
CATS = ["car", "pedestrian"]


def _pred(image, cat, x1, y1, x2, y2, score=0.9):
    return {"image_id": image, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


PERFECT = [_pred("a.png", "car", 10, 10, 30, 30), _pred("a.png", "pedestrian", 40, 5, 50, 35),
           _pred("b.png", "car", 0, 0, 20, 10)]


def test_ap50_scores_hits_misses_and_id_forms():
    assert ap50(FRAMES, PERFECT, CATS) == pytest.approx(1.0)
    # positions instead of names, and a box shifted by 2 px (IoU 0.67 > 0.5) still hits
    by_position = [_pred(0, 0, 12, 10, 32, 30), _pred(0, 1, 40, 5, 50, 35), _pred(1, 0, 0, 0, 20, 10)]
    assert ap50(FRAMES, by_position, CATS) == pytest.approx(1.0)
    # the pedestrian missed (IoU < 0.5): its category scores 0, car stays 1 -> mean 0.5
    missed = PERFECT[:1] + [_pred("a.png", "pedestrian", 45, 5, 60, 35)] + PERFECT[2:]
    assert ap50(FRAMES, missed, CATS) == pytest.approx(0.5)
    assert ap50(FRAMES, [], CATS) == 0.0
    assert math.isnan(ap50([Frame("x.png")], PERFECT[:0], CATS))


def test_bad_predictions_name_every_problem():
    bad = [_pred("zzz.png", "car", 0, 0, 1, 1), _pred("a.png", "tram", 0, 0, 1, 1), {"image_id": 0, "category_id": 0}]
    with pytest.raises(ValueError) as err:
        ap50(FRAMES, bad, CATS)
    text = str(err.value)
    assert "'zzz.png' is neither a frame name" in text and "'tram' is not one of car, pedestrian" in text
    assert "prediction 2: bbox must be" in text


def test_label_survival_is_the_ratio(tmp_path):
    write_label_file(FRAMES, str(tmp_path / "orig.json"))
    write_label_file(FRAMES, str(tmp_path / "moved.json"))
    (tmp_path / "orig_pred.json").write_text(json.dumps(PERFECT))
    missed = PERFECT[:1] + PERFECT[2:]  # the transferred pedestrian is no longer found
    (tmp_path / "moved_pred.json").write_text(json.dumps(missed))
    out = label_survival(str(tmp_path / "moved.json"), str(tmp_path / "moved_pred.json"),
                         str(tmp_path / "orig.json"), str(tmp_path / "orig_pred.json"))
    assert out["ap50_original"] == pytest.approx(1.0) and out["ap50_transferred"] == pytest.approx(0.5)
    assert out["survival"] == pytest.approx(0.5) and out["categories"] == CATS


def test_label_survival_from_detect_score_folders(tmp_path):
    from drivedit.detect.evaluate import GroundTruthImage, coco_ground_truth

    import numpy as np

    gt = coco_ground_truth([GroundTruthImage("a.png", "clear", 64, 64, np.array([[10, 10, 30, 30], [40, 5, 50, 35]]),
                                             np.array([1, 2]))], CATS)
    for name, preds in (("orig", PERFECT[:2]), ("moved", PERFECT[:1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "gt.json").write_text(json.dumps(gt))
        ids = [{**p, "image_id": 1, "category_id": CATS.index(p["category_id"]) + 1} for p in preds]
        (tmp_path / name / "predictions.json").write_text(json.dumps(ids))
    from drivedit.eval.survival import label_survival_from_scores

    out = label_survival_from_scores(str(tmp_path / "moved"), str(tmp_path / "orig"))
    assert out["ap50_original"] == pytest.approx(1.0) and out["survival"] == pytest.approx(0.5)
