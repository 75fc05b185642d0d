"""The encode job on the shared local Ray with the other input formats: an Ithaca365 dataroot (v2.2 tables,
1920x1208 frames) through configs/ithaca365/encode.yaml, and a COCO JSON, each with bad references that are
reported while the job goes on; the shards carry the right scenarios and boxes."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from drivedit.config.base import load_config
from drivedit.config.encode import EncodeJob
from drivedit.data.encode import run_encode
from drivedit.data.shards import read_shard_metadata
from formats_support import ITHACA_H, ITHACA_W, write_coco, write_ithaca365

pytestmark = pytest.mark.integration
RES = 32
LOCAL = ["--codec.kind", "pixel", "--codec.source", "null", "--codec.dtype", "float32", "--data.resolution", str(RES),
         "--scaling.use_gpu", "false", "--scaling.num_workers", "1", "--scaling.cpus_per_worker", "1",
         "--pipeline.read_batch_size", "4", "--pipeline.encode_batch_size", "4"]


def _rows(out) -> dict[str, dict]:
    rows = {}
    for f in sorted(out.glob("shard-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows[r["frame_id"]] = r
    return rows


def _cells(x1: float, y1: float, x2: float, y2: float, g: int = RES) -> np.ndarray:
    """Cells whose centre lies in the normalised box, by testing every centre."""
    c = (np.arange(g) + 0.5) / g
    return ((c[:, None] >= y1) & (c[:, None] < y2) & (c[None, :] >= x1) & (c[None, :] < x2)).astype(np.uint8)


def test_ithaca365_dataroot_to_shards(ray_session, tmp_path):
    want = write_ithaca365(tmp_path / "ithaca")
    job = load_config(EncodeJob, "configs/ithaca365/encode.yaml",
                      ["--data.input", str(tmp_path / "ithaca"), "--data.labels", str(tmp_path / "ithaca" / "v2.2"),
                       "--data.output", str(tmp_path / "shards"), *LOCAL])
    summary = run_encode(job)
    # 7 samples: 3 reference a scene, weather or camera frame that does not exist, 1 has an inverted box,
    # 1 a missing image; 2 become rows; a box on a sample_data that does not exist is reported too
    assert (summary["format"], summary["frames_listed"], summary["bad_references"]) == ("ithaca365", 4, 4)
    assert (summary["broken_boxes"], summary["corrupt_reasons"], summary["encoded"]) == (1, {"missing image": 1}, 2)
    assert summary["boxes_too_small"] == 1 and summary["boxes_clipped"] == summary["boxes_cropped_out"] == 0
    rejected = json.loads((tmp_path / "shards" / "rejected.json").read_text())
    reasons = [r["reason"] for r in rejected]
    assert sum(r.startswith("bad reference") for r in reasons) == 4
    assert {r["frame_id"]: r["reason"] for r in rejected}[want["missing"]] == "missing image"
    assert {r["frame_id"]: r["reason"] for r in rejected}[want["broken"]].startswith("broken box: car a5")
    meta = read_shard_metadata(str(tmp_path / "shards"))
    assert meta.scenarios == ["snow", "rain", "night", "sunny", "cloud"]
    assert meta.box_categories == ["bus", "car", "truck"]
    assert meta.segmentation_classes == [] and meta.latent_shape == (3, RES, RES)
    rows = _rows(tmp_path / "shards")
    assert sorted(rows) == sorted(n for n, (w, _) in want["frames"].items() if w in ("snow", "night"))
    for name, r in rows.items():
        weather, boxes = want["frames"][name]
        assert meta.scenarios[r["scenario"]] == weather and r["weather"] == weather
        # stretched, not cropped: the boxes of bus / car / truck divided by the frame size, nothing clipped
        kept = [(["bus", "car", "truck"].index(c), x1 / ITHACA_W, y1 / ITHACA_H, x2 / ITHACA_W, y2 / ITHACA_H)
                for c, x1, y1, x2, y2 in boxes if c in ("bus", "car", "truck")]
        np.testing.assert_allclose([[c, *xy] for c, xy in zip(r["box_category"], r["boxes"])], kept, atol=1e-6)
        layout = np.array(r["layout"], np.uint8).reshape(3, RES, RES)
        for k in range(3):  # a channel holds the boxes of its category at least 2 cells wide and high
            ref = np.zeros((RES, RES), np.uint8)
            for c, x1, y1, x2, y2 in kept:
                if c == k and min(x2 - x1, y2 - y1) * RES >= 2:
                    ref |= _cells(x1, y1, x2, y2)
            np.testing.assert_array_equal(layout[k], ref, err_msg=f"{name} channel {k}")
        assert r["num_objects"] == sum(min(b[3] - b[1], b[4] - b[2]) * RES >= 2 for b in kept) == 1
        assert np.array_equal(np.array(r["object_mask"]).reshape(RES, RES), layout.max(0))
        assert set(r["segmentation"]) == {255}
    snow = rows[next(n for n, (w, _) in want["frames"].items() if w == "snow")]
    assert np.array(snow["layout"]).reshape(3, RES, RES)[1].sum() == 6 * 8  # the car: 6 columns x 8 rows of cells


def test_coco_json_to_shards(ray_session, tmp_path):
    want = write_coco(tmp_path / "coco")
    job = load_config(EncodeJob, None, ["--data.input", str(tmp_path / "coco"), "--data.output",
                                        str(tmp_path / "shards"), "--data.format", "coco",
                                        "--data.scenario_attribute", "weather", *LOCAL])
    summary = run_encode(job)
    assert (summary["frames_listed"], summary["bad_references"], summary["broken_boxes"], summary["encoded"]) == \
        (3, 3, 1, 2)
    rejected = {r["reason"] for r in json.loads((tmp_path / "shards" / "rejected.json").read_text())}
    assert "bad reference: annotation 15: image_id 99 is not in images" in rejected
    assert "broken box: annotation 14: category_id 77 is not in categories" in rejected
    meta = read_shard_metadata(str(tmp_path / "shards"))
    rows = _rows(tmp_path / "shards")
    assert {n: meta.scenarios[r["scenario"]] for n, r in rows.items()} == {"a.jpg": "rainy", "b.jpg": "night"}
    # 64x48 -> 43x32 (round(64 * 32 / 48) = 43, so x scales by 43 / 64, y by 32 / 48), 5 px cut on the left
    sx, s, left = 43 / 64, 32 / 48, 5
    a = rows["a.jpg"]
    ids = meta.box_categories
    assert [ids[c] for c in a["box_category"]] == ["car", "pedestrian"]  # COCO's person is det_20's pedestrian
    np.testing.assert_allclose(a["boxes"], [[(8 * sx - left) / RES, 8 * s / RES, (32 * sx - left) / RES, 24 * s / RES],
                                            [(40 * sx - left) / RES, 20 * s / RES, 1.0, 1.0]], atol=1e-5)
    assert summary["boxes_clipped"] == 2  # the person on a.jpg and the full-width car on b.jpg reach the cut
    np.testing.assert_allclose(rows["b.jpg"]["boxes"], [[0.0, 0.5, 1.0, 1.0]], atol=1e-6)
