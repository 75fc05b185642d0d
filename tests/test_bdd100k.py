"""BDD100K label parsing (both layouts, edge cases, malformed files), segmentation masks, and the scenario
vocabulary."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from drivedit.data.bdd100k import (DEFAULT_SCENARIOS, Box, Frame, LabelFileError, ScenarioVocabulary,
                                   load_label_file, load_segmentation, read_bdd100k, write_label_file)
from drivedit.data.scenes import write_scenes_dataset

# the image-label layout: box2d objects mixed with poly2d lanes / drivable areas
IMAGE_LABELS = [
    {"name": "a.jpg", "attributes": {"weather": "clear", "scene": "city street", "timeofday": "daytime"},
     "timestamp": 10000,
     "labels": [
         {"category": "traffic light", "attributes": {"trafficLightColor": "green"}, "id": 0,
          "box2d": {"x1": 1000.5, "y1": 133.2, "x2": 1013.4, "y2": 161.1}},
         {"category": "car", "id": 1, "box2d": {"x1": 45, "y1": 254, "x2": 357, "y2": 487}},
         {"category": "lane", "id": 2, "poly2d": [{"vertices": [[0, 0], [10, 10]], "types": "LL", "closed": False}]},
         {"category": "drivable area", "id": 3, "poly2d": [{"vertices": [[0, 0], [5, 5], [0, 5]]}]},
     ]},
    # night wins over the weather
    {"name": "b.jpg", "attributes": {"weather": "rainy", "scene": "highway", "timeofday": "night"}, "labels": []},
    # foggy and undefined weathers are dropped ...
    {"name": "c.jpg", "attributes": {"weather": "foggy", "scene": "highway", "timeofday": "daytime"}, "labels": []},
    {"name": "d.jpg", "attributes": {"weather": "undefined", "scene": "tunnel", "timeofday": "dawn/dusk"}},
    # ... unless it is night
    {"name": "e.jpg", "attributes": {"weather": "foggy", "scene": "highway", "timeofday": "night"}, "labels": None},
    # broken boxes: inverted, missing corner, non-numeric; the frame is still read
    {"name": "f.jpg", "attributes": {"weather": "snowy", "scene": "residential", "timeofday": "daytime"},
     "labels": [{"category": "car", "id": 7, "box2d": {"x1": 50, "y1": 10, "x2": 40, "y2": 20}},
                {"category": "bus", "id": 8, "box2d": {"x1": 5, "y1": 6, "x2": 7}},
                {"category": "truck", "id": 9, "box2d": {"x1": "a", "y1": 6, "x2": 7, "y2": 9}},
                {"category": "pedestrian", "id": 10, "box2d": {"x1": 1, "y1": 2, "x2": 3, "y2": 4}}]},
    # no attributes at all
    {"name": "g.jpg"},
]

# det_20: ids are strings, categories use the det_20 names, frames without objects lack `labels`
DET20 = [
    {"name": "h.jpg", "attributes": {"weather": "partly cloudy", "timeofday": "daytime", "scene": "city street"},
     "timestamp": 10000,
     "labels": [{"id": "12", "category": "pedestrian", "attributes": {"occluded": False, "truncated": False,
                                                                      "crowd": False},
                 "box2d": {"x1": 10.0, "y1": 20.0, "x2": 30.0, "y2": 80.0}}]},
    {"name": "i.jpg", "attributes": {"weather": "overcast", "timeofday": "dawn/dusk", "scene": "highway"},
     "timestamp": 10000},
]


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


def test_image_label_layout(tmp_path):
    frames = load_label_file(_write(tmp_path, "labels.json", IMAGE_LABELS))
    assert [f.name for f in frames] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.jpg"]
    a = frames[0]
    assert (a.weather, a.timeofday, a.scene) == ("clear", "daytime", "city street")
    assert [b.category for b in a.boxes] == ["traffic light", "car"]  # poly2d labels carry no box
    tl = a.boxes[0]
    assert (tl.x1, tl.y1, tl.x2, tl.y2) == (1000.5, 133.2, 1013.4, 161.1)
    assert tl.attributes["trafficLightColor"] == "green"
    assert abs(a.boxes[1].width - 312) < 1e-9 and abs(a.boxes[1].height - 233) < 1e-9
    assert a.broken_boxes == []
    assert frames[1].boxes == [] and frames[4].boxes == []
    f = frames[5]
    assert [b.category for b in f.boxes] == ["pedestrian"]
    assert len(f.broken_boxes) == 3
    assert "inverted" in f.broken_boxes[0] and "car 7" in f.broken_boxes[0]
    assert "numeric" in f.broken_boxes[1] and "numeric" in f.broken_boxes[2]
    g = frames[6]
    assert (g.weather, g.timeofday, g.scene, g.boxes) == ("undefined", "undefined", "undefined", [])


def test_det20_layout_and_scalabel_wrapper(tmp_path):
    frames = load_label_file(_write(tmp_path, "det_train.json", DET20))
    assert [(f.name, f.weather, f.timeofday, len(f.boxes)) for f in frames] == [
        ("h.jpg", "partly cloudy", "daytime", 1), ("i.jpg", "overcast", "dawn/dusk", 0)]
    assert frames[0].boxes[0].category == "pedestrian" and frames[0].boxes[0].height == 60.0
    wrapped = load_label_file(_write(tmp_path, "scalabel.json", {"frames": DET20, "config": {}}))
    assert [f.name for f in wrapped] == ["h.jpg", "i.jpg"]


@pytest.mark.parametrize("content, match", [
    ("{not json", r"bad\.json: not valid JSON"),
    ({"name": "x.jpg"}, r"bad\.json: expected a JSON list of frames"),
    ([{"name": "ok.jpg"}, 5], r"bad\.json: frame #1 is int"),
    ([{"attributes": {}}], r"bad\.json: frame #0 has no 'name'"),
    ([{"name": "x.jpg", "labels": {"a": 1}}], r"bad\.json: frame #0 \(x\.jpg\): 'labels' must be a list"),
    ([{"name": "x.jpg", "attributes": ["clear"]}], r"frame #0 \(x\.jpg\): 'attributes' must be an object"),
])
def test_malformed_file_names_path_and_frame(tmp_path, content, match):
    with pytest.raises(LabelFileError, match=match):
        load_label_file(_write(tmp_path, "bad.json", content))


def test_missing_file(tmp_path):
    with pytest.raises(LabelFileError, match="label file not found: .*nope.json"):
        load_label_file(str(tmp_path / "nope.json"))


def test_default_vocabulary_rules(tmp_path):
    frames = load_label_file(_write(tmp_path, "labels.json", IMAGE_LABELS + DET20))
    vocab = ScenarioVocabulary()
    assert vocab.names == DEFAULT_SCENARIOS == ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]
    got = {f.name: vocab.scenario_of(f) for f in frames}
    assert got == {"a.jpg": 0, "b.jpg": 5, "c.jpg": None, "d.jpg": None, "e.jpg": 5, "f.jpg": 4, "g.jpg": None,
                   "h.jpg": 2, "i.jpg": 1}
    kept, dropped = vocab.split(frames)
    assert [(f.name, s) for f, s in kept] == [("a.jpg", 0), ("b.jpg", 5), ("e.jpg", 5), ("f.jpg", 4), ("h.jpg", 2),
                                              ("i.jpg", 1)]
    assert dropped == {"weather foggy": 1, "weather undefined": 2}


def test_custom_vocabulary():
    vocab = ScenarioVocabulary(["rainy", "clear"], night=None, drop=())
    night_rain = Frame("x", weather="rainy", timeofday="night")
    assert vocab.scenario_of(night_rain) == 0  # no night scenario: weather decides
    assert vocab.classify(Frame("y", weather="snowy")) == (None, "weather snowy (not in the vocabulary)")
    assert vocab.scenario_of(Frame("z", weather="clear")) == 1
    with pytest.raises(ValueError, match="night scenario 'night' is not in the vocabulary"):
        ScenarioVocabulary(["clear"])
    with pytest.raises(ValueError, match="unique"):
        ScenarioVocabulary(["clear", "clear"], night=None)


def test_write_then_read_roundtrip(tmp_path):
    frames = [Frame("p.jpg", "rainy", "night", "highway", [Box("car", 1, 2, 3.5, 4.25, {"occluded": True})]),
              Frame("q.png", "clear", "daytime", "tunnel", [])]
    uri = str(tmp_path / "out" / "labels.json")
    write_label_file(frames, uri)
    back = load_label_file(uri)
    assert back == frames


def test_generated_dataset_parses(tmp_path):
    summary = write_scenes_dataset(str(tmp_path / "ds"), num=14, size=48, seed=3)
    frames = load_label_file(str(tmp_path / "ds" / "labels.json"))
    assert len(frames) == 14 == summary["frames"]
    assert sum(len(f.boxes) for f in frames) == summary["objects"] > 14
    cats = {b.category for f in frames for b in f.boxes}
    assert cats <= {"car", "truck", "bus", "pedestrian", "traffic light", "traffic sign"}
    assert cats & {"car", "truck", "bus"}
    for f in frames:
        assert (tmp_path / "ds" / "images" / f.name).is_file()
        assert f.broken_boxes == []
        for b in f.boxes:
            assert 0 <= b.x1 < b.x2 <= 48 and 0 <= b.y1 < b.y2 <= 48
    kept, dropped = ScenarioVocabulary().split(frames)
    # 7 scenario slots (6 weathers + night) take turns: 14 frames = 2 rounds, 2 foggy days dropped
    assert dropped == {"weather foggy": 2} and len(kept) == 12
    assert sorted(s for _, s in kept) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_reader_attaches_segmentation_masks_where_they_exist(tmp_path):
    root = tmp_path / "bdd"
    frames = [Frame("a.jpg", "clear", "daytime"), Frame("sub/b.jpg", "rainy", "night"), Frame("c.jpg", "snowy")]
    write_label_file(frames, str(root / "labels.json"))
    masks = root / "labels" / "sem_seg" / "masks"
    (masks / "sub").mkdir(parents=True)
    ids = np.array([[0, 13], [255, 10]], np.uint8)
    Image.fromarray(ids).save(masks / "a.png")
    Image.fromarray(ids[::-1]).save(masks / "sub" / "b.png")
    src = read_bdd100k(str(root))
    assert [f.segmentation for f in src.frames] == [str(masks / "a.png"), str(masks / "sub" / "b.png"), None]
    assert src.images == str(root / "images") and src.segmentation_classes[13] == "car" and src.problems == []
    np.testing.assert_array_equal(load_segmentation(src.frames[0].segmentation), ids)
    # no mask folder at all: no segmentation classes, no masks
    plain = read_bdd100k(str(root), masks=str(tmp_path / "none"))
    assert plain.segmentation_classes == [] and all(f.segmentation is None for f in plain.frames)


def test_load_segmentation_refuses_what_is_not_train_ids(tmp_path):
    Image.fromarray(np.array([[0, 19]], np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"values \[19\] that are not train ids 0..18 or 255"):
        load_segmentation(str(tmp_path / "bad.png"))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode RGB"):
        load_segmentation(str(tmp_path / "rgb.png"))
    with pytest.raises(ValueError, match="not found"):
        load_segmentation(str(tmp_path / "none.png"))
