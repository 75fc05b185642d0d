"""COCO JSON and YOLO labels from BDD100K frames (unit: no Ray).

The COCO file is read back with pycocotools (and scored against itself with COCOeval: AP 1.0 only when
every box and category survived); the YOLO files with a plain parser, box by box against labels.json.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from drivedit.config.base import load_config
from drivedit.config.generate import GenerateJob
from drivedit.data.bdd100k import Box, Frame, load_label_file, write_label_file
from drivedit.data.scenes import write_scenes_dataset
from drivedit.generate import dataset
from drivedit.generate.label_formats import DET20_CATEGORIES, convert_folder, main



def parse_yolo(path) -> list[tuple[int, float, float, float, float]]:
    """A YOLO label file as (class, cx, cy, w, h) rows; checks each line has exactly five fields."""
    rows = []
    for line in path.read_text().splitlines():
        fields = line.split()
        assert len(fields) == 5, line
        rows.append((int(fields[0]), *map(float, fields[1:])))
    return rows


def yolo_to_corners(row, width: int, height: int) -> tuple[int, list[float]]:
    cls, cx, cy, w, h = row
    return cls, [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """`drivedit scenes` output: 6 frames, 64 x 96 px (aspect 1.5), with car / truck / bus boxes."""
    root = tmp_path_factory.mktemp("scenes") / "data"
    write_scenes_dataset(str(root), 6, size=64, seed=3, aspect=1.5, image_format="png")
    return root


def test_scenes_round_trip_through_pycocotools_and_a_yolo_parser(scenes, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    assert main([str(scenes), "--to", "coco", "yolo"]) == 0
    report = json.loads(capsys.readouterr().out)
    frames = load_label_file(str(scenes / "labels.json"))
    num_boxes = sum(len(f.boxes) for f in frames)
    assert num_boxes > 0  # the test means nothing without boxes
    assert report["frames"] == 6 and report["boxes"] == num_boxes and report["skipped_boxes"] == {}
    assert report["categories"][:10] == list(DET20_CATEGORIES)

    coco = COCO(str(scenes / "coco.json"))
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) == num_boxes
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert [names[i + 1] for i in range(len(names))] == report["categories"]
    for image_id, frame in zip(sorted(coco.getImgIds()), frames):
        img = coco.loadImgs(image_id)[0]
        assert img["file_name"] == frame.name and (img["width"], img["height"]) == (96, 64)
        assert (img["weather"], img["timeofday"]) == (frame.weather, frame.timeofday)
        assert Image.open(scenes / "images" / img["file_name"]).size == (96, 64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        got = sorted((names[a["category_id"]], *a["bbox"]) for a in anns)
        want = sorted((b.category, b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1) for b in frame.boxes)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g[0] == w[0] and np.allclose(g[1:], w[1:], atol=2e-3)
        assert all(a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=1e-2) for a in anns)

    # the boxes as detections against themselves: COCOeval gives AP 1 only if every box kept its image,
    # category and place
    dets = coco.loadRes([{**a, "score": 1.0} for a in coco.loadAnns(coco.getAnnIds())])
    ev = COCOeval(coco, dets, "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)

    spec = yaml.safe_load((scenes / "dataset.yaml").read_text())
    assert spec["path"] == str(scenes) and spec["train"] == spec["val"] == "images"
    assert spec["names"] == dict(enumerate(report["categories"]))
    for frame in frames:
        label = scenes / "labels" / (frame.name.rsplit(".", 1)[0] + ".txt")
        rows = parse_yolo(label)
        assert len(rows) == len(frame.boxes)
        for row, box in zip(rows, frame.boxes):
            assert all(0.0 <= v <= 1.0 for v in row[1:])
            cls, corners = yolo_to_corners(row, 96, 64)
            assert spec["names"][cls] == box.category
            # six decimals of a normalised coordinate: well under a pixel
            assert np.allclose(corners, [box.x1, box.y1, box.x2, box.y2], atol=1e-3)


def _image(path, size=(40, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (9, 9, 9)).save(path)


def test_clipping_vocabulary_missing_images_and_nested_folders(tmp_path):
    """BDD100K release layout (images/100k/train/<name>), a box half outside, one fully outside, a
    category outside the given vocabulary, a frame without boxes and a frame without an image."""
    root = tmp_path / "bdd"
    _image(root / "images/100k/train/a.jpg")
    _image(root / "images/100k/train/b.jpg")
    frames = [
        Frame("a.jpg", "rainy", "daytime", boxes=[Box("car", -5, 2, 10, 12), Box("car", 50, 0, 60, 10),
                                                     Box("truck", 30, 5, 38, 25), Box("rider", 1, 1, 4, 4)]),
        Frame("b.jpg", "clear", "night"),
        Frame("gone.jpg", "snowy", "daytime", boxes=[Box("car", 1, 1, 5, 5)]),
    ]
    write_label_file(frames, str(root / "labels.json"))
    report = convert_folder(str(root), ["coco", "yolo"], categories=["truck", "car"]).to_dict()
    assert report["categories"] == ["truck", "car"] and report["frames"] == 2
    assert report["missing_images"] == 1 and report["missing_examples"] == ["gone.jpg"]
    assert report["boxes"] == 2
    assert report["skipped_boxes"] == {"outside the image": 1, "category 'rider' not in the vocabulary": 1}

    doc = json.loads((root / "coco.json").read_text())
    assert [i["file_name"] for i in doc["images"]] == ["100k/train/a.jpg", "100k/train/b.jpg"]
    anns = sorted((a["category_id"], a["bbox"]) for a in doc["annotations"])
    # car clipped at x = 0; truck clipped at the bottom edge (y = 20)
    assert anns == [(1, [30.0, 5.0, 8.0, 15.0]), (2, [0.0, 2.0, 10.0, 10.0])]

    rows = parse_yolo(root / "labels/100k/train/a.txt")
    assert sorted(rows) == sorted([(1, 0.125, 0.35, 0.25, 0.5), (0, 0.85, 0.625, 0.2, 0.75)])
    assert (root / "labels/100k/train/b.txt").read_text() == ""  # a background image
    assert not (root / "labels/100k/train/gone.txt").exists()


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path), "--to", "coco"]) == 2
    assert "has no labels.json" in capsys.readouterr().err
    root = tmp_path / "flat"
    _image(root / "images/a.png")
    _image(root / "x.png")
    write_label_file([Frame("a.png", boxes=[Box("car", 1, 1, 3, 3)]), Frame("x.png", boxes=[Box("car", 1, 1, 3, 3)])],
                     str(root / "labels.json"))
    with pytest.raises(ValueError, match="not under images/"):
        convert_folder(str(root), ["yolo"])
    assert not (root / "labels").exists() and not (root / "coco.json").exists()
    with pytest.raises(ValueError, match="unique names"):
        convert_folder(str(root), ["coco"], categories=["car", "car"])
    with pytest.raises(ValueError, match="label_formats"):
        load_config(GenerateJob, data={"model": {"ref": "x"}, "spec": {"counts": {"rainy": 1}},
                                       "output": {"uri": "o", "label_formats": ["voc"]}})


def test_generated_dataset_finalize_writes_the_formats_asked_for(tmp_path):
    """A generated dataset's frames (no boxes yet): one COCO image and one empty YOLO file per item."""
    uri = str(tmp_path / "gen")
    rows = []
    for i in range(3):
        name = dataset.image_name(0, i)
        _image(tmp_path / "gen/images" / name, (16, 16))
        weather, tod = dataset.scenario_attributes(["rainy", "night", "clear"][i])
        rows.append({"index": i, "seed": i, "scenario": "x", "class_id": 0, "shard": 0, "name": name,
                     "weather": weather, "timeofday": tod, "width": 16, "height": 16, "model_version": "m",
                     "spec_hash": "h", "sampler": "ddim", "steps": 2, "guidance": 1.0, "guidance_kind": "cfg",
                     "guide_channels": None})
    dataset.write_part(uri, 0, rows)
    dataset.finalize(uri, 3, 1, ["coco", "yolo"])
    doc = json.loads((tmp_path / "gen/coco.json").read_text())
    assert [(i["file_name"], i["width"], i["weather"], i["timeofday"]) for i in doc["images"]] == [
        ("00000/00000000.png", 16, "rainy", "daytime"), ("00000/00000001.png", 16, "undefined", "night"),
        ("00000/00000002.png", 16, "clear", "daytime")]
    assert doc["annotations"] == []
    for i in range(3):
        assert (tmp_path / f"gen/labels/00000/{i:08d}.txt").read_text() == ""
    assert dataset.missing_label_formats(uri, ["coco", "yolo"]) == []
    (tmp_path / "gen/coco.json").unlink()
    assert dataset.missing_label_formats(uri, ["coco", "yolo"]) == ["coco"]
    table = dataset.read_manifest(uri)
    assert isinstance(table, pa.Table) and table.num_rows == 3
