"""Ignore regions: a dataset's small boxes become regions Faster R-CNN neither learns to find nor calls
background (drivedit.detect.ignore_regions), from the config field to the samplers of both stages."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from drivedit.detect.dataset import FrameStore, read_frames
from drivedit.detect.ignore_regions import IGNORE_KEY, inside_share, unsample_inside


def fasterrcnn():
    from drivedit.detect.detector import assemble, new_spec

    spec = new_spec({"arch": "fasterrcnn", "backbone": "resnet18", "fpn_channels": 16}, ["car"], 64,
                    {"max_detections": 100, "score_threshold": 0.01})
    torch.manual_seed(0)
    return assemble(spec)


def test_inside_share_is_the_covered_fraction_of_each_box():
    boxes = torch.tensor([[0.0, 0, 4, 4], [2, 2, 6, 6], [10, 10, 12, 12]])
    regions = torch.tensor([[0.0, 0, 4, 2], [0, 0, 4, 4]])
    # box 1 lies inside region 2; box 2 has a quarter of its area in region 2; box 3 none
    np.testing.assert_allclose(inside_share(boxes, regions).numpy(), [1.0, 0.25, 0.0])


def test_only_background_samples_inside_a_region_are_unsampled():
    labels = torch.tensor([0.0, 1.0, 0.0, -1.0])
    boxes = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [8, 8, 10, 10], [0, 0, 2, 2]])
    out = unsample_inside(labels, boxes, torch.tensor([[0.0, 0, 3, 3]]))
    assert out.tolist() == [-1.0, 1.0, 0.0, -1.0]  # a matched target stays positive; outside stays background
    assert unsample_inside(labels, boxes, torch.zeros(0, 4)) is labels


def test_rpn_anchors_inside_an_ignore_region_are_neither_object_nor_background():
    rpn = fasterrcnn().rpn
    anchors = [torch.tensor([[0.0, 0, 8, 8], [1, 1, 7, 7], [30, 30, 40, 40], [50, 50, 60, 60]])]
    car = {"boxes": torch.tensor([[30.0, 30, 40, 40]]), "labels": torch.tensor([1])}
    plain, _ = rpn.assign_targets_to_anchors(anchors, [car])
    ignored, _ = rpn.assign_targets_to_anchors(anchors, [{**car, IGNORE_KEY: torch.tensor([[0.0, 0, 8, 8]])}])
    assert plain[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert ignored[0].tolist() == [-1.0, -1.0, 1.0, 0.0]


def test_box_head_samples_no_background_inside_an_ignore_region():
    heads = fasterrcnn().roi_heads
    torch.manual_seed(0)
    xy = torch.rand(200, 2) * 56
    proposals = [torch.cat([xy, xy + 8], dim=1)]  # (200, 4) 8 px boxes over a 64 px image
    region = torch.tensor([[0.0, 0, 32, 64]])  # the left half
    target = {"boxes": torch.tensor([[40.0, 40, 48, 48]]), "labels": torch.tensor([1])}

    def sampled_background(t):
        props, _, labels, _ = heads.select_training_samples([p.clone() for p in proposals], [t])
        return props[0][labels[0] == 0], props[0][labels[0] > 0]

    bg_plain, pos_plain = sampled_background(target)
    bg, pos = sampled_background({**target, IGNORE_KEY: region})
    assert (inside_share(bg_plain, region) > 0.5).sum() > 20  # without the region, half the background is there
    assert (inside_share(bg, region) > 0.5).sum() == 0
    assert len(pos) == len(pos_plain) > 0  # the real target's positives are untouched
    assert heads._regions is None  # nothing of the batch is left on the module


def test_store_turns_a_datasets_small_boxes_into_ignore_regions(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "images" / "a.png")
    boxes = [(2, 2, 6, 6), (10, 10, 30, 30), (40, 40, 45, 50)]  # sides 8, 40, 14.1 px at 128 px
    labels = [{"category": "car", "box2d": dict(zip(("x1", "y1", "x2", "y2"), b))} for b in boxes]
    (tmp_path / "labels.json").write_text(json.dumps([{"name": "a.png", "labels": labels}]))
    frames, _ = read_frames(str(tmp_path), "labels.json", ["car"], {}, ["clear"])
    frames[0].ignore_under = 19.2  # COCO's medium/large limit at 128 px
    store = FrameStore(frames, 128)
    item = store.get(0)
    np.testing.assert_allclose(item.boxes, [[20, 20, 60, 60]])
    np.testing.assert_allclose(item.ignore, [[4, 4, 12, 12], [80, 80, 90, 100]])
    assert store.report.to_dict()["ignored_small_boxes"] == 2


def test_ignore_under_needs_fasterrcnn():
    from drivedit.config.detect import DetectJob

    with pytest.raises(ValueError, match=r"learn_background: false is set for \['synthetic'\].*'fcos'.*use fasterrcnn"):
        DetectJob.model_validate({"model": {"arch": "fcos"}, "data": {"train": [
            {"uri": "real"}, {"uri": "synthetic", "ignore_under": 19.2}], "val": "val"}})


class FixedDetections(torch.nn.Module):
    """A detector that finds the same boxes (in its 64 px input's pixels) in every image."""

    def forward(self, images):
        return [{"boxes": torch.tensor([[8.0, 8, 24, 24], [40, 40, 60, 60], [2, 40, 20, 60]]),
                 "scores": torch.tensor([0.9, 0.8, 0.3]), "labels": torch.tensor([1, 1, 1])} for _ in images]


def test_confident_unlabelled_detections_are_marked_as_ignore_regions(tmp_path):
    from drivedit.detect.unlabelled import mark_unlabelled

    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "images" / name)
    (tmp_path / "images" / "b.png").write_bytes(b"not a png")
    car = {"category": "car", "box2d": {"x1": 4, "y1": 4, "x2": 12, "y2": 12}}  # = the first detection at 32 px
    (tmp_path / "labels.json").write_text(json.dumps([{"name": n, "labels": [car]} for n in ("a.png", "b.png")]))
    spec = {"image_size": 64, "categories": ["car"], "backbone": "resnet18"}
    r = mark_unlabelled(FixedDetections(), spec, str(tmp_path), out_file="marked.json", score=0.5, marked_by="t")
    assert (r["frames"], r["marked_boxes"], r["frames_marked"]) == (2, 1, 1)
    assert len(r["corrupt_images"]) == 1 and "b.png" in r["corrupt_images"][0]
    written = json.loads((tmp_path / "marked.json").read_text())
    extra = written[0]["labels"][1]  # the 0.8 detection, halved to the image's 32 px; 0.3 is under the score
    assert extra["box2d"] == {"x1": 20.0, "y1": 20.0, "x2": 30.0, "y2": 30.0}
    assert extra["attributes"] == {"ignore": True, "marked_by": "t", "score": 0.8}
    assert len(written[1]["labels"]) == 1 and json.loads((tmp_path / "labels.json").read_text())[0]["labels"] == [car]
    # the detect job reads the mark as an ignore region (training: neither object nor background; scoring: crowd)
    frames, report = read_frames(str(tmp_path), "marked.json", ["car"], {}, ["clear"])
    np.testing.assert_allclose(frames[0].ignore_boxes, [[20, 20, 30, 30]])
    assert frames[0].ignore_labels.tolist() == [1]  # its category, so scoring can make it a crowd region of it
    assert len(frames[0].boxes) == 1 and report.ignore_regions == 1


def test_mark_unlabelled_command_writes_the_marked_file_and_names_bad_input(tmp_path, capsys):
    from drivedit.detect.detector import assemble, new_spec
    from drivedit.detect.models import save_detector
    from drivedit.detect.unlabelled import main

    (tmp_path / "d" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "d" / "images" / "a.png")
    (tmp_path / "d" / "labels.json").write_text(json.dumps([{"name": "a.png", "labels": []}]))
    spec = new_spec({"arch": "fasterrcnn", "backbone": "resnet18", "fpn_channels": 16}, ["car"], 64,
                    {"max_detections": 100, "score_threshold": 0.01})
    save_detector(tmp_path / "det", assemble(spec), spec)
    args = ["--detector", str(tmp_path / "det"), "--data", str(tmp_path / "d"), "--score", "0.999"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["frames"], report["marked_boxes"]) == (1, 0)  # a random detector is never that sure
    assert json.loads((tmp_path / "d" / "labels-marked.json").read_text())[0]["name"] == "a.png"
    assert main([*args, "--out-file", "labels.json"]) == 2
    assert "--out-file must differ" in capsys.readouterr().err
    assert main(["--detector", str(tmp_path / "nothing"), "--data", str(tmp_path / "d")]) == 2
    assert "holds no detector.json" in capsys.readouterr().err


def test_a_frame_that_learns_no_background_keeps_only_its_targets(tmp_path):
    """learn_background false: every anchor but the targets' positives is left out of the RPN's samples."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "images" / "a.png")
    car = {"category": "car", "box2d": {"x1": 30, "y1": 30, "x2": 40, "y2": 40}}
    (tmp_path / "labels.json").write_text(json.dumps([{"name": "a.png", "labels": [car]}]))
    frames, _ = read_frames(str(tmp_path), "labels.json", ["car"], {}, ["clear"])
    frames[0].learn_background = False
    item = FrameStore(frames, 64).get(0)
    np.testing.assert_allclose(item.boxes, [[30, 30, 40, 40]])
    target = {"boxes": torch.from_numpy(item.boxes), "labels": torch.from_numpy(item.labels),
              IGNORE_KEY: torch.from_numpy(item.ignore)}
    anchors = [torch.tensor([[0.0, 0, 8, 8], [30, 30, 40, 40], [50, 50, 64, 64], [-4, -4, 4, 4]])]
    labels, _ = fasterrcnn().rpn.assign_targets_to_anchors(anchors, [target])
    assert labels[0].tolist() == [-1.0, 1.0, -1.0, -1.0]  # the anchor over the border too
