"""The latent shard format: schema, metadata, training batches (mirror + mask), local loading, inspect."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drivedit.data.shards import (METADATA_KEY, ShardMetadata, build_shard_table, inspect_main, load_latents_local,
                                  read_file_metadata, read_shard_metadata, scenario_counts, shard_name, training_batch,
                                  write_shard)

META = ShardMetadata("pixel", 1.0, 4, (3, 4, 4), ["clear", "rainy", "night"])


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
                            "object_mask", "num_objects"]
    assert schema.field("scenario").type == pa.int16() and schema.field("num_objects").type == pa.int16()
    assert schema.field("moments").type == pa.list_(pa.float16(), 2 * 3 * 4 * 4)
    assert schema.field("object_mask").type == pa.list_(pa.uint8(), 16)
    info = json.loads(schema.metadata[METADATA_KEY])
    assert info["codec_id"] == "pixel" and info["latent_shape"] == [3, 4, 4] and info["resolution"] == 4
    assert info["scenarios"] == ["clear", "rainy", "night"] and info["rejected"][0]["frame_id"] == "bad.jpg"
    assert read_file_metadata(uri)["rejected"] == [{"frame_id": "bad.jpg", "reason": "missing image"}]
    m = read_shard_metadata(str(tmp_path))
    assert (m.codec_id, m.scale_factor, m.resolution, m.latent_shape, m.scenarios, m.num_rows, m.num_files) == \
        ("pixel", 1.0, 4, (3, 4, 4), ["clear", "rainy", "night"], 5, 1)
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
