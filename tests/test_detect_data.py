"""Detection data and inputs: category mapping and unknown categories, boxes outside the image, flips,
the weighted mix, corrupt images, torchvision weights files, and preflight errors before any Ray work."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from drivedit.config.base import ConfigError
from drivedit.detect.dataset import BoxReport, DetItem, FrameStore, WeightedMix, fit_boxes, read_frames, to_batch
from detect_support import job_dict


def write_folder(root, frames: list[dict], size=(64, 32)):
    (root / "images").mkdir(parents=True)
    for f in frames:
        Image.new("RGB", size, (100, 120, 140)).save(root / "images" / f["name"])
    (root / "labels.json").write_text(json.dumps(frames))
    return root


def box(cat, x1, y1, x2, y2):
    return {"category": cat, "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}


def test_categories_are_mapped_and_unknown_ones_counted(tmp_path):
    root = write_folder(tmp_path / "d", [
        {"name": "a.png", "attributes": {"weather": "clear", "timeofday": "daytime"},
         "labels": [box("car", 1, 1, 9, 9), box("person", 2, 2, 5, 8), box("tram", 1, 1, 3, 3),
                    {"category": "lane", "poly2d": []}]},
        {"name": "b.png", "attributes": {"weather": "rainy", "timeofday": "night"}, "labels": [box("tram", 0, 0, 4, 4)]},
        {"name": "c.png", "attributes": {"weather": "foggy", "timeofday": "daytime"}, "labels": None}])
    frames, report = read_frames(str(root), "labels.json", ["car", "pedestrian"], {"person": "pedestrian"},
                                 ["clear", "rainy", "night"])
    assert [f.labels.tolist() for f in frames] == [[1, 2], [], []]
    assert report.unknown_categories == Counter({"tram": 2})
    assert (report.frames, report.boxes, report.negatives) == (3, 2, 2)
    assert [f.scenario for f in frames] == ["clear", "night", "other"]  # night wins; foggy is not in the vocabulary


def test_boxes_outside_the_image_are_clipped_or_dropped_and_counted():
    report = BoxReport()
    boxes = np.array([[4, 4, 20, 12], [-5, 2, 10, 40], [70, 0, 90, 10], [10, 31.5, 20, 40]], np.float32)
    out, labels = fit_boxes(boxes, np.array([1, 2, 3, 4]), width=64, height=32, size=128, report=report)
    # 64x32 -> 128x128: x scales by 2, y by 4; box 2 clipped to (0, 2, 10, 32); box 3 starts right of the image;
    # box 4 keeps half a pixel of height (2 px after scaling): clipped and kept
    np.testing.assert_allclose(out, [[8, 16, 40, 48], [0, 8, 20, 128], [20, 126, 40, 128]])
    assert labels.tolist() == [1, 2, 4]
    assert (report.clipped, report.dropped_outside) == (2, 1)


def test_flip_mirrors_image_and_boxes():
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, 1] = 255  # a bright column at x = 1
    item = DetItem(img, np.array([[1, 2, 3, 6]], np.float32), np.array([1]), np.array([[0, 0, 2, 1]], np.float32),
                   np.array([1]))
    x, targets = to_batch([item], np.array([True]))
    assert x.shape == (1, 3, 8, 8) and float(x[0, 0, 0, 6]) == 1.0 and float(x[0, 0, 0, 1]) == 0.0
    assert targets[0]["boxes"].tolist() == [[5.0, 2.0, 7.0, 6.0]]
    assert targets[0]["ignore_boxes"].tolist() == [[6.0, 0.0, 8.0, 1.0]]  # the ignore regions mirror with them


def test_weighted_mix_draws_each_dataset_by_weight():
    mix = WeightedMix([100, 10], [1.0, 3.0])
    draws = mix.draw(20000, np.random.default_rng(0))
    assert (draws >= 100).mean() == pytest.approx(0.75, abs=0.02)  # the small set gets 3/4 of the draws
    mix.remove(105)
    assert 105 not in set(mix.draw(5000, np.random.default_rng(1)).tolist())


def test_corrupt_image_is_skipped_and_listed(tmp_path):
    root = write_folder(tmp_path / "d", [{"name": n, "labels": [box("car", 1, 1, 9, 9)]} for n in ("a.png", "b.png")])
    (root / "images" / "b.png").write_bytes(b"not a png")
    frames, _ = read_frames(str(root), "labels.json", ["car"], {}, ["clear"])
    store = FrameStore(frames, 32)
    assert store.get(0)[0].shape == (32, 32, 3)
    assert store.get(1) is None and store.get(1) is None
    assert len(store.report.corrupt_images) == 1 and "b.png" in store.report.corrupt_images[0]


def test_torchvision_weights_file_loads_by_path(tmp_path):
    """A plain ResNet-18 state dict (ImageNet-style names) fills the detector's ResNet; a whole detector's
    state dict with another number of classes loads all but the class-sized head tensors, which are listed."""
    from torchvision.models import resnet18

    from drivedit.detect.detector import assemble, new_spec
    from drivedit.detect.models import load_torchvision_weights, read_weights_file

    spec = new_spec({"arch": "fasterrcnn", "backbone": "resnet18", "fpn_channels": 32}, ["car"], 128,
                    {"max_detections": 100, "score_threshold": 0.01})
    torch.manual_seed(1)
    resnet = resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    det = assemble(spec)
    report = load_torchvision_weights(det, read_weights_file(tmp_path / "resnet18.pth"), "resnet18.pth")
    assert torch.equal(det.backbone.body.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)
    assert report["loaded"] == len([k for k in resnet.state_dict() if not k.startswith("fc.")])

    other = assemble({**spec, "categories": ["car", "bus", "truck"]})
    torch.save({"model": other.state_dict()}, tmp_path / "detector.pth")
    det2 = assemble(spec)
    report = load_torchvision_weights(det2, read_weights_file(tmp_path / "detector.pth"), "detector.pth")
    assert sorted(s.split()[0] for s in report["skipped_shape"]) == [
        "roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(det2.rpn.head.conv[0][0].weight, other.rpn.head.conv[0][0].weight)
    torch.save({"x": torch.zeros(2)}, tmp_path / "unrelated.pth")
    with pytest.raises(ValueError, match="none of its 1 tensors fits"):
        load_torchvision_weights(det2, read_weights_file(tmp_path / "unrelated.pth"), "unrelated.pth")


def test_unknown_categories_and_boxes_outside_the_image_are_reported_and_training_goes_on(tmp_path):
    """Each folder's frame (64x32) holds a car, a box of an unknown category, a car reaching out of the image
    and one wholly right of it: preflight reports the unknown category per folder, two training steps run,
    and the checkpoint's training report and the scores count the clipped and the dropped box."""
    from pathlib import Path

    from drivedit.detect import preflight
    from drivedit.detect.loop import DetectContext, DetectLoop, Edges
    from drivedit.train import state as st

    labels = [box("car", 4, 4, 30, 20), box("tram", 1, 1, 9, 9), box("car", 50, 10, 80, 30), box("car", 70, 0, 90, 10)]
    train = write_folder(tmp_path / "train", [{"name": "a.png", "labels": labels}])
    val = write_folder(tmp_path / "val", [{"name": "v.png", "labels": labels}])
    cfg = job_dict(train, val, tmp_path / "runs", "outside", data={"image_size": 64},
                   optim={"total_steps": 2, "global_batch_size": 2, "warmup_steps": 0},
                   run={"checkpoint_every": 2, "log_every": 2})
    plan = preflight.check(cfg, "test")
    for folder in (train, val):
        r = plan.reports[str(folder)]
        assert (r["frames"], r["boxes"], r["unknown_categories"]) == (1, 3, {"tram": 1})
        assert "dropped boxes of unknown categories: tram 1" in preflight.describe(str(folder), r)
    seen = {}

    def report(metrics, directory, name):
        if directory:
            seen["meta"] = st.read_meta(directory)
            seen["scores"] = json.loads((Path(directory) / "scores" / "metrics.json").read_text())

    DetectLoop(plan.job, DetectContext(run_dir=plan.run_dir),
               Edges(0, 1, torch.device("cpu"), None, report, lambda m, ignore: m)).run()
    counted = {"clipped_boxes": 1, "dropped_outside_boxes": 1, "ignored_small_boxes": 0, "corrupt_images": []}
    assert seen["meta"]["step"] == 2 and seen["meta"]["train_report"] == counted
    assert seen["scores"]["skipped"] == counted and seen["scores"]["num_boxes"]["all"] == 2  # the kept two


def test_empty_training_set_and_val_without_boxes_fail_before_ray(tmp_path, monkeypatch):
    from drivedit.detect import job as detect_job

    empty = write_folder(tmp_path / "empty", [])
    no_boxes = write_folder(tmp_path / "nobox", [{"name": "a.png", "labels": [box("tram", 1, 1, 9, 9)]}])
    monkeypatch.setattr(detect_job, "run", lambda plan: pytest.fail("training started"))
    cfg = job_dict(empty, no_boxes, tmp_path / "runs", "bad", model={"weights": str(tmp_path / "missing.pth")})
    with pytest.raises(ConfigError) as err:
        detect_job.preflight.check(cfg, "test")
    problems = "\n".join(err.value.problems)
    assert "the training set is empty" in problems
    assert "data.val" in problems and "holds no box of the categories ['car']" in problems
    assert "model.weights: file not found" in problems
    rc = detect_job.main(["--data.train", json.dumps([{"uri": str(empty)}]), "--data.val", str(no_boxes),
                          "--data.categories", "[car]", "--run.storage_path", str(tmp_path / "runs")])
    assert rc == 2
