"""Generation from layouts (spec.layouts): items from a BDD100K-format source, labels that hold for the
images, and a resumed layout job byte-identical to an unbroken one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from drivedit.config.base import load_config
from drivedit.config.generate import GenerateJob
from drivedit.data.bdd100k import SEGMENTATION_CLASSES, Box, Frame, write_label_file
from drivedit.generate import dataset
from drivedit.generate.job import prepare, run_generate
from drivedit.generate.spec import SpecError
from drivedit.models.checkpoint import export_safetensors
from drivedit.models.dit import build_dit, dit_config
from layout_support import write_layout_bundle

CATS = ["car", "pedestrian"]
SCEN = ["clear", "night", "rainy"]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    model = build_dit(dit_config("DiT-N/2", input_size=8, in_channels=3, num_classes=10))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.add_(0.05 * torch.randn_like(p))
    base = export_safetensors(model, root / "base.safetensors")
    bundle = write_layout_bundle(base, root / "bundle", SCEN, CATS, depth=2)
    # a BDD100K-format source: 32x16 images (centre crop keeps x in [8, 24)), a box the crop cuts, a box
    # the crop drops, a category the branch does not know
    (root / "src" / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(root / "src" / "images" / name)
    write_label_file([
        Frame("a.png", "clear", "daytime", boxes=[Box("car", 10, 2, 18, 10), Box("pedestrian", 4, 4, 12, 14),
                                                 Box("truck", 12, 0, 20, 8)]),
        Frame("b.png", "rainy", "daytime", boxes=[Box("car", 0, 0, 6, 6), Box("pedestrian", 16, 8, 22, 16)]),
    ], str(root / "src" / "labels.json"))
    return bundle, root / "src" / "labels.json"


def _job(bundle, source, uri, **layouts) -> GenerateJob:
    data = {"model": {"ref": str(bundle)},
            "spec": {"layouts": {"source": str(source), "scenarios": ["night", "rainy"], "variants": 1, **layouts},
                     "shard_size": 2, "base_seed": 3},
            "sampler": {"steps": 2, "guidance": 2.0, "batch_size": 2}, "output": {"uri": str(uri)},
            "scaling": {"num_workers": 1}, "tracking": {"enabled": False}}
    return load_config(GenerateJob, data=data)


def test_items_carry_the_placed_boxes_and_bad_specs_are_refused(material, tmp_path):
    bundle, source = material
    prep = prepare(_job(bundle, source, tmp_path / "o", variants=2))
    items = [it for k in range(prep.plan.num_shards) for it in prep.plan.shard_items(k)]
    assert len(items) == 2 * 2 * 2
    assert [(it["source_frame"], it["scenario"]) for it in items[:4]] == \
        [("a.png", "night"), ("a.png", "night"), ("a.png", "rainy"), ("a.png", "rainy")]
    assert [it["seed"] for it in items] == list(range(3, 11))
    # a.png: 32x16 -> 8x8 output: scale 0.5, crop left 4 px (of the 16x8 resize); the truck is left out,
    # the pedestrian is clipped to the crop's left edge
    assert items[0]["boxes"] == [[0, 0.125, 0.125, 0.625, 0.625], [1, 0.0, 0.25, 0.25, 0.875]]
    # b.png: the car lies left of the crop and is dropped
    assert items[-1]["boxes"] == [[1, 0.5, 0.5, 0.875, 1.0]]
    assert prep.document["layouts"]["box_categories"] == CATS
    # the marking rule enters the spec hash; 0 marks nothing, so the document (and hash) is what it was before marks
    assert prep.document["layouts"]["ignore_under"] == 2.0  # one token: patch 2 of the 8 x 8 grid, at 8 px
    unmarked = prepare(_job(bundle, source, tmp_path / "o", variants=2, ignore_under=0))
    assert "ignore_under" not in unmarked.document["layouts"] and unmarked.spec_hash != prep.spec_hash
    with pytest.raises(SpecError, match="unknown scenarios \\['foggy'\\]"):
        prepare(_job(bundle, source, tmp_path / "o", scenarios=["foggy"]))
    plain = load_config(GenerateJob, data={**_job(bundle, source, tmp_path / "o").model_dump(mode="json"),
                                           "model": {"ref": str(Path(bundle).parent / "base.safetensors"),
                                                     "class_names": SCEN}})
    with pytest.raises(SpecError, match="has none"):
        prepare(plain)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file of a dataset but attempt.json (which names the execution that wrote it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "attempt.json"}


def test_layout_job_labels_and_resume_byte_identical(material, ray_session, tmp_path):
    bundle, source = material
    whole = run_generate(_job(bundle, source, tmp_path / "whole"))
    assert whole["complete"] and whole["images_written"] == 4
    labels = json.loads((tmp_path / "whole" / "labels.json").read_text())
    manifest = pq.read_table(tmp_path / "whole" / "manifest.parquet").to_pylist()
    assert [f["name"] for f in labels] == [r["name"] for r in manifest] and len(labels) == 4
    assert [r["source_frame"] for r in manifest] == ["a.png", "a.png", "b.png", "b.png"]
    for frame in labels:
        for lab in frame["labels"]:
            b = lab["box2d"]
            assert lab["category"] in CATS
            assert 0 <= b["x1"] < b["x2"] <= 8 and 0 <= b["y1"] < b["y2"] <= 8
    assert [(lab["category"], lab["box2d"]) for lab in labels[0]["labels"]] == [
        ("car", {"x1": 1.0, "y1": 1.0, "x2": 5.0, "y2": 5.0}), ("pedestrian", {"x1": 0.0, "y1": 2.0, "x2": 2.0, "y2": 7.0})]
    assert labels[1]["attributes"]["weather"] == "rainy" and labels[0]["attributes"]["timeofday"] == "night"
    # one token of this DiT-N/2 on an 8 x 8 grid is 2 px of the 8 px image: every box here is larger, so none is
    # an ignore region; asked to promise only boxes from 4 px, the 2 x 5 pedestrian (side 3.2) becomes one
    spec = json.loads((tmp_path / "whole" / "spec.json").read_text())["spec"]
    assert spec["layouts"]["ignore_under"] == 2.0
    assert all(lab["attributes"] == {} for f in labels for lab in f["labels"])
    run_generate(_job(bundle, source, tmp_path / "marked", ignore_under=4))
    marked = json.loads((tmp_path / "marked" / "labels.json").read_text())[0]["labels"]
    assert [(lab["category"], lab["box2d"]) for lab in marked] == [(lab["category"], lab["box2d"])
                                                                   for lab in labels[0]["labels"]]
    assert marked[0]["attributes"] == {} and marked[1]["attributes"]["ignore"] is True

    # interrupted after one shard, the other shard's files lost, then resumed: the same bytes
    part = tmp_path / "part"
    run_generate(_job(bundle, source, part), stop_after_shards=1)
    done = dataset.complete_shards(str(part))
    assert done
    for name in ("manifest.parquet", "labels.json"):
        (part / name).unlink(missing_ok=True)
    for s in {0, 1} - {min(done)}:
        (part / "manifest" / f"part-{s:05d}.parquet").unlink(missing_ok=True)
        shutil.rmtree(part / "images" / f"{s:05d}", ignore_errors=True)
    resumed = run_generate(_job(bundle, source, part))
    assert resumed["complete"]
    assert _tree(part) == _tree(tmp_path / "whole")


def test_segmentation_branch_writes_each_frames_mask(material, ray_session, tmp_path):
    """A branch trained on segmentation: the frame's BDD100K mask conditions it (through the crop) and becomes
    the image's mask; a frame without a mask gets none; the manifest names each mask."""
    bundle, source = material
    seg_bundle = write_layout_bundle(Path(bundle).parent / "base.safetensors", tmp_path / "seg-bundle", SCEN, CATS,
                                     depth=2, segmentation_classes=SEGMENTATION_CLASSES)
    masks = source.parent / "labels" / "sem_seg" / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    mask = np.full((16, 32), 255, np.uint8)
    mask[8:, :] = 0  # road below the middle
    mask[:, 14:18] = 13  # a car column straddling the crop's centre
    Image.fromarray(mask, mode="L").save(masks / "a.png")
    try:
        summary = run_generate(_job(seg_bundle, source, tmp_path / "seg"))
    finally:
        (masks / "a.png").unlink()
    out = tmp_path / "seg"
    assert summary["complete"] and summary["images_written"] == 4
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["mask"] for r in manifest] == ["labels/sem_seg/masks/00000/00000000.png",
                                             "labels/sem_seg/masks/00000/00000001.png", None, None]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "labels").rglob("*.png")) == \
        [r["mask"] for r in manifest[:2]]
    # 32x16 -> 16x8 -> centre 8x8 crop (source x 8..24): the car columns 14..18 land on output x 3..5
    want = np.full((8, 8), 255, np.uint8)
    want[4:, :] = 0
    want[:, 3:5] = 13
    for r in manifest[:2]:
        np.testing.assert_array_equal(np.asarray(Image.open(out / r["mask"])), want)
    labels = json.loads((out / "labels.json").read_text())
    assert [len(f["labels"]) for f in labels] == [len(json.loads(r["labels"])) for r in manifest] == [2, 2, 1, 1]


def test_shard_segmentation_grid_is_upsampled_to_the_image():
    from drivedit.generate.layouts import layout_segmentation

    cells = np.arange(16, dtype=np.uint8).reshape(4, 4)
    items = [{"index": 0, "segmentation_grid": cells.tobytes().hex()}, {"index": 1, "segmentation_grid": ""}]
    grid, masks = layout_segmentation(items, resolution=8, grid=4)
    assert grid.shape == (2, 4, 4) and grid[0].tolist() == cells.tolist() and (grid[1] == 255).all()
    assert masks[1] is None and masks[0].shape == (8, 8)
    np.testing.assert_array_equal(masks[0], np.kron(cells, np.ones((2, 2), np.uint8)))
