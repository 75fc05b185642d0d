"""The procedural scene generator: scenario statistics, determinism, small objects, segmentation masks that
agree with the boxes, speed, CLI."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from drivedit.data.bdd100k import SEGMENTATION_CLASSES, read_bdd100k
from drivedit.data.scene_objects import BOX_CLASS
from drivedit.data.scenes import (main, render_scene, render_scene_with_segmentation, scenario_plan,
                                  write_scenes_dataset)

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _stats(weather: str, timeofday: str, n: int = 8, size: int = 64) -> dict[str, float]:
    """Mean over n frames of: luma, HSV saturation, contrast (luma std), warmth (R - B), sky blueness."""
    rows = []
    for i in range(n):
        img, _ = render_scene(np.random.default_rng([11, i]), weather, timeofday, size, size)
        a = np.asarray(img, np.float32) / 255
        luma = a @ LUMA
        mx, mn = a.max(-1), a.min(-1)
        rows.append({"luma": luma.mean(), "sat": ((mx - mn) / np.maximum(mx, 1e-6)).mean(), "contrast": luma.std(),
                     "warm": (a[..., 0] - a[..., 2]).mean(), "sky_blue": (a[: size // 8, :, 2] - a[: size // 8, :, 0]).mean()})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def test_scenarios_differ_in_simple_statistics():
    s = {w: _stats(w, "daytime") for w in ("clear", "partly cloudy", "overcast", "rainy", "snowy", "foggy")}
    night = {w: _stats(w, "night") for w in ("clear", "rainy", "snowy")}
    dusk = _stats("clear", "dawn/dusk")
    day_lumas = [v["luma"] for v in s.values()]
    # night is dark whatever the weather
    assert max(v["luma"] for v in night.values()) < 0.4 * min(day_lumas)
    # snowy: the brightest day scenario, and desaturated
    assert s["snowy"]["luma"] == max(day_lumas) and s["snowy"]["luma"] > s["clear"]["luma"] + 0.15
    assert s["snowy"]["sat"] < 0.3 * s["clear"]["sat"]
    # rainy: darker and flatter than clear, and grey
    assert s["rainy"]["luma"] < s["clear"]["luma"] - 0.07
    assert s["rainy"]["contrast"] < 0.7 * s["clear"]["contrast"]
    assert s["rainy"]["sat"] < 0.4 * s["clear"]["sat"]
    # overcast: grey and flat, neither as dark as rain nor as bright as snow
    assert s["overcast"]["sat"] < 0.4 * s["clear"]["sat"] and s["overcast"]["contrast"] < s["clear"]["contrast"]
    assert s["rainy"]["luma"] < s["overcast"]["luma"] < s["snowy"]["luma"]
    # foggy: low contrast, washed out
    assert s["foggy"]["contrast"] < 0.75 * s["clear"]["contrast"] and s["foggy"]["sat"] < 0.2 * s["clear"]["sat"]
    # clear and partly cloudy: blue skies (clouds make partly cloudy's less blue)
    assert s["clear"]["sky_blue"] > 0.25 and s["clear"]["sky_blue"] > s["partly cloudy"]["sky_blue"] > 0.08
    assert s["overcast"]["sky_blue"] < 0.03 and s["rainy"]["sky_blue"] < 0.03
    # dawn/dusk: warm light
    assert dusk["warm"] > s["clear"]["warm"] + 0.15
    assert dusk["luma"] < s["clear"]["luma"] and dusk["luma"] > 2 * night["clear"]["luma"]


def test_scenarios_separable_at_32px():
    """A nearest-centroid classifier on three statistics of 32x32 thumbnails tells the six training scenarios
    apart: the signal the CPU demo's class-conditional model learns from."""
    scen = [("clear", "daytime"), ("overcast", "daytime"), ("partly cloudy", "daytime"), ("rainy", "daytime"),
            ("snowy", "daytime"), ("clear", "night")]

    def feats(seed_base, w, t):
        out = []
        for i in range(10):
            img, _ = render_scene(np.random.default_rng([seed_base, i]), w, t, 64, 64)
            a = np.asarray(img.resize((32, 32), Image.BICUBIC), np.float32) / 255
            luma = a @ LUMA
            out.append([luma.mean(), (a.max(-1) - a.min(-1)).mean(), (a[:6, :, 2] - a[:6, :, 0]).mean(), luma.std()])
        return np.array(out)

    centroids = np.stack([feats(1, w, t).mean(0) for w, t in scen])
    correct = total = 0
    for k, (w, t) in enumerate(scen):
        f = feats(2, w, t)
        pred = np.argmin(((f[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        correct += int((pred == k).sum())
        total += len(f)
    assert correct / total >= 0.8, f"nearest-centroid accuracy {correct / total:.2f}"


def test_dataset_is_deterministic_per_seed(tmp_path):
    a = write_scenes_dataset(str(tmp_path / "a"), num=5, size=40, seed=4)
    write_scenes_dataset(str(tmp_path / "b"), num=5, size=40, seed=4)
    write_scenes_dataset(str(tmp_path / "c"), num=5, size=40, seed=5)
    assert (tmp_path / "a" / "labels.json").read_text() == (tmp_path / "b" / "labels.json").read_text()
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == [f"scene-4-{i:06d}.jpg" for i in range(5)]
    for n in names:
        assert (tmp_path / "a" / "images" / n).read_bytes() == (tmp_path / "b" / "images" / n).read_bytes()
    c0 = np.asarray(Image.open(tmp_path / "c" / "images" / "scene-5-000000.jpg"), np.float32)
    a0 = np.asarray(Image.open(tmp_path / "a" / "images" / names[0]), np.float32)
    assert np.abs(c0 - a0).mean() > 5
    assert a["frames"] == 5 and a["width"] == a["height"] == 40 and sum(a["counts"].values()) == 5


def test_many_objects_are_small_and_boxes_lie_in_the_image():
    heights = []
    for i in range(12):
        img, boxes = render_scene(np.random.default_rng([0, i]), "clear", "daytime", 192, 128)
        assert img.size == (192, 128)
        for b in boxes:
            assert 0 <= b.x1 < b.x2 <= 192 and 0 <= b.y1 < b.y2 <= 128
            assert b.x2 - b.x1 >= 2 and b.y2 - b.y1 >= 2
            heights.append(b.y2 - b.y1)
    heights = np.array(heights)
    assert len(heights) >= 60
    assert (heights < 0.06 * 128).mean() > 0.3 and heights.max() > 0.2 * 128  # small ones and near ones


def _box_region(b, shape) -> tuple[slice, slice]:
    return (slice(int(np.floor(b.y1)), min(int(np.ceil(b.y2)), shape[0])),
            slice(int(np.floor(b.x1)), min(int(np.ceil(b.x2)), shape[1])))


@pytest.mark.parametrize("weather, timeofday", [("clear", "daytime"), ("rainy", "night"), ("snowy", "dawn/dusk")])
def test_segmentation_agrees_with_the_boxes(weather, timeofday):
    train_id = {name: i for i, name in enumerate(SEGMENTATION_CLASSES)}
    # the box categories drawn here and BDD100K's names for their segmentation classes
    assert BOX_CLASS == {"car": train_id["car"], "truck": train_id["truck"], "bus": train_id["bus"],
                         "pedestrian": train_id["person"], "traffic light": train_id["traffic light"],
                         "traffic sign": train_id["traffic sign"]}
    seen, vehicle_share = set(), []
    for i in range(10):
        img, boxes, seg = render_scene_with_segmentation(np.random.default_rng([7, i]), weather, timeofday, 192, 128)
        assert seg.shape == (128, 192) and seg.dtype == np.uint8
        assert set(np.unique(seg)) <= set(range(19)) | {255}
        for b in boxes:  # each box's object is in the mask, under its class, inside the box
            region = seg[_box_region(b, seg.shape)]
            share = (region == BOX_CLASS[b.category]).mean()
            assert share > 0, (i, b)
            if b.category in ("car", "truck", "bus") and b.x2 - b.x1 >= 6:
                vehicle_share.append(share)
        for cat, cid in BOX_CLASS.items():  # and every pixel of a box class lies in a box of that class
            covered = np.zeros(seg.shape, bool)
            for b in boxes:
                if b.category == cat:
                    covered[_box_region(b, seg.shape)] = True
            assert not ((seg == cid) & ~covered).any(), (i, cat)
        seen |= set(np.unique(seg).tolist())
        # the background: sky only above the horizon (at most 0.47 of the height), road only below it
        rows = np.arange(128)[:, None].repeat(192, 1)
        assert rows[seg == train_id["sky"]].max() < 0.47 * 128 and rows[seg == train_id["road"]].min() >= 0.40 * 128
    assert {train_id[c] for c in ("road", "sidewalk", "building", "sky", "pole", "car")} <= seen
    assert len(vehicle_share) > 10 and np.median(vehicle_share) > 0.6  # a vehicle fills most of its box


def test_dataset_writes_masks_the_reader_returns(tmp_path):
    write_scenes_dataset(str(tmp_path / "ds"), num=4, size=40, seed=2, aspect=1.5)
    src = read_bdd100k(str(tmp_path / "ds"))
    assert len(src.frames) == 4 and src.segmentation_classes == list(SEGMENTATION_CLASSES)
    for f in src.frames:
        assert f.segmentation == str(tmp_path / "ds" / "labels" / "sem_seg" / "masks" / f.name.replace(".jpg", ".png"))
        mask = np.asarray(Image.open(f.segmentation))
        _, boxes, seg = render_scene_with_segmentation(np.random.default_rng([2, int(f.name[-10:-4])]), f.weather,
                                                       f.timeofday, 60, 40)
        np.testing.assert_array_equal(mask, seg)  # PNG: the exact ids


def test_scenario_plan_takes_turns():
    plan = scenario_plan(70, 0, ["clear", "rainy", "foggy"], ["daytime", "dawn/dusk", "night"])
    assert len(plan) == 70
    nights = sum(t == "night" for _, t in plan)
    assert abs(nights - 70 / 4) <= 1
    for w in ("clear", "rainy", "foggy"):
        assert abs(sum(pw == w and t != "night" for pw, t in plan) - 70 / 4) <= 1
    assert {t for _, t in plan} == {"daytime", "dawn/dusk", "night"}
    assert scenario_plan(9, 3, ["snowy"], ["night"]) == [("snowy", "night")] * 9
    with pytest.raises(ValueError, match="unknown weather 'sandstorm'"):
        scenario_plan(3, 0, ["sandstorm"], ["daytime"])


def test_render_time_well_under_50ms_at_256():
    plan = scenario_plan(12, 0, ["clear", "overcast", "partly cloudy", "rainy", "snowy", "foggy"],
                         ["daytime", "dawn/dusk", "night"])
    start = time.process_time()  # CPU time: other processes sharing the machine do not count
    for i, (w, t) in enumerate(plan):
        render_scene(np.random.default_rng([0, i]), w, t, 256, 256)
    per_frame = (time.process_time() - start) / len(plan)
    assert per_frame < 0.05, f"{per_frame * 1000:.1f} ms CPU per 256 px frame"


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num", "3", "--size", "32", "--aspect", "1.5", "--seed", "2",
                 "--weathers", "snowy", "--timesofday", "night", "--format", "png"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"snowy / night": 3} and summary["width"] == 48
    labels = json.loads((out / "labels.json").read_text())
    assert [f["name"] for f in labels] == [f"scene-2-{i:06d}.png" for i in range(3)]
    assert all(f["attributes"] == {"weather": "snowy", "timeofday": "night", "scene": "city street"} for f in labels)
    assert Image.open(out / "images" / "scene-2-000000.png").size == (48, 32)
    assert Image.open(out / "labels" / "sem_seg" / "masks" / "scene-2-000000.png").size == (48, 32)
    assert main(["--out", str(tmp_path / "x"), "--num", "2", "--weathers", "hail"]) == 2
    assert "unknown weather 'hail'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
