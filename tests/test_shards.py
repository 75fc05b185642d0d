"""The latent shard format: schema, metadata, training batches (mirror + mask + boxes + layout +
segmentation), local loading, inspect, and version 1 shards (no box columns) still loading."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drivedit.data.shards import (METADATA_KEY, ShardMetadata, build_shard_table, describe, inspect_main,
                                  load_latents_local,
                                  read_file_metadata, read_shard_metadata, scenario_counts, shard_name, training_batch,
                                  write_shard)

META = ShardMetadata("pixel", 1.0, 4, (3, 4, 4), ["clear", "rainy", "night"], box_categories=["car", "pedestrian"],
                     segmentation_classes=["road", "car"])


def _rows(n: int, start: int = 0) -> dict[str, np.ndarray]:
    """n rows whose moments are recognisable: the image mean is +i/100 everywhere, its mirror -i/100,
    the log-variance a point mass; row i's mask marks the left column only."""
    c, h, w = META.latent_shape
    mean = np.stack([np.full((c, h, w), (start + i) / 100) for i in range(n)])
    logvar = np.full((n, c, h, w), -20.0)
    mask = np.zeros((n, h, w), np.uint8)
    mask[:, :, 0] = 1
    return {"frame_id": np.array([f"f{start + i}.jpg" for i in range(n)], dtype=object),
            "source_uri": np.array([f"s3://b/images/f{start + i}.jpg" for i in range(n)], dtype=object),
            "scenario": np.arange(start, start + n) % 3, "weather": np.array(["clear"] * n, dtype=object),
            "timeofday": np.array(["daytime"] * n, dtype=object),
            "moments": np.concatenate([mean, logvar], 1).reshape(n, -1),
            "moments_flip": np.concatenate([-mean, logvar], 1).reshape(n, -1),
            "object_mask": mask.reshape(n, -1), "num_objects": np.ones(n, np.int16)}


def test_schema_and_metadata_roundtrip(tmp_path):
    table = build_shard_table(_rows(5), META, rejected=[{"frame_id": "bad.jpg", "reason": "missing image"}])
    uri = str(tmp_path / shard_name(0))
    write_shard(uri, table)
    back = pq.read_table(uri)
    schema = back.schema
    assert schema.names == ["frame_id", "source_uri", "scenario", "weather", "timeofday", "moments", "moments_flip",
                            "object_mask", "num_objects", "box_category", "boxes", "layout", "segmentation"]
    assert schema.field("scenario").type == pa.int16() and schema.field("num_objects").type == pa.int16()
    assert schema.field("moments").type == pa.list_(pa.float16(), 2 * 3 * 4 * 4)
    assert schema.field("object_mask").type == pa.list_(pa.uint8(), 16)
    assert schema.field("layout").type == pa.list_(pa.uint8(), 2 * 16)  # K = 2 channels of h * w
    assert schema.field("segmentation").type == pa.list_(pa.uint8(), 16)
    assert schema.field("boxes").type == pa.list_(pa.list_(pa.float32(), 4))
    assert schema.field("box_category").type == pa.list_(pa.int16())
    # rows given without the label columns: no boxes, an empty layout, segmentation all ignore
    assert back.column("boxes").to_pylist() == [[]] * 5 and back.column("box_category").to_pylist() == [[]] * 5
    assert set(np.concatenate(back.column("segmentation").to_pylist())) == {255}
    assert set(np.concatenate(back.column("layout").to_pylist())) == {0}
    info = json.loads(schema.metadata[METADATA_KEY])
    assert info["version"] == 2 and info["box_categories"] == ["car", "pedestrian"]
    assert info["segmentation_classes"] == ["road", "car"]
    assert info["codec_id"] == "pixel" and info["latent_shape"] == [3, 4, 4] and info["resolution"] == 4
    assert info["scenarios"] == ["clear", "rainy", "night"] and info["rejected"][0]["frame_id"] == "bad.jpg"
    assert read_file_metadata(uri)["rejected"] == [{"frame_id": "bad.jpg", "reason": "missing image"}]
    m = read_shard_metadata(str(tmp_path))
    assert (m.codec_id, m.scale_factor, m.resolution, m.latent_shape, m.scenarios, m.num_rows, m.num_files) == \
        ("pixel", 1.0, 4, (3, 4, 4), ["clear", "rainy", "night"], 5, 1)
    assert (m.box_categories, m.segmentation_classes, m.version) == (["car", "pedestrian"], ["road", "car"], 2)
    assert back.column("frame_id").to_pylist() == [f"f{i}.jpg" for i in range(5)]
    np.testing.assert_array_equal(np.stack(back.column("moments").to_numpy(zero_copy_only=False))[:, 0],
                                  np.arange(5, dtype=np.float16) / np.float16(100))


def test_empty_shard_is_valid(tmp_path):
    rows = {k: v[:0] for k, v in _rows(2).items()}
    write_shard(str(tmp_path / shard_name(3)), build_shard_table(rows, META, [{"frame_id": "x", "reason": "r"}]))
    assert read_shard_metadata(str(tmp_path)).num_rows == 0


def test_training_batch_mirrors_moments_and_mask_together():
    rows = _rows(64, start=1)
    out = training_batch(rows, META, torch.Generator().manual_seed(0))
    lat, mask, scen = out["latents"], out["object_mask"], out["scenario"]
    assert lat.shape == (64, 3, 4, 4) and lat.dtype == torch.float32
    assert mask.shape == (64, 1, 4, 4) and mask.dtype == torch.float32
    assert scen.dtype == torch.int64 and scen.tolist() == [(1 + i) % 3 for i in range(64)]
    expected = torch.arange(1, 65, dtype=torch.float32) / 100
    value = lat[:, 0, 0, 0]
    flipped = value < 0
    assert 10 < int(flipped.sum()) < 54  # about half are mirrored
    # pixel codec: logvar -20 leaves noise under 1e-4; float16 storage ~ 1e-3 relative
    torch.testing.assert_close(value.abs(), expected, atol=2e-3, rtol=0)
    assert torch.all(lat.std(dim=(1, 2, 3)) < 1e-3)
    assert torch.all(mask[~flipped, 0, :, 0] == 1) and torch.all(mask[~flipped, 0, :, 1:] == 0)
    assert torch.all(mask[flipped, 0, :, -1] == 1) and torch.all(mask[flipped, 0, :, :-1] == 0)
    # same generator seed -> same draw
    again = training_batch(rows, META, torch.Generator().manual_seed(0))
    assert torch.equal(again["latents"], lat)


def test_training_batch_scales_and_samples():
    meta = ShardMetadata("autoencoder_kl:x", 0.5, 16, (1, 2, 2), ["a"])
    n = 4000
    mean = np.full((n, 1, 2, 2), 2.0)
    logvar = np.full((n, 1, 2, 2), np.log(0.25))  # std 0.5
    m = np.concatenate([mean, logvar], 1).reshape(n, -1)
    batch = {"moments": m, "moments_flip": m, "object_mask": np.zeros((n, 4), np.uint8), "scenario": np.zeros(n)}
    lat = training_batch(batch, meta, torch.Generator().manual_seed(1))["latents"]
    assert abs(lat.mean().item() - 1.0) < 0.02 and abs(lat.std().item() - 0.25) < 0.02  # (2 + 0.5 eps) * 0.5
    with pytest.raises(ValueError, match="column moments has 7 values per row but the shard metadata says 8"):
        training_batch({**batch, "moments": np.zeros((n, 7))}, meta)


def test_training_batch_accepts_arrow_and_object_columns():
    rows = _rows(3)
    t = build_shard_table(rows, META)
    batch = {k: t.column(k).combine_chunks().slice(1) for k in ("moments", "moments_flip", "object_mask", "scenario")}
    out = training_batch(batch, META, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["latents"][:, 0, 0, 0].abs(), torch.tensor([0.01, 0.02]), atol=2e-3, rtol=0)
    obj = {k: np.array(list(v), dtype=object) if k.startswith(("moments", "object")) else v for k, v in rows.items()}
    assert training_batch(obj, META)["latents"].shape == (3, 3, 4, 4)


def test_load_latents_local_and_inspect(tmp_path, capsys):
    for s in range(3):
        write_shard(str(tmp_path / shard_name(s)), build_shard_table(_rows(4, start=4 * s), META))
    (tmp_path / "rejected.json").write_text("[]")
    out = load_latents_local(str(tmp_path), limit=6, seed=3)
    assert out["latents"].shape == (6, 3, 4, 4) and out["scenario"].tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(out["latents"][:, 0, 0, 0].abs(), torch.arange(6.0) / 100, atol=2e-3, rtol=0)
    assert load_latents_local(str(tmp_path))["latents"].shape[0] == 12
    assert inspect_main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "12 rows in 3 files" in text and "latent 3x4x4" in text
    assert inspect_main([str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["per_scenario"] == {"clear": 4, "rainy": 4, "night": 4} and info["objects"] == 12
    assert scenario_counts(str(tmp_path)) == {"clear": 4, "rainy": 4, "night": 4}
    assert inspect_main([str(tmp_path / "nothing")]) == 2
    assert "no latent shards" in capsys.readouterr().err


def test_disagreeing_shards_are_refused(tmp_path):
    write_shard(str(tmp_path / shard_name(0)), build_shard_table(_rows(2), META))
    other = ShardMetadata("pixel", 1.0, 4, (3, 4, 4), ["clear", "snowy", "night"])
    write_shard(str(tmp_path / shard_name(1)), build_shard_table(_rows(2), other))
    with pytest.raises(ValueError, match="shards disagree"):
        read_shard_metadata(str(tmp_path))
    pq.write_table(pa.table({"x": [1]}), str(tmp_path / "plain.parquet"))
    assert read_shard_metadata(str(tmp_path / shard_name(0))).num_rows == 2
    with pytest.raises(ValueError, match="without drivedit shard metadata"):
        read_shard_metadata(str(tmp_path / "plain.parquet"))


def _labelled_rows(n: int) -> dict[str, np.ndarray]:
    """_rows plus labels whose mirror is checkable: one car box over the left half of the 4x4 grid (its
    layout channel 0 and the object mask mark columns 0-1), a pedestrian box in the right quarter, and a
    segmentation of car (1) on the left half, road (0) on the right."""
    rows = _rows(n)
    layout = np.zeros((n, 2, 4, 4), np.uint8)
    layout[:, 0, :, :2] = 1
    layout[:, 1, 1:3, 3] = 1
    seg = np.zeros((n, 4, 4), np.uint8)
    seg[:, :, :2] = 1
    rows.update(object_mask=layout.max(1).reshape(n, -1), layout=layout.reshape(n, -1), segmentation=seg.reshape(n, -1),
                boxes=[json.dumps([[0, 0.0, 0.0, 0.5, 1.0], [1, 0.75, 0.25, 1.0, 0.75]])] * n)
    return rows


def test_boxes_layout_and_segmentation_roundtrip_and_mirror_together(tmp_path):
    table = build_shard_table(_labelled_rows(32), META, box_counts={"boxes_clipped": 3})
    write_shard(str(tmp_path / shard_name(0)), table)
    back = pq.read_table(str(tmp_path / shard_name(0)))
    assert back.column("box_category").to_pylist()[0] == [0, 1]
    np.testing.assert_allclose(back.column("boxes").to_pylist()[0], [[0, 0, 0.5, 1], [0.75, 0.25, 1, 0.75]])
    assert read_file_metadata(str(tmp_path / shard_name(0)))["box_counts"] == {"boxes_clipped": 3}
    out = load_latents_local(str(tmp_path), seed=1)
    lat, layout, seg, boxes = out["latents"], out["layout"], out["segmentation"], out["boxes"]
    assert layout.shape == (32, 2, 4, 4) and layout.dtype == torch.float32
    assert seg.shape == (32, 4, 4) and seg.dtype == torch.int64 and len(boxes) == 32
    flipped = lat[:, 0, 0, 0] < 0  # the mirror's moments were stored negated
    assert 0 < int(flipped.sum()) < 32
    for i in range(32):
        f = bool(flipped[i])
        car_cols = [2, 3] if f else [0, 1]
        assert layout[i, 0].nonzero()[:, 1].unique().tolist() == car_cols
        assert seg[i, 0].tolist() == ([0, 0, 1, 1] if f else [1, 1, 0, 0])
        assert torch.equal(out["object_mask"][i, 0], layout[i].amax(0))
        expected = [[0, 0.5, 0, 1, 1], [1, 0, 0.25, 0.25, 0.75]] if f else [[0, 0, 0, 0.5, 1], [1, 0.75, 0.25, 1, 0.75]]
        torch.testing.assert_close(boxes[i], torch.tensor(expected))
    info = describe(str(tmp_path))
    assert info["boxes_per_category"] == {"car": 32, "pedestrian": 32} and info["box_counts"] == {"boxes_clipped": 3}


def test_box_category_outside_the_vocabulary_is_refused():
    rows = _rows(1)
    rows["boxes"] = [[[2, 0, 0, 1, 1]]]
    with pytest.raises(ValueError, match=r"box category ids must lie in 0..1"):
        build_shard_table(rows, META)


def _write_version1_shard(uri: str, n: int) -> None:
    """A shard exactly as format version 1 wrote it: nine columns, metadata without box vocabulary."""
    rows = _rows(n)
    c, h, w = META.latent_shape

    def fixed(m, t):
        return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(m).reshape(-1), type=t), np.asarray(m).shape[1])
    schema = pa.schema([("frame_id", pa.string()), ("source_uri", pa.string()), ("scenario", pa.int16()),
                        ("weather", pa.string()), ("timeofday", pa.string()),
                        ("moments", pa.list_(pa.float16(), 2 * c * h * w)),
                        ("moments_flip", pa.list_(pa.float16(), 2 * c * h * w)),
                        ("object_mask", pa.list_(pa.uint8(), h * w)), ("num_objects", pa.int16())])
    info = {"format": "drivedit.latent_shard", "version": 1, "codec_id": "pixel", "scale_factor": 1.0,
            "resolution": 4, "latent_shape": [c, h, w], "scenarios": META.scenarios, "rejected": []}
    table = pa.Table.from_arrays(
        [pa.array(list(rows["frame_id"])), pa.array(list(rows["source_uri"])), pa.array(rows["scenario"], pa.int16()),
         pa.array(list(rows["weather"])), pa.array(list(rows["timeofday"])),
         fixed(rows["moments"].astype(np.float16), pa.float16()),
         fixed(rows["moments_flip"].astype(np.float16), pa.float16()),
         fixed(rows["object_mask"].astype(np.uint8), pa.uint8()), pa.array(rows["num_objects"], pa.int16())],
        schema=schema.with_metadata({METADATA_KEY: json.dumps(info).encode()}))
    pq.write_table(table, uri)


def test_version1_shards_still_load(tmp_path, capsys):
    _write_version1_shard(str(tmp_path / shard_name(0)), 6)
    m = read_shard_metadata(str(tmp_path))
    assert (m.version, m.box_categories, m.segmentation_classes, m.num_rows) == (1, [], [], 6)
    out = load_latents_local(str(tmp_path), seed=0)
    assert set(out) == {"latents", "scenario", "object_mask"}
    assert out["latents"].shape == (6, 3, 4, 4) and out["scenario"].tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(out["latents"][:, 0, 0, 0].abs(), torch.arange(6.0) / 100, atol=2e-3, rtol=0)
    assert inspect_main([str(tmp_path)]) == 0
    assert "6 rows in 1 files" in capsys.readouterr().out
    # a folder mixing versions is refused with both files named, not read half one way
    write_shard(str(tmp_path / shard_name(1)), build_shard_table(_rows(2), META))
    with pytest.raises(ValueError, match="shards disagree.*format version"):
        read_shard_metadata(str(tmp_path))
