"""The dataset readers behind `data.format`, without Ray: Ithaca365's v2.2 tables and a COCO JSON written in
exactly their layouts read to the right scenarios and boxes, every bad reference reported (not fatal),
unreadable label files refused with the file named, and the format configs."""
from __future__ import annotations

import json

import pytest

from drivedit.config.base import load_config
from drivedit.config.encode import EncodeJob
from drivedit.config.finetune import FinetuneJob
from drivedit.data.bdd100k import LabelFileError, ScenarioVocabulary
from drivedit.data.sources import read_source
from formats_support import write_coco, write_ithaca365

pytestmark = pytest.mark.unit


def _frames(src) -> dict:
    return {f.name: (f.weather, [(b.category, b.x1, b.y1, b.x2, b.y2) for b in f.boxes]) for f in src.frames}


def test_ithaca365_tables(tmp_path):
    want = write_ithaca365(tmp_path)
    src = read_source("ithaca365", str(tmp_path))
    assert src.images == str(tmp_path) and src.segmentation_classes == []
    assert _frames(src) == want["frames"]
    by_name = {f.name: f for f in src.frames}
    assert by_name[want["broken"]].broken_boxes == ["car a5 bbox: empty or inverted box (500, 500, 400, 600)"]
    night = by_name[next(n for n, (w, _) in want["frames"].items() if w == "night")]
    assert (night.timeofday, night.scene) == ("night", "2021-12-02-night")
    reasons = [p["reason"] for p in src.problems]
    assert len(reasons) == 4 and all(r.startswith("bad reference: ") for r in reasons)
    for what, why in zip(want["bad_references"], ["weather_token 'w-fog' is not in weather.json",
                                                  "scene_token 'sc-zzz' is not in scene.json",
                                                  "key_camera_token 'sd-missing' is not in sample_data.json",
                                                  "sample_data_token 'sd-nowhere' is not in sample_data.json"]):
        assert any(why in r for r in reasons), (what, reasons)
    # the paper's vocabulary keeps every frame, in its order
    kept, dropped = ScenarioVocabulary(["snow", "rain", "night", "sunny", "cloud"], "night", ()).split(src.frames)
    assert dropped == {} and sorted(s for _, s in kept) == [0, 2, 3, 3]


def test_ithaca365_missing_or_bad_table_is_refused_naming_it(tmp_path):
    write_ithaca365(tmp_path)
    (tmp_path / "v2.2" / "object_ann.json").unlink()
    with pytest.raises(LabelFileError, match=r"no object_ann.json in .*v2.2; data.labels must be the folder"):
        read_source("ithaca365", str(tmp_path))
    (tmp_path / "v2.2" / "object_ann.json").write_text('{"not": "a list"}')
    with pytest.raises(LabelFileError, match="object_ann.json must be a JSON list of records"):
        read_source("ithaca365", str(tmp_path))


def test_coco_with_a_scenario_field(tmp_path):
    want = write_coco(tmp_path)
    src = read_source("coco", str(tmp_path), scenario_attribute="weather")
    assert src.images == str(tmp_path / "images")
    assert _frames(src) == want["frames"]
    assert {f.name: f.broken_boxes for f in src.frames}["d.jpg"] == [
        "annotation 14: category_id 77 is not in categories"]
    reasons = sorted(p["reason"] for p in src.problems)
    assert reasons == ["bad reference: annotation 15: image_id 99 is not in images",
                       "bad reference: image 3 has no scenario (field 'weather')",
                       "bad reference: image id 2 appears twice in images"]
    assert {p["frame_id"] for p in src.problems} == {"", "b2.jpg", "c.jpg"}
    night = {f.name: f for f in src.frames}["b.jpg"]
    assert night.timeofday == "night"  # so the night rule and a night scenario agree


def test_coco_scenario_map_wins_over_the_field(tmp_path):
    write_coco(tmp_path)
    (tmp_path / "scenarios.json").write_text(json.dumps({"a.jpg": "snowy", "3": "overcast"}))
    src = read_source("coco", str(tmp_path), scenario_attribute="weather",
                      scenario_map=str(tmp_path / "scenarios.json"))
    got = {f.name: f.weather for f in src.frames}
    assert got == {"a.jpg": "snowy", "b.jpg": "night", "c.jpg": "overcast", "d.jpg": "clear"}
    only_map = read_source("coco", str(tmp_path), scenario_map=str(tmp_path / "scenarios.json"))
    assert {f.name for f in only_map.frames} == {"a.jpg", "c.jpg"}
    assert "has no scenario (an entry in" in only_map.problems[0]["reason"]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(LabelFileError, match="must be a COCO detection JSON"):
        read_source("coco", str(tmp_path), labels=str(tmp_path / "bad.json"), scenario_attribute="weather")


def test_format_configs(tmp_path):
    problems = None
    try:
        EncodeJob.model_validate({"data": {"input": "a", "output": "b", "format": "coco", "segmentation": "m"}})
    except ValueError as e:
        problems = str(e)
    assert "a COCO dataset needs one of them" in problems and "only BDD100K-format datasets" in problems
    enc = load_config(EncodeJob, "configs/ithaca365/encode.yaml", [])
    assert enc.data.format == "ithaca365" and enc.data.scenarios == ["snow", "rain", "night", "sunny", "cloud"]
    assert enc.data.object_categories == ["bus", "car", "truck"] and enc.data.resize == "stretch"
    assert (enc.data.resolution, enc.data.min_box_side_cells) == (256, 2.0)
    assert enc.codec.source == "stabilityai/sd-vae-ft-ema"
    ft = load_config(FinetuneJob, "configs/ithaca365/driveditfit-xl2.yaml", [])
    assert (ft.model.name, ft.method.name, ft.method.rank) == ("DiT-XL/2", "driveditfit", 4)
    assert ft.data.shards == enc.data.output
