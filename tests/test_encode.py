"""The encode job on the shared local Ray: local -> local with bad inputs mixed in, rerun idempotence,
S3 -> S3 (moto server) with an AutoencoderKL codec read from the bucket, and config errors."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from ray.data.dataset import MaterializedDataset

from drivedit import storage
from drivedit.config.base import ConfigError, load_config
from drivedit.config.encode import DEFAULT_CATEGORIES, EncodeJob
from drivedit.data import encode as encode_mod
from drivedit.data.bdd100k import SEGMENTATION_CLASSES, Box, Frame, frame_to_json, load_label_file
from drivedit.data.encode import run_encode
from drivedit.data.scenes import write_scenes_dataset
from drivedit.data.shards import (METADATA_KEY, load_latents_local, read_latent_dataset, read_shard_metadata,
                                  training_batch)
from drivedit.models.codec import PixelCodec, sample_latents

RES = 32
BAD = {"truncated.jpg": "undecodable image", "text.jpg": "undecodable image", "missing.jpg": "missing image",
       "small.png": "too small: 16x16 < 32"}
SKIPPED = ("brokenbox.png", "outside.png")  # frames with broken boxes


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(root: str, num: int = 18) -> list[Frame]:
    """Procedural 72x48 scenes plus hand-made frames: a known box, the four bad images of BAD, a box outside its
    image, a broken box.
    `root` may be a local path or s3://."""
    write_scenes_dataset(root, num=num, size=48, seed=1, aspect=1.5)
    frames = load_label_file(storage.join(root, "labels.json"))
    images = storage.join(root, "images")
    good = storage.read_bytes(storage.join(images, frames[0].name))
    box_img = np.zeros((64, 64, 3), np.uint8)
    box_img[:32, :32] = 255
    storage.write_bytes_atomic(storage.join(images, "box.png"), _png(box_img))
    storage.write_bytes_atomic(storage.join(images, "truncated.jpg"), good[: len(good) // 2])
    storage.write_bytes_atomic(storage.join(images, "text.jpg"), b"this is not an image")
    storage.write_bytes_atomic(storage.join(images, "small.png"), _png(np.zeros((16, 16, 3), np.uint8)))
    storage.write_bytes_atomic(storage.join(images, "brokenbox.png"), _png(box_img))
    storage.write_bytes_atomic(storage.join(images, "outside.png"), _png(box_img))
    frames.append(Frame("box.png", "rainy", "daytime", "highway",
                        [Box("car", 0, 0, 32, 32), Box("pedestrian", 60, 60, 62, 62),  # 1 cell: skipped
                         Box("drivable area", 0, 40, 64, 64)]))                          # not an object category
    for name in BAD:
        frames.append(Frame(name, "clear", "daytime"))
    frames.append(Frame("outside.png", "clear", "daytime", "highway",
                        [Box("car", 0, 0, 32, 32), Box("truck", 70, 10, 90, 30)]))  # the truck: right of the 64 px
    frames.append(Frame("brokenbox.png", "clear", "daytime"))
    labels = [frame_to_json(f) for f in frames]
    labels[-1]["labels"] = [{"id": "1", "category": "car", "box2d": {"x1": 9, "y1": 5, "x2": 3, "y2": 8}}]
    labels.append(frame_to_json(next(f for f in frames if f.name == "box.png")))  # listed twice: encoded once
    storage.write_text_atomic(storage.join(root, "labels.json"), json.dumps(labels))
    return load_label_file(storage.join(root, "labels.json"))


def make_job(inp: str, out: str, **over) -> EncodeJob:
    cfg = {"data": {"input": inp, "output": out, "resolution": RES},
           "shards": {"rows_per_shard": 6}, "pipeline": {"read_batch_size": 4, "encode_batch_size": 8}}
    for key, value in over.items():
        section, field = key.split("__")
        cfg.setdefault(section, {})[field] = value
    return EncodeJob.model_validate(cfg)


def reference_crop(data: bytes) -> np.ndarray:
    """Resize the short side to RES and center-crop, with torchvision: an independent path to the crop."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(TF.center_crop(TF.resize(img, RES, interpolation=TF.InterpolationMode.BICUBIC), RES))


def reference_mask(frame: Frame, src_w: int, src_h: int, factor: int = 1) -> np.ndarray:
    """Rows and columns of cells whose centres lie inside a kept box (area >= 2 cells; a box thinner than a
    cell keeps the row / column under its middle), found by testing every cell centre."""
    g = RES // factor
    s = RES / min(src_w, src_h)
    left, top = (round(src_w * s) - RES) // 2, (round(src_h * s) - RES) // 2
    centres = (np.arange(g) + 0.5) * factor
    mask = np.zeros((g, g), np.uint8)
    for b in frame.boxes:
        if b.category not in DEFAULT_CATEGORIES:
            continue
        x1, x2 = np.clip([b.x1 * s - left, b.x2 * s - left], 0, RES)
        y1, y2 = np.clip([b.y1 * s - top, b.y2 * s - top], 0, RES)
        if (x2 - x1) * (y2 - y1) / factor ** 2 < 2:
            continue
        cols = np.nonzero((centres >= x1) & (centres < x2))[0]
        rows = np.nonzero((centres >= y1) & (centres < y2))[0]
        cols = cols if len(cols) else [min(int((x1 + x2) / 2 / factor), g - 1)]
        rows = rows if len(rows) else [min(int((y1 + y2) / 2 / factor), g - 1)]
        mask[np.ix_(rows, cols)] = 1
    return mask


def reference_boxes(frame: Frame, src_w: int, src_h: int) -> tuple[list[list[float]], int, int]:
    """The frame's vocabulary boxes through the resize + center crop, clipped and normalised to [0, 1]:
    (boxes as [category id, x1, y1, x2, y2], clipped, dropped by the crop)."""
    s = RES / min(src_w, src_h)
    left, top = (round(src_w * s) - RES) // 2, (round(src_h * s) - RES) // 2
    out, clipped, dropped = [], 0, 0
    for b in frame.boxes:
        if b.category not in DEFAULT_CATEGORIES:
            continue
        raw = [b.x1 * s - left, b.y1 * s - top, b.x2 * s - left, b.y2 * s - top]
        x1, y1, x2, y2 = np.clip(raw, 0, RES)
        if x2 <= x1 or y2 <= y1:
            dropped += 1
            continue
        clipped += [x1, y1, x2, y2] != raw
        out.append([DEFAULT_CATEGORIES.index(b.category), x1 / RES, y1 / RES, x2 / RES, y2 / RES])
    return out, clipped, dropped


def reference_segmentation(mask_uri: str, factor: int) -> np.ndarray:
    """The mask resized (nearest) and center-cropped with torchvision, then each factor x factor cell's most
    frequent id (ties to the smaller), by a plain loop."""
    mask = Image.open(io.BytesIO(storage.read_bytes(mask_uri)))
    crop = np.asarray(TF.center_crop(TF.resize(mask, RES, interpolation=TF.InterpolationMode.NEAREST), RES))
    g = RES // factor
    out = np.zeros((g, g), np.uint8)
    for i in range(g):
        for j in range(g):
            values, counts = np.unique(crop[i * factor:(i + 1) * factor, j * factor:(j + 1) * factor],
                                       return_counts=True)
            out[i, j] = values[np.argmax(counts)]
    return out


def read_rows(out: str) -> dict[str, dict]:
    rows = {}
    for f in storage.list_files(out, suffixes=[".parquet"]):
        fs, path = storage.filesystem_for(f)
        for r in pq.read_table(path, filesystem=fs).to_pylist():
            assert r["frame_id"] not in rows, f"duplicate row {r['frame_id']}"
            rows[r["frame_id"]] = r
    return rows


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("encode")
    frames = make_dataset(str(root / "ds"))
    job = make_job(str(root / "ds"), str(root / "shards"))
    summary = run_encode(job)
    return root, frames, job, summary


def test_local_summary_schema_and_rejects(local_run):
    root, frames, job, summary = local_run
    foggy = sum(f.weather == "foggy" and f.timeofday != "night" for f in frames)
    kept = len(frames) - foggy - 2  # minus the broken-box frame and the duplicate
    assert summary["frames_listed"] == len(frames) and summary["dropped_by_scenario"] == foggy > 0
    # two broken boxes: one found in the labels (not read), one outside its image (found once it was read)
    assert summary["broken_boxes"] == 2 and summary["duplicates"] == 1 and summary["frames_read"] == kept
    assert summary["corrupt"] == 5 and summary["encoded"] == kept - 5 == summary["rows_total"]
    assert summary["corrupt_reasons"] == {"undecodable image": 2, "missing image": 1, "too small": 1, "broken box": 1}
    assert summary["shards_written"] == -(-kept // 6) and summary["images_per_s"] > 0
    out = root / "shards"
    names = sorted(os.listdir(out))
    assert names == ["encode.json", "rejected.json"] + [f"shard-{i:05d}.parquet" for i in range(-(-kept // 6))]
    meta = read_shard_metadata(str(out))
    assert (meta.codec_id, meta.scale_factor, meta.resolution, meta.latent_shape, meta.num_rows) == \
        ("pixel", 1.0, RES, (3, RES, RES), kept - 5)
    assert meta.scenarios == ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]
    assert meta.box_categories == DEFAULT_CATEGORIES and meta.segmentation_classes == list(SEGMENTATION_CLASSES)
    rejected = json.loads((out / "rejected.json").read_text())
    by_name = {r["frame_id"]: r["reason"] for r in rejected}
    assert len(rejected) == 7 and set(by_name) == set(BAD) | {"brokenbox.png", "box.png", "outside.png"}
    assert by_name["outside.png"] == "broken box: truck (70, 10, 90, 30) lies entirely outside the 64x64 image"
    assert by_name["box.png"] == "duplicate frame in the labels"
    for name, reason in BAD.items():
        assert by_name[name].startswith(reason)
    assert by_name["brokenbox.png"].startswith("broken box")
    assert json.loads((out / "encode.json").read_text())["summary"]["encoded"] == kept - 5


def test_pixel_moments_decode_to_the_images_and_masks_follow_boxes(local_run):
    root, frames, job, _ = local_run
    rows = read_rows(str(root / "shards"))
    by_name = {f.name: f for f in frames}
    codec = PixelCodec()
    vocab = job.data.scenarios
    assert len(rows) == len({f.name for f in frames if f.name not in BAD and f.name not in SKIPPED
                             and not (f.weather == "foggy" and f.timeofday != "night")})
    for name, r in rows.items():
        f = by_name[name]
        assert r["source_uri"] == str(root / "ds" / "images" / name)
        assert vocab[r["scenario"]] == ("night" if f.timeofday == "night" else f.weather)
        assert (r["weather"], r["timeofday"]) == (f.weather, f.timeofday)
        moments = torch.tensor(np.array(r["moments"], np.float32)).view(1, 6, RES, RES)
        flip = torch.tensor(np.array(r["moments_flip"], np.float32)).view(1, 6, RES, RES)
        decoded = codec.decode(sample_latents(moments, 1.0))[0]                # (3, RES, RES) in [-1, 1]
        img = ((decoded.permute(1, 2, 0).numpy() + 1) * 127.5).round()
        data = (root / "ds" / "images" / name).read_bytes()
        ref = reference_crop(data).astype(np.float32)
        tol = 2.0 if name != "box.png" else 40.0  # box.png goes through box-filter halving, not bicubic
        assert np.abs(img - ref).max() <= tol, name
        torch.testing.assert_close(flip, moments.flip(-1))
        mask = np.array(r["object_mask"], np.uint8).reshape(RES, RES)
        w, h = Image.open(io.BytesIO(data)).size
        np.testing.assert_array_equal(mask, reference_mask(f, w, h), err_msg=name)
    box = np.array(rows["box.png"]["object_mask"]).reshape(RES, RES)
    assert box[:16, :16].all() and box.sum() == 256 and rows["box.png"]["num_objects"] == 1
    assert sum(r["num_objects"] for r in rows.values()) > len(rows)


def test_shards_carry_boxes_layout_and_segmentation(local_run):
    root, frames, job, summary = local_run
    rows = read_rows(str(root / "shards"))
    by_name = {f.name: f for f in frames}
    k = len(DEFAULT_CATEGORIES)
    clipped = dropped = with_seg = 0
    for name, r in rows.items():
        data = (root / "ds" / "images" / name).read_bytes()
        w, h = Image.open(io.BytesIO(data)).size
        want, c, d = reference_boxes(by_name[name], w, h)
        clipped, dropped = clipped + c, dropped + d
        got = [[cat, *xy] for cat, xy in zip(r["box_category"], r["boxes"])]
        assert len(got) == len(want), name
        np.testing.assert_allclose(got, np.array(want).reshape(-1, 5), atol=1e-5, err_msg=name)
        # the layout: one channel per category, each the mask of that category's boxes; their union is the mask
        layout = np.array(r["layout"], np.uint8).reshape(k, RES, RES)
        for ci, cat in enumerate(DEFAULT_CATEGORIES):
            only = Frame(name, boxes=[b for b in by_name[name].boxes if b.category == cat])
            np.testing.assert_array_equal(layout[ci], reference_mask(only, w, h), err_msg=f"{name} {cat}")
        np.testing.assert_array_equal(layout.max(0), np.array(r["object_mask"]).reshape(RES, RES))
        seg = np.array(r["segmentation"], np.uint8).reshape(RES, RES)
        if name.startswith("scene-"):
            want_seg = reference_segmentation(str(root / "ds" / "labels" / "sem_seg" / "masks" /
                                                  name.replace(".jpg", ".png")), 1)
            np.testing.assert_array_equal(seg, want_seg, err_msg=name)
            with_seg += 1
        else:
            assert (seg == 255).all(), name  # no mask: ignore everywhere
    # 72x48 frames lose 12 px on each side to the crop: some boxes are cut, some fall out, all counted
    assert clipped > 0 and dropped > 0 and with_seg > 5
    assert (summary["boxes_clipped"], summary["boxes_cropped_out"]) == (clipped, dropped)
    layout_box = np.array(rows["box.png"]["layout"]).reshape(k, RES, RES)
    assert layout_box[DEFAULT_CATEGORIES.index("car"), :16, :16].all() and layout_box.sum() == 256


@pytest.mark.parametrize("in_memory", [False, True])
def test_read_latent_dataset_with_ray(local_run, in_memory):
    root, *_ = local_run
    meta = read_shard_metadata(str(root / "shards"))
    seen = []
    cols = ["frame_id", "scenario", "moments", "moments_flip", "object_mask", "layout", "segmentation",
            "box_category", "boxes"]
    rows = read_rows(str(root / "shards"))
    k = len(meta.box_categories)
    dataset = read_latent_dataset(str(root / "shards"), columns=cols, in_memory=in_memory)
    assert isinstance(dataset, MaterializedDataset) == in_memory
    for batch in dataset.iter_batches(batch_size=5, batch_format="numpy"):
        assert sorted(batch) == sorted(cols)
        out = training_batch(batch, meta, torch.Generator().manual_seed(0))
        n = len(batch["frame_id"])
        assert out["latents"].shape == (n, 3, RES, RES) and out["object_mask"].shape == (n, 1, RES, RES)
        assert out["layout"].shape == (n, k, RES, RES) and out["segmentation"].shape == (n, RES, RES)
        assert out["latents"].abs().max() <= 1.01
        for i, name in enumerate(batch["frame_id"]):  # Ray's batches give the boxes the file holds
            stored = torch.tensor([[c, *xy] for c, xy in zip(rows[name]["box_category"], rows[name]["boxes"])])
            # mirrored or not: the sampled latent sits next to the stored mean or next to its mirror
            mean = torch.tensor(np.array(rows[name]["moments"], np.float32)).view(6, RES, RES)[:3]
            flipped = (out["latents"][i] - mean.flip(-1)).abs().mean() < (out["latents"][i] - mean).abs().mean()
            layout = torch.tensor(np.array(rows[name]["layout"], np.float32)).view(k, RES, RES)
            torch.testing.assert_close(out["layout"][i], layout.flip(-1) if flipped else layout, msg=name)
            want = stored.view(-1, 5).clone()
            if flipped:
                want[:, 1], want[:, 3] = 1 - stored.view(-1, 5)[:, 3], 1 - stored.view(-1, 5)[:, 1]
            torch.testing.assert_close(out["boxes"][i], want.float(), msg=name)
        seen += list(batch["frame_id"])
    assert sorted(seen) == sorted(rows)


def test_rerun_skips_complete_shards_and_adds_no_duplicates(local_run, tmp_path):
    root, frames, job, first = local_run
    out = root / "shards"
    before = read_rows(str(out))
    gone = out / "shard-00001.parquet"
    gone_rows = pq.read_table(gone).num_rows
    gone_rejects = json.loads(pq.read_schema(gone).metadata[METADATA_KEY])["rejected"]
    gone.unlink()
    (out / ".shard-00001.parquet.tmp-1234abcd").write_bytes(b"half a shard from a crashed run")
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.parquet")}
    second = run_encode(job)
    assert second["shards_written"] == 1 and second["already_encoded_shards"] == len(stamps)
    assert second["frames_read"] == gone_rows + len(gone_rejects) == 6
    assert second["encoded"] == gone_rows and second["rows_total"] == first["rows_total"]
    for p in out.glob("shard-*.parquet"):
        if p.name != gone.name:
            assert (p.stat().st_mtime_ns, p.read_bytes()) == stamps[p.name], p.name
    after = read_rows(str(out))
    assert sorted(after) == sorted(before)
    for k in before:
        assert before[k]["moments"] == after[k]["moments"]
    assert not any(".tmp-" in n for n in os.listdir(out))
    # the skipped-frame list still covers every shard
    assert {r["frame_id"] for r in json.loads((out / "rejected.json").read_text())} == \
        set(BAD) | {"brokenbox.png", "box.png", "outside.png"}
    third = run_encode(job)  # nothing left to do: no Ray work at all
    assert third["frames_read"] == 0 and third["shards_written"] == 0 and third["rows_total"] == first["rows_total"]
    changed = make_job(job.data.input, job.data.output, data__resolution=16)
    with pytest.raises(ConfigError, match="holds shards of a different encode \\(differs in: .*resolution"):
        run_encode(changed)


def _tiny_vae(path: Path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=RES)
    vae.save_pretrained(str(path))
    return vae.eval()


def test_s3_to_s3_with_autoencoder_kl_from_the_bucket(ray_session, s3_bucket, tmp_path):
    base = f"s3://{s3_bucket}"
    frames = make_dataset(f"{base}/ds", num=8)
    vae = _tiny_vae(tmp_path / "vae")
    storage.upload_dir(str(tmp_path / "vae"), f"{base}/models/vae")
    job = make_job(f"{base}/ds", f"{base}/shards", codec__kind="autoencoder_kl", codec__source=f"{base}/models/vae")
    summary = run_encode(job)
    good = {f.name for f in frames if f.name not in BAD and f.name not in SKIPPED
            and not (f.weather == "foggy" and f.timeofday != "night")}
    assert summary["encoded"] == len(good) and summary["corrupt"] == 5
    assert storage.exists(f"{base}/shards/rejected.json") and storage.exists(f"{base}/shards/encode.json")
    meta = read_shard_metadata(f"{base}/shards")
    assert meta.codec_id == f"autoencoder_kl:{base}/models/vae" and meta.scale_factor == pytest.approx(0.18215)
    assert meta.latent_shape == (4, RES // 2, RES // 2) and meta.num_rows == len(good)
    rows = read_rows(f"{base}/shards")
    by_name = {f.name: f for f in frames}
    for name, r in rows.items():
        data = storage.read_bytes(f"{base}/ds/images/{name}")
        x = torch.from_numpy(reference_crop(data)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            want = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.parameters
        got = torch.tensor(np.array(r["moments"], np.float32)).view(1, 8, RES // 2, RES // 2)
        got_flip = torch.tensor(np.array(r["moments_flip"], np.float32)).view(1, 8, RES // 2, RES // 2)
        tol = 0.05 if name != "box.png" else 0.5
        torch.testing.assert_close(got, want[:1], atol=tol, rtol=0.02)
        torch.testing.assert_close(got_flip, want[1:], atol=tol, rtol=0.02)
        w, h = Image.open(io.BytesIO(data)).size
        np.testing.assert_array_equal(np.array(r["object_mask"]).reshape(RES // 2, RES // 2),
                                      reference_mask(by_name[name], w, h, factor=2), err_msg=name)
        if name.startswith("scene-"):  # the segmentation downsampled to the 16x16 latent grid, read from S3
            np.testing.assert_array_equal(
                np.array(r["segmentation"], np.uint8).reshape(RES // 2, RES // 2),
                reference_segmentation(f"{base}/ds/labels/sem_seg/masks/{name.replace('.jpg', '.png')}", 2),
                err_msg=name)
    local = load_latents_local(f"{base}/shards", limit=3)
    assert local["latents"].shape == (3, 4, RES // 2, RES // 2)


def test_config_errors_list_every_problem_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(EncodeJob, data={"data": {"input": "x", "output": "y", "resolutin": 32, "resolution": 0,
                                              "night_scenario": "dark"},
                                     "codec": {"kind": "vqgan"}, "scaling": {"num_workers": 0}})
    text = str(err.value)
    for needle in ("data.resolutin: unknown field", "data.resolution: Input should be greater than or equal to 8",
                   "codec.kind", "scaling.num_workers"):
        assert needle in text, needle
    # night_scenario is a model-level check: it only runs once the fields are valid
    with pytest.raises(ConfigError, match="night_scenario: 'dark' is not in scenarios"):
        load_config(EncodeJob, data={"data": {"input": "x", "output": "y", "night_scenario": "dark"}})
    # I/O problems, all at once: missing input, a codec directory without config.json, and a resolution
    # the VAE's factor does not divide (a tiny VAE: factor 2)
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(json.dumps({"block_out_channels": [8, 16], "latent_channels": 4}))
    (vae_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # only the config is read before Ray
    job = make_job(str(tmp_path / "nope"), str(tmp_path / "out"), codec__kind="autoencoder_kl",
                   codec__source=str(vae_dir), data__resolution=33)
    with pytest.raises(ConfigError) as err:
        run_encode(job)
    assert "data.input:" in str(err.value) and "data.resolution: 33 is not divisible by the codec's " \
        "downsampling factor 2; use 32 or 34" in str(err.value)
    bad_codec = make_job(str(tmp_path), str(tmp_path / "out"), codec__kind="autoencoder_kl",
                         codec__source=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="codec: codec.source .* has no config.json"):
        run_encode(bad_codec)
    with pytest.raises(ConfigError, match="codec.scale_factor: the pixel codec stores images as they are"):
        run_encode(make_job(str(tmp_path), str(tmp_path / "out"), codec__scale_factor=0.5))
    # the command line prints the list and exits 2, leaving nothing behind
    assert encode_mod.main(["--data.input", str(tmp_path / "nope"), "--data.output", str(tmp_path / "out"),
                            "--codec.kind", "autoencoder_kl"]) == 2
    assert "codec.source is required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_codec_actors_that_leave_no_cpu_to_read_are_refused(ray_session, tmp_path):
    # Ray would start the codec actor and wait forever for a CPU to read with: the job hung, printing progress
    write_scenes_dataset(str(tmp_path / "src"), num=4, size=48, seed=1)
    job = make_job(str(tmp_path / "src"), str(tmp_path / "out"), scaling__cpus_per_worker=4.0)
    with pytest.raises(ConfigError, match=r"1 codec actor\(s\) x scaling.cpus_per_worker 4 \+ one read task x "
                                          r"pipeline.read_cpus 0.5 need 4.5 CPUs but the Ray cluster has 4"):
        run_encode(job)
    assert not (tmp_path / "out").exists()


def test_jobs_entry_point_and_demo_config(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    job = load_config(EncodeJob, repo / "configs" / "demo" / "encode.yaml")
    assert (job.codec.kind, job.codec.source, job.data.resolution) == ("autoencoder_kl", "builtin:tiny-vae", 128)
    # the demo config runs on its own too (`drivedit encode --config ...` on 2 cores): its local Ray has the CPUs
    assert job.scaling.num_workers * job.scaling.cpus_per_worker + job.pipeline.read_cpus <= job.ray.num_cpus
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  input: /nonexistent/ds\n  output: /tmp/x\n  resolution: 30\ncodec:\n  kind: pixel\n")
    proc = subprocess.run([sys.executable, str(repo / "jobs" / "encode.py"), "--config", str(bad)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2 and "data.input: /nonexistent/ds does not exist" in proc.stderr
