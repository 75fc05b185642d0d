"""Layout fidelity: the detect job's AP50 on generated frames over its AP50 on real ones, overall, per
scenario (against the same scenario's real frames) and per object size; its MLflow metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from drivedit.detect.evaluate import GroundTruthImage, coco_ground_truth
from drivedit.eval.fidelity import fidelity_metrics, layout_fidelity
from drivedit.eval.mlflow_log import eval_metrics

CATS = ["car", "pedestrian"]
# at 128 px: small < 6.4^2 = 41 px^2 <= medium < 19.2^2 = 369 px^2 <= large
SMALL, LARGE = [10, 10, 15, 15], [40, 40, 80, 80]


def _write(folder, images: list[tuple[str, str, list]], found: set[tuple[int, int]]) -> None:
    """A scores folder: images (name, scenario, [box]) of cars; predictions hit the boxes in `found` exactly
    ((image position, box position)) and put one far-off false box in every other image."""
    gt = coco_ground_truth([GroundTruthImage(n, s, 128, 128, np.array(b, float).reshape(-1, 4),
                                             np.ones(len(b), np.int64)) for n, s, b in images], CATS)
    preds = []
    for i, (_, _, boxes) in enumerate(images):
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            if (i, k) in found:
                preds.append({"image_id": i + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.9})
    folder.mkdir()
    (folder / "gt.json").write_text(json.dumps(gt))
    (folder / "predictions.json").write_text(json.dumps(preds))


def test_fidelity_is_the_ratio_per_scenario_and_size(tmp_path):
    real = [("r0.png", "clear", [SMALL, LARGE]), ("r1.png", "night", [LARGE])]
    _write(tmp_path / "real", real, found={(0, 0), (0, 1), (1, 0)})  # the detector finds every real box
    gen = [("g0.png", "clear", [LARGE]), ("g1.png", "clear", [LARGE]), ("g2.png", "night", [SMALL, LARGE]),
           ("g3.png", "snowy", [LARGE])]
    # found: both clear boxes, night's large box only (its small one missed), not the snowy one
    _write(tmp_path / "gen", gen, found={(0, 0), (1, 0), (2, 1)})
    out = layout_fidelity(str(tmp_path / "gen"), str(tmp_path / "real"))
    assert out["ap50_real"] == pytest.approx(1.0)
    # 3 of 5 boxes found at full precision: COCO's 101-point AP = 3/5 of the recall points (0.0..0.6)
    assert out["ap50_generated"] == pytest.approx(61 / 101, abs=1e-6)
    assert out["fidelity"] == pytest.approx(out["ap50_generated"])
    ps = out["per_scenario"]
    assert ps["clear"]["fidelity"] == pytest.approx(1.0) and ps["clear"]["real_reference"] == "clear"
    assert ps["night"]["fidelity"] == pytest.approx(51 / 101, abs=1e-6)  # 1 of 2 boxes
    assert ps["snowy"]["fidelity"] == 0.0 and ps["snowy"]["real_reference"] == "all"  # no real snowy frame
    assert out["per_size"]["small"]["fidelity"] == 0.0 and out["per_size"]["small"]["num_boxes_generated"] == 1
    assert out["per_size"]["large"]["fidelity"] == pytest.approx(76 / 101, abs=1e-6)  # 3 of 4 large boxes
    assert out["per_size"]["medium"]["fidelity"] is None  # no medium box on either side

    metrics = fidelity_metrics(out, "eval.layout_fidelity")
    assert metrics["eval.layout_fidelity.fidelity"] == pytest.approx(out["fidelity"])
    assert metrics["eval.layout_fidelity.snowy.fidelity"] == 0.0
    assert "eval.layout_fidelity.size_medium.fidelity" not in metrics
    result = {"overall": {}, "per_scenario": {}, "layout_fidelity": out}
    assert {k: v for k, v in eval_metrics(result).items() if "layout_fidelity" in k} == metrics


def test_a_folder_that_is_not_a_scores_folder_is_named(tmp_path):
    (tmp_path / "real").mkdir()
    with pytest.raises(FileNotFoundError, match="no gt.json .*drivedit detect --eval-only"):
        layout_fidelity(str(tmp_path / "real"), str(tmp_path / "real"))


def test_boxes_the_generator_marked_are_crowd_and_the_real_side_follows_the_same_rule(tmp_path):
    from drivedit.eval.fidelity import dataset_ignore_under

    real = [("r0.png", "clear", [SMALL, LARGE]), ("r1.png", "night", [LARGE])]
    _write(tmp_path / "real", real, found={(0, 0), (0, 1), (1, 0)})
    # the generator labelled night's small box an ignore region (under one token); a detection sits on it
    ims = [GroundTruthImage("g0.png", "clear", 128, 128, np.array([LARGE], float), np.ones(1, np.int64)),
           GroundTruthImage("g1.png", "night", 128, 128, np.array([LARGE], float), np.ones(1, np.int64),
                            np.array([SMALL], np.float32), np.ones(1, np.int64)),
           GroundTruthImage("g2.png", "snowy", 128, 128, np.array([LARGE], float), np.ones(1, np.int64))]
    gt = coco_ground_truth(ims, CATS)
    assert [(a["iscrowd"], a.get("ignore_region", False)) for a in gt["annotations"]] == \
        [(0, False), (0, False), (1, True), (0, False)]
    x1, y1, x2, y2 = SMALL
    preds = [{"image_id": 1, "category_id": 1, "bbox": [40, 40, 40, 40], "score": 0.9},
             {"image_id": 2, "category_id": 1, "bbox": [40, 40, 40, 40], "score": 0.9},
             {"image_id": 2, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.95}]
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "gen" / "predictions.json").write_text(json.dumps(preds))

    out = layout_fidelity(str(tmp_path / "gen"), str(tmp_path / "real"), ignore_under=10)
    # 2 of the 3 large boxes found; the detection on the ignore region counts neither way; the real small box
    # (5 px, under 10) is an ignore region too, so the real side scores its two large boxes: 1.0
    assert out["ap50_generated"] == pytest.approx(67 / 101, abs=1e-6) and out["ap50_real"] == pytest.approx(1.0)
    assert out["fidelity"] == pytest.approx(67 / 101, abs=1e-6) and out["ignore_under"] == 10
    assert (out["num_boxes_generated"], out["num_boxes_real"]) == (3, 2)
    # every layout box: the small one is a box to find again (and the 0.95 detection finds it): 3 of 4
    everything = out["all_boxes"]
    assert everything["ap50_generated"] == pytest.approx(76 / 101, abs=1e-6) and everything["num_boxes_generated"] == 4
    assert everything["ap50_real"] == pytest.approx(1.0) and everything["num_boxes_real"] == 3
    assert fidelity_metrics(out, "f")["f.all_boxes.fidelity"] == pytest.approx(76 / 101, abs=1e-6)
    # without the rule on the real side the ratio would compare other boxes: the real small box counts again
    assert layout_fidelity(str(tmp_path / "gen"), str(tmp_path / "real"))["num_boxes_real"] == 3

    # the rule a generated dataset wrote in its spec.json; 0 for a folder without one
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "spec.json").write_text(json.dumps({"spec_hash": "x", "spec": {
        "image_size": 64, "layouts": {"ignore_under": 16.0}}}))
    assert dataset_ignore_under(str(tmp_path / "ds")) == 16.0 and dataset_ignore_under(str(tmp_path / "real")) == 0.0
    # frames of 64 px scored at 128 (the gen folder's gt.json): the rule in the scored pixels is twice the side
    assert dataset_ignore_under(str(tmp_path / "ds"), str(tmp_path / "gen")) == 32.0


def test_eval_takes_the_side_rule_from_the_flag_or_the_generated_dataset(tmp_path):
    import argparse

    from drivedit.eval.cli import build_parser, ignore_under

    (tmp_path / "spec.json").write_text(json.dumps({"spec": {"image_size": 128, "transfer": {"ignore_under": 32.0}}}))
    base = ["--real", "r", "--fake", str(tmp_path), "--train-classifier"]
    assert ignore_under(build_parser().parse_args(base)) == 32.0  # what the transfer marked
    assert ignore_under(build_parser().parse_args(base + ["--ignore-under", "0"])) == 0.0  # the flag wins
    assert ignore_under(argparse.Namespace(ignore_under=None, fake=str(tmp_path / "none"))) == 0.0
