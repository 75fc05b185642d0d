"""The encode job's per-batch stages without Ray: decode/resize/crop, the read stage's rows, and the codec
actor class with a tiny random AutoencoderKL saved to a directory (and with the pixel codec). The labels on
the latent grid (boxes, layout, segmentation) are tested in test_layout.py."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from drivedit.data.encode_stages import BadImage, CodecEncoder, decode_and_crop, describe_codec, load_images


def _jpeg(w: int, h: int) -> bytes:
    # a horizontal ramp: column x has value x * 255 / (w - 1), so the crop offset is visible in the pixels
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float32)[None, :, None], (h, 1, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_decode_resize_center_crop_geometry():
    img, (sx, sy, left, top), size = decode_and_crop(_jpeg(1280, 720), 64)
    assert size == (1280, 720)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # 720 -> 64: the width becomes round(1280 * 64 / 720) = 114, cropped by 25 on the left
    assert (left, top) == (25.0, 0.0) and abs(sx - 114 / 1280) < 1e-9 and abs(sy - 64 / 720) < 1e-9
    # the crop's first column comes from source x ~ left / sx, i.e. ~ 281 of 1280 on the ramp
    expected_first = (left + 0.5) / sx * 255 / 1279
    assert abs(float(img[:, 0].mean()) - expected_first) < 4
    assert abs(float(img[:, -1].mean()) - (left + 63.5) / sx * 255 / 1279) < 4
    portrait, t, _ = decode_and_crop(_jpeg(40, 90), 40)  # the short side is already the target
    assert portrait.shape == (40, 40, 3) and t[2:] == (0.0, 25.0)


def test_decode_stretch_keeps_the_whole_frame():
    img, (sx, sy, left, top), size = decode_and_crop(_jpeg(1920, 1208), 64, "stretch")
    assert img.shape == (64, 64, 3) and size == (1920, 1208) and (left, top) == (0.0, 0.0)
    assert (sx, sy) == (64 / 1920, 64 / 1208)
    # nothing is cropped away: the ramp runs from ~0 to ~255 across the result
    assert float(img[:, 0].mean()) < 6 and float(img[:, -1].mean()) > 249


@pytest.mark.parametrize("data, reason", [
    (b"GIF89a not really", "undecodable image"),
    (_jpeg(200, 100)[:300], "undecodable image"),
    (_jpeg(30, 100), "too small: 30x100 < 32"),
])
def test_bad_images(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_and_crop(data, 32)


@pytest.mark.parametrize("io_threads", [1, 8])
def test_load_images_keeps_every_row(tmp_path, io_threads):
    (tmp_path / "a.jpg").write_bytes(_jpeg(64, 48))
    batch = {"source_uri": np.array([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], dtype=object),
             "boxes": np.array([json.dumps([[1, 0, 0, 64, 24, "car"]]), "[]"], dtype=object),
             "segmentation": np.array(["", ""], dtype=object),
             "shard": np.array([0, 0]), "frame_id": np.array(["a.jpg", "b.jpg"], dtype=object)}
    out = load_images(batch, {"resolution": 32, "factor": 4, "num_categories": 2, "min_box_cells": 2.0,
                              "retries": 0, "io_threads": io_threads})
    assert out["image"].shape == (2, 32, 32, 3) and "segmentation" in out
    assert list(out["error"]) == ["", "missing image"] and out["num_objects"].tolist() == [1, 0]
    assert out["object_mask"].reshape(2, 8, 8)[0, :4].all() and out["object_mask"][1].sum() == 0
    # the car (id 1) fills the top half of the 64x48 image: crop x 8..56 of 64 -> x 0..1, y 0..0.5
    assert json.loads(out["boxes"][0]) == [[1, 0.0, 0.0, 1.0, 0.5]] and out["boxes_clipped"].tolist() == [1, 0]
    layout = out["layout"].reshape(2, 2, 8, 8)
    assert layout[0, 0].sum() == 0 and (layout[0, 1] == out["object_mask"].reshape(2, 8, 8)[0]).all()
    assert (out["segmentation"] == 255).all()  # no masks: ignore everywhere


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(str(path))
    return vae.eval()


def test_autoencoder_kl_codec_actor(tmp_path):
    vae = _tiny_vae(tmp_path / "pipe" / "vae")  # a pipeline folder: the codec finds vae/
    info = describe_codec({"kind": "autoencoder_kl", "source": str(tmp_path / "pipe")})
    assert (info.factor, info.latent_channels, info.scale_factor) == (4, 4, pytest.approx(0.18215))
    assert describe_codec({"kind": "autoencoder_kl", "source": str(tmp_path / "pipe"), "scale_factor": 0.5}).scale_factor == 0.5
    enc = CodecEncoder({"kind": "autoencoder_kl", "source": str(tmp_path / "pipe")}, [4, 4, 4], threads=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    batch = {"image": images, "error": np.array(["", "missing image", ""], dtype=object), "shard": np.zeros(3)}
    out = enc(batch)
    assert "image" not in out and out["moments"].shape == (3, 2 * 4 * 4 * 4) and out["moments"].dtype == np.float16
    x = torch.from_numpy(images[[0, 2]]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = vae.encode(x).latent_dist.parameters.reshape(2, -1)
        want_flip = vae.encode(x.flip(-1)).latent_dist.parameters.reshape(2, -1)
    got = torch.from_numpy(out["moments"][[0, 2]].astype(np.float32))
    got_flip = torch.from_numpy(out["moments_flip"][[0, 2]].astype(np.float32))
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_flip, want_flip, atol=2e-3, rtol=2e-3)
    assert not out["moments"][1].any() and not out["moments_flip"][1].any()  # the bad row stays zeros
    with pytest.raises(RuntimeError, match="expected"):
        CodecEncoder({"kind": "autoencoder_kl", "source": str(tmp_path / "pipe")}, [4, 8, 8]).encode_images(images)


def test_pixel_codec_actor_is_exact():
    enc = CodecEncoder({"kind": "pixel"}, [3, 8, 8])
    images = np.random.default_rng(1).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    m, mf = enc.encode_images(images)
    mean = m.reshape(2, 6, 8, 8)[:, :3].astype(np.float32)
    np.testing.assert_allclose((mean + 1) * 127.5, images.transpose(0, 3, 1, 2), atol=0.3)
    np.testing.assert_array_equal(mf.reshape(2, 6, 8, 8), m.reshape(2, 6, 8, 8)[..., ::-1])
    assert describe_codec({"kind": "pixel"}).factor == 1
    with pytest.raises(ValueError, match="codec.source is required"):
        describe_codec({"kind": "autoencoder_kl"})


def test_pixel_codec_actor_matches_the_torch_codec_and_needs_no_torch():
    # the actor's numpy path gives the very bits PixelCodec.encode gives (what the shards held before)
    from drivedit.models.codec import PixelCodec

    images = np.random.default_rng(2).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    m, mf = CodecEncoder({"kind": "pixel"}, [3, 16, 16]).encode_images(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (3, 3, 16, 16)
    ref = PixelCodec().encode(torch.cat([x, x.flip(-1)])).reshape(6, -1).to(torch.float16).numpy()
    np.testing.assert_array_equal(m, ref[:3])
    np.testing.assert_array_equal(mf, ref[3:])
    # and it starts without importing torch (seconds per actor process on a 2-core machine)
    import subprocess
    import sys

    code = ("import sys; from drivedit.data.encode_stages import CodecEncoder; "
            "CodecEncoder({'kind': 'pixel'}, [3, 8, 8]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_codec_ids_round_trip_and_bad_ones_are_named():
    from drivedit.models.codec import check_codec, codec_id, parse_codec_id

    assert codec_id("pixel", None) == "pixel" and parse_codec_id("pixel") == ("pixel", None)
    assert parse_codec_id(codec_id("autoencoder_kl", "s3://b/vae")) == ("autoencoder_kl", "s3://b/vae")
    with pytest.raises(ValueError, match="unknown codec id 'vqgan:x'"):
        parse_codec_id("vqgan:x")
    with pytest.raises(ValueError, match="unknown codec kind 'vqgan'"):
        check_codec("vqgan", None)
    with pytest.raises(ValueError, match="codec.source is required"):
        check_codec("autoencoder_kl", None)


def test_unreachable_and_malformed_s3_uris_are_config_errors(monkeypatch):
    """botocore's own errors are config errors naming data.input / data.output, not tracebacks."""
    from drivedit import storage
    from drivedit.config.base import ConfigError
    from drivedit.config.encode import EncodeJob
    from drivedit.data.encode import preflight

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setattr(storage, "_S3_CACHE", {})
    job = EncodeJob.model_validate({"data": {"input": "s3://unreachable-bucket/ds", "output": "s3://Bad!Bucket/out",
                                             "resolution": 32}})
    with pytest.raises(ConfigError) as err:
        preflight(job)
    text = str(err.value)
    assert "2 problems" in text, text
    assert "data.input: cannot look up s3://unreachable-bucket/ds (EndpointConnectionError" in text
    assert "data.output: cannot look up s3://Bad!Bucket/out (ParamValidationError" in text


def test_cli_lists_field_and_file_problems_together(tmp_path, capsys):
    """A field error does not hide the problems with the files: one run of the command lists them all."""
    import yaml

    from drivedit.data.encode import main

    cfg = tmp_path / "encode.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"input": str(tmp_path / "nope"), "output": str(tmp_path / "out"),
                                            "resolution": 32},
                                   "shards": {"rows_per_shard": 0}, "codec": {"kind": "pixel", "scale_factor": 0.5}}))
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "shards.rows_per_shard" in err and f"data.input: {tmp_path / 'nope'} does not exist" in err, err
    assert "codec.scale_factor: the pixel codec" in err and "(3 problems)" in err, err
