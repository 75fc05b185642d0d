"""Evaluation of folders end to end on procedural driving scenes: the scenario classifier is accurate on
held-out real frames, `drivedit eval` reports every scenario, shifted sets score worse, and condition
accuracy exposes images that do not show the scenario they were labelled with."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from drivedit.config.common import DEFAULT_SCENARIOS
from drivedit.data.scenes import write_scenes_dataset
from drivedit.eval import metrics
from drivedit.eval.classifier import ScenarioClassifier, train_scenario_classifier
from drivedit.eval.cli import main as eval_main
from drivedit.eval.evaluate import evaluate_folders
from drivedit.eval.folders import index_folder, vocabulary_for

# Held-out accuracy of the classifier on 240 procedural 32 px scenes (about 42 held-out frames), 100
# steps at batch 64, measured over (data seed, classifier seed) in {(0,0), (1,0), (3,1)}: 1.00, 1.00,
# 0.95 (at 60 steps: 0.86-0.98). Chance is 1/6.
ACCURACY_FLOOR = 0.90
STEPS = 100


def _as_generated(src, dst, shard_size: int = 16, rotate: int = 0, extra_missing: bool = False) -> None:
    """Copy a scenes dataset into the generated-dataset layout (images/<shard>/<i>.png); `rotate` relabels
    scenario s as s + rotate, i.e. images that do not show what their label requests."""
    frames = json.loads((src / "labels.json").read_text())
    vocab = vocabulary_for(DEFAULT_SCENARIOS)
    out = []
    for i, f in enumerate(frames):
        shard = f"{i // shard_size:03d}"
        (dst / "images" / shard).mkdir(parents=True, exist_ok=True)
        Image.open(src / "images" / f["name"]).save(dst / "images" / shard / f"{i}.png")
        attrs = dict(f["attributes"])
        if rotate:
            from drivedit.data.bdd100k import parse_frames

            sid = vocab.scenario_of(parse_frames([f])[0])
            if sid is None:
                continue
            new = DEFAULT_SCENARIOS[(sid + rotate) % len(DEFAULT_SCENARIOS)]
            attrs = {"weather": "clear" if new == "night" else new,
                     "timeofday": "night" if new == "night" else "daytime"}
        out.append({"name": f"{shard}/{i}.png", "attributes": attrs, "labels": []})
    if extra_missing:
        out.append({"name": "999/0.png", "attributes": {"weather": "clear", "timeofday": "daytime"}})
    (dst / "labels.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_scenes_dataset(str(root / "real"), 240, size=32, seed=0)
    write_scenes_dataset(str(root / "scenes1"), 72, size=32, seed=1)
    _as_generated(root / "scenes1", root / "fake", extra_missing=True)
    _as_generated(root / "scenes1", root / "mislabelled", rotate=1)
    return root


@pytest.fixture(scope="module")
def cli_run(data):
    """`drivedit eval` as a user runs it: train the classifier on the real frames, save it, write JSON."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = eval_main(["--real", str(data / "real"), "--fake", str(data / "fake"), "--train-classifier",
                        "--classifier-steps", str(STEPS), "--save-classifier", str(data / "clf"),
                        "--kid-subsets", "10", "--json", str(data / "result.json")])
    return rc, stdout.getvalue(), json.loads((data / "result.json").read_text())


@pytest.fixture(scope="module")
def trained(data, cli_run):
    return ScenarioClassifier.load(data / "clf")


def test_classifier_is_accurate_on_held_out_real_frames(data, cli_run, trained, tmp_path):
    clf = trained
    assert cli_run[2]["classifier"]["heldout_accuracy"] == clf.heldout_accuracy >= ACCURACY_FLOOR, \
        clf.heldout_per_scenario
    real = index_folder(str(data / "real"), vocabulary_for(DEFAULT_SCENARIOS))
    assert clf.num_heldout >= 40 and clf.num_train + clf.num_heldout == len(real)
    assert set(clf.heldout_per_scenario) == set(DEFAULT_SCENARIOS)
    assert json.loads((data / "clf" / "classifier.json").read_text())["vocabulary"] == DEFAULT_SCENARIOS

    path = clf.save(tmp_path / "clf")
    clf.save(tmp_path / "clf")  # replacing a saved classifier leaves one complete folder, no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]
    loaded = ScenarioClassifier.load(path)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(loaded.predict(images), clf.predict(images))
    np.testing.assert_allclose(loaded(images), clf(images), rtol=1e-5, atol=1e-6)


def test_cli_reports_every_scenario(cli_run, trained):
    rc, printed, result = cli_run
    assert rc == 0
    assert result["features"] == {"extractor": "scenario-classifier", "dim": trained.dim, "image_size": 32}
    assert result["classifier"]["source"] == "trained on the real folder"
    assert result["fake"]["missing"] == 1 and result["fake"]["missing_examples"] == ["999/0.png"]
    assert result["real"]["dropped"].get("weather foggy", 0) > 0  # foggy frames are left out and counted
    assert set(result["per_scenario"]) == set(DEFAULT_SCENARIOS)
    overall = result["overall"]
    assert overall["num_fake"] == sum(m["num_fake"] for m in result["per_scenario"].values())
    # another draw of the same generator: close distributions, the classifier recognises the scenarios
    assert overall["fid"] < 1.0 and overall["precision"] > 0.6 and overall["recall"] > 0.6
    assert overall["condition_accuracy"] > 0.8
    assert np.asarray(result["confusion"]).sum() == overall["num_fake"]
    for name in ["overall", *DEFAULT_SCENARIOS]:
        assert any(line.startswith(name) for line in printed.splitlines()), name
    assert "held-out accuracy" in printed
    # the classifier-free scene check: another draw of the same world has the real frames' layout
    assert result["scene"]["layout_agreement"] > 0.8 and result["scene"]["num_fake"] == overall["num_fake"]
    assert all(m["layout_agreement"] > 0.5 for m in result["per_scenario"].values())
    assert "scene check" in printed


def test_shifted_sets_score_worse(data, trained):
    clf = trained
    real = index_folder(str(data / "real"), vocabulary_for(DEFAULT_SCENARIOS)).load(32)
    a, b = real[::2], real[1::2]
    feats_a = clf(a)
    fids, precisions = [], []
    for shift in (0, 25, 50, 100):  # brighten half B by `shift` grey levels
        shifted = np.clip(b.astype(np.int16) + shift, 0, 255).astype(np.uint8)
        feats_b = clf(shifted)
        fids.append(metrics.fid(feats_a, feats_b))
        precisions.append(metrics.precision_recall(feats_a, feats_b)[0])
    assert all(x < y for x, y in zip(fids, fids[1:])), fids
    assert precisions[-1] < precisions[0] - 0.2, precisions


def test_scene_check_sees_layout_not_colour(data):
    # the same pixels without the layout (patches shuffled), or the right colours in a patchwork, or the
    # real frames' mean image every time: all far from the real frames; another draw of the world is close
    from drivedit.eval.mlflow_log import eval_metrics
    from drivedit.eval.scene_check import scene_likeness, shuffle_patches

    real = index_folder(str(data / "real"), vocabulary_for(DEFAULT_SCENARIOS)).load(32)
    a, b = real[::2], real[1::2]
    rng = np.random.default_rng(0)
    colours = b.reshape(-1, 3)[rng.integers(0, len(b) * 32 * 32, (len(b), 4, 4))]  # (n, 4, 4, 3) real pixels
    patchwork = np.repeat(np.repeat(colours, 8, axis=1), 8, axis=2)                  # (n, 32, 32, 3) blocks
    mean_image = np.repeat(b.mean(0, keepdims=True).round().astype(np.uint8), len(b), 0)
    # measured at 32 px, ~100 frames a side: layout FD 2.5 (same world), 6.0 (shuffled), larger for the others;
    # layout agreement 0.92 (same world), 0.27 (shuffled)
    same = scene_likeness(a, b)
    others = {"shuffled": scene_likeness(a, shuffle_patches(b, 4)), "patchwork": scene_likeness(a, patchwork),
              "mean image": scene_likeness(a, mean_image)}
    assert same["layout_agreement"] > 0.85, same
    for name, m in others.items():
        assert m["layout_fd"] > 1.8 * same["layout_fd"], (name, m, same)
    assert others["shuffled"]["layout_agreement"] < 0.3 and others["patchwork"]["layout_agreement"] < 0.3, others
    assert others["mean image"]["std_map_corr"] < 0.3  # its mean map is perfect; nothing varies
    assert sorted(np.unique(shuffle_patches(b, 4))) == sorted(np.unique(b))  # the control keeps the pixels
    with pytest.raises(ValueError, match="at least 2"):
        scene_likeness(a, b[:1])
    logged = eval_metrics({"overall": {}, "per_scenario": {}, "scene": same})
    assert logged["eval.scene.layout_agreement"] == pytest.approx(same["layout_agreement"])


class MeanColour:
    """A stand-in extractor: per-channel mean and spread at 16 px (shows the extractor is pluggable)."""

    name, image_size = "mean-colour", 16

    def __call__(self, images):
        x = images.astype(np.float64) / 255
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def test_condition_accuracy_catches_mislabelled_images(data, trained):
    clf = trained
    logs = []
    result = evaluate_folders(data / "real", data / "mislabelled", classifier=str(data / "clf"),
                              extractor=MeanColour(), kid_subsets=5, log=logs.append)
    assert result["features"] == {"extractor": "mean-colour", "dim": 6, "image_size": 16}
    # the images are fine, the labels request the next scenario: the classifier disagrees
    assert result["overall"]["condition_accuracy"] < 0.3
    # a classifier loaded from disk is also scored on the real frames at hand
    assert result["classifier"]["source"] == str(data / "clf") and result["classifier"]["accuracy_on_real"] > 0.9

    unlabelled = data / "unlabelled"
    shutil.copytree(data / "fake" / "images", unlabelled / "images")
    result = evaluate_folders(data / "real", unlabelled, classifier=clf, kid_subsets=5, log=logs.append)
    assert result["fake"]["labelled"] is False and result["per_scenario"] == {}
    assert result["overall"]["condition_accuracy"] is None and result["overall"]["fid"] is not None


def test_bad_folders_get_clear_errors(data, trained, tmp_path, capsys):
    unlabelled_real = tmp_path / "real"
    shutil.copytree(data / "fake" / "images", unlabelled_real / "images")
    with pytest.raises(ValueError, match="no feature extractor"):
        evaluate_folders(unlabelled_real, data / "fake", log=lambda m: None)
    with pytest.raises(ValueError, match="not both"):
        evaluate_folders(data / "real", data / "fake", classifier=data / "clf", train_classifier=True)
    with pytest.raises(ValueError, match="has no labels.json"):
        evaluate_folders(unlabelled_real, data / "fake", train_classifier=True, log=lambda m: None)
    (tmp_path / "empty").mkdir()
    assert eval_main(["--real", str(data / "real"), "--fake", str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    # two files share a basename and the label names only the basename: refuse to guess
    clash = tmp_path / "clash"
    for shard in ("000", "001"):
        (clash / "images" / shard).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(clash / "images" / shard / "0.png")
    (clash / "labels.json").write_text(json.dumps([{"name": "0.png", "attributes": {"weather": "clear"}}]))
    with pytest.raises(ValueError, match="several image files"):
        index_folder(str(clash), vocabulary_for(DEFAULT_SCENARIOS))
    with pytest.raises(ValueError, match="differ from the classifier's vocabulary"):
        evaluate_folders(data / "real", data / "fake", classifier=_save_tiny(tmp_path), scenarios=["a", "b"],
                         log=lambda m: None)


def _save_tiny(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    clf, _ = train_scenario_classifier(images, np.arange(12) % 6, DEFAULT_SCENARIOS, image_size=16, steps=2)
    return clf.save(tmp_path / "tiny")


def test_folders_on_s3_read_like_local_ones(data, s3_bucket):
    from drivedit import storage

    uri = f"s3://{s3_bucket}/synthetic/v1"
    storage.upload_dir(str(data / "fake"), uri)
    vocab = vocabulary_for(DEFAULT_SCENARIOS)
    local, remote = index_folder(str(data / "fake"), vocab), index_folder(uri, vocab)
    assert len(remote) == len(local) and remote.missing == local.missing == ["999/0.png"]
    assert np.array_equal(remote.scenarios, local.scenarios)
    assert [f[len(uri):] for f in remote.files] == [f[len(str(data / "fake")):] for f in local.files]
    assert np.array_equal(remote.load(32, [0, 5]), local.load(32, [0, 5]))
