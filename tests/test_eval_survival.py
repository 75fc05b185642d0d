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


def _score_folder(path, names: list[str], boxes: dict[str, list], preds: dict[str, list]) -> str:
    """A detect scores folder (gt.json, predictions.json) of 64 px images with car boxes."""
    import numpy as np

    from drivedit.detect.evaluate import GroundTruthImage, coco_ground_truth

    gt = coco_ground_truth([GroundTruthImage(n, "clear", 64, 64, np.array(boxes[n], dtype=float).reshape(-1, 4),
                                             np.ones(len(boxes[n]), dtype=int)) for n in names], CATS)
    path.mkdir()
    (path / "gt.json").write_text(json.dumps(gt))
    ids = {im["file_name"]: im["id"] for im in gt["images"]}
    (path / "predictions.json").write_text(json.dumps(
        [{**_pred(ids[n], 1, *b, score=s), "category_id": 1} for n in names for *b, s in preds.get(n, [])]))
    return str(path)


def test_fast_ap50_is_the_full_evaluations():
    """detect.evaluate.ap50 (one COCOeval pass at IoU 0.5) gives evaluate()'s AP50 on a mixed case."""
    import numpy as np

    from drivedit.detect.evaluate import GroundTruthImage, ap50 as fast_ap50, coco_ground_truth, evaluate

    rng = np.random.default_rng(0)
    images, results = [], []
    for k in range(12):
        xy = rng.uniform(0, 40, (3, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(4, 24, (3, 2))], axis=1)  # small to large on 128 px
        images.append(GroundTruthImage(f"{k}.png", "clear", 128, 128, boxes, rng.integers(1, 3, 3)))
        for b in boxes + rng.normal(0, 3, boxes.shape):  # near misses and hits, random scores and categories
            results.append({"image_id": k + 1, "category_id": int(rng.integers(1, 3)), "score": float(rng.uniform()),
                            "bbox": [b[0], b[1], max(b[2] - b[0], 1), max(b[3] - b[1], 1)]})
    gt = coco_ground_truth(images, CATS)
    full = evaluate(gt, results, image_size=128)["AP50"]
    assert 0.1 < full < 0.9 and fast_ap50(gt, results, image_size=128) == pytest.approx(full, abs=1e-12)


def test_survival_interval_resamples_source_frames(tmp_path):
    """Four source frames, each transferred twice: two frames' transfers keep their car, two lose it. Scoring
    every frame once is the point estimate; the bootstrap over frames spans it and is wide at four frames."""
    from drivedit.eval.survival import _resampled_ap50, _scored, label_survival_from_scores, survival_interval

    frames = [f"f{k}.png" for k in range(4)]
    box = [[8, 8, 40, 40]]
    original = _score_folder(tmp_path / "orig", frames, dict.fromkeys(frames, box),
                             {f: [(8, 8, 40, 40, 0.9)] for f in frames})
    moved_names = [f"00000/{i:08d}.png" for i in range(8)]  # item i from frame i // 2
    kept = {n: [(9, 9, 40, 40, 0.8)] for i, n in enumerate(moved_names) if i // 2 < 2}
    moved = _score_folder(tmp_path / "moved", moved_names, dict.fromkeys(moved_names, box), kept)
    source_of = {n: frames[i // 2] for i, n in enumerate(moved_names)}

    point = label_survival_from_scores(moved, original)["survival"]
    gt, preds = _scored(moved, 0.0)
    assert _resampled_ap50(gt, preds, [im["id"] for im in gt["images"]]) == pytest.approx(point)
    assert 0.4 < point < 0.6  # half the cars found at full precision
    ci = survival_interval(moved, original, source_of, draws=300, seed=1)
    assert ci["frames"] == 4 and ci["draws"] == 300 and ci["level"] == 0.95
    assert 0.0 <= ci["low"] < 0.3 < point < 0.7 < ci["high"] <= 1.0 + 1e-9
    assert survival_interval(moved, original, source_of, draws=300, seed=1) == ci  # seeded
    with pytest.raises(ValueError, match=r"00000/00000000\.png comes from source frame 'x\.png'"):
        survival_interval(moved, original, {**source_of, moved_names[0]: "x.png"}, draws=5)
