"""The procedural object-centric source dataset: deterministic, every class present, classes that
differ in simple statistics the way the scenarios they relate to differ (snow bright, night dark)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from drivedit.data.objects import CLASS_NAMES, render_object, write_objects_dataset


def test_render_is_deterministic_and_varied():
    a = render_object(3, 32, seed=7)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_object(3, 32, seed=7))
    assert not np.array_equal(a, render_object(3, 32, seed=8))  # backgrounds and placement vary per seed
    assert render_object(3, 64, seed=7).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="class_id"):
        render_object(len(CLASS_NAMES), 32, 0)


def test_dataset_layout_and_every_class(tmp_path):
    summary = write_objects_dataset(tmp_path / "objects", num_per_class=3, size=32, seed=1)
    root = tmp_path / "objects"
    assert summary["num_images"] == 3 * len(CLASS_NAMES) and summary["num_classes"] == len(CLASS_NAMES)
    assert json.loads((root / "classes.json").read_text()) == CLASS_NAMES
    frames = json.loads((root / "labels.json").read_text())
    assert sorted({f["attributes"]["class"] for f in frames}) == sorted(CLASS_NAMES)
    for f in frames:
        assert CLASS_NAMES[f["attributes"]["class_id"]] == f["attributes"]["class"]
        img = np.asarray(Image.open(root / "images" / f["name"]))
        assert img.shape == (32, 32, 3)
    # the same arguments reproduce the same pixels
    write_objects_dataset(tmp_path / "again", num_per_class=3, size=32, seed=1)
    for f in frames[::7]:
        assert (root / "images" / f["name"]).read_bytes() == (tmp_path / "again" / "images" / f["name"]).read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        write_objects_dataset(root, num_per_class=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_bdd100k_reader_maps_frames_to_classes(tmp_path):
    from drivedit.data.bdd100k import ScenarioVocabulary, load_label_file

    write_objects_dataset(tmp_path / "o", num_per_class=2, size=16)
    frames = load_label_file(str(tmp_path / "o" / "labels.json"))
    vocab = ScenarioVocabulary(CLASS_NAMES, night=None)
    assert [vocab.scenario_of(f) for f in frames] == [c for c in range(len(CLASS_NAMES)) for _ in range(2)]


def test_classes_differ_in_simple_statistics():
    def stats(name: str) -> np.ndarray:
        imgs = np.stack([render_object(CLASS_NAMES.index(name), 32, s) for s in range(12)]).astype(float) / 255
        brightness = imgs.mean()
        saturation = (imgs.max(-1) - imgs.min(-1)).mean()
        return np.array([brightness, saturation, *imgs.mean((0, 1, 2))])

    table = {name: stats(name) for name in CLASS_NAMES}
    bright = lambda n: table[n][0]  # noqa: E731
    # snow classes are the brightest, night classes the darkest, rain in between and grey
    assert min(bright("snowman"), bright("snowplow")) > 0.75
    assert max(bright("moon"), bright("streetlamp"), bright("owl")) < 0.2
    assert 0.3 < min(bright("umbrella"), bright("raincoat")) < max(bright("umbrella"), bright("raincoat")) < 0.55
    day = [n for n in CLASS_NAMES if n not in ("snowman", "snowplow", "moon", "streetlamp", "owl")]
    assert min(bright(n) for n in day) > max(bright(n) for n in ("moon", "streetlamp", "owl")) + 0.2
    assert table["snowman"][1] < table["sun"][1]       # snow is desaturated, a sunny sky is not
    assert table["sun"][4] > table["sun"][2]           # the clear sky is blue
    # no two classes share the same mean colour and brightness
    names = list(table)
    gaps = [np.abs(table[a] - table[b]).max() for i, a in enumerate(names) for b in names[i + 1:]]
    assert min(gaps) > 0.02


def test_backdrop_and_figure_split_draws_the_same_pixels():
    # objects.py paints each class as a backdrop plus a figure (objects_in_context.py reuses both); the
    # split left the shipped source domain pixel for pixel as it was (hash measured before the split)
    import hashlib

    images = np.stack([render_object(c, 128, 7) for c in range(len(CLASS_NAMES))])
    assert hashlib.sha256(images.tobytes()).hexdigest() == \
        "afa90f24fe127c3713fead0050122f8974046c9c216df88fd54417fc9fee02d9"


def test_objects_in_context_stand_under_a_sky(tmp_path):
    from drivedit.data.objects_in_context import render_in_context

    a = render_in_context(0, 64, seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_in_context(0, 64, seed=3)) and not np.array_equal(a, render_in_context(0, 64, 4))
    with pytest.raises(ValueError, match="class_id"):
        render_in_context(len(CLASS_NAMES), 64, 0)
    # daylight classes: a blue sky on top, the ground (grass or road) below the horizon, in every image
    for c in (CLASS_NAMES.index("car"), CLASS_NAMES.index("tree"), CLASS_NAMES.index("house")):
        for seed in range(4):
            img = render_in_context(c, 64, seed).astype(np.float64)
            top, bottom = img[:6].mean((0, 1)), img[-6:].mean((0, 1))  # (3,) mean colours of the first / last rows
            assert top[2] > top[0] + 20 and top[2] > bottom[2] + 20, (CLASS_NAMES[c], seed, top, bottom)
    summary = write_objects_dataset(tmp_path / "ctx", num_per_class=1, size=32, seed=0, in_context=True)
    assert summary["in_context"] and summary["num_images"] == len(CLASS_NAMES)
    first = np.asarray(Image.open(tmp_path / "ctx" / "images" / "00" / "00000.png"))
    assert np.array_equal(first, render_in_context(0, 32, 0))
