"""The per-batch work of the encode job, run inside Ray tasks and actors (and by the plain-loop baseline
of bench/encode.py): read + decode + resize + crop, the frame's labels on the latent grid (boxes,
layout map, segmentation; drivedit/data/layout.py), and the codec actor.

Every function here takes plain data (dicts of numpy arrays, JSON-able config dicts), so workers
never depend on driver state. A frame that cannot be used keeps its row with an `error` string:
the driver counts rows per shard to know when a shard is complete, so no row may vanish.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from drivedit import storage
from drivedit.data.bdd100k import SEGMENTATION_IGNORE
from drivedit.data.layout import (crop_segmentation, empty_segmentation, place_boxes, rasterise_layout,
                                  segmentation_to_grid)
from drivedit.models.pixel import pixel_moments


class BadImage(Exception):
    """An image the job skips and lists: missing, unreadable, undecodable or too small."""


@dataclass
class CodecInfo:
    codec_id: str
    factor: int
    latent_channels: int
    scale_factor: float


def _vae_config(source: str) -> dict:
    """The AutoencoderKL config (no weights) from an s3:// dir, or (read_vae_config) a local dir,
    `builtin:<name>` or a cached hub id."""
    if storage.is_remote(source):
        for rel in ("config.json", "vae/config.json"):
            uri = storage.join(source, rel)
            if storage.exists(uri):
                return json.loads(storage.read_text(uri))
        raise ValueError(f"codec.source {source!r} has no config.json (nor vae/config.json); point it at a "
                         "diffusers AutoencoderKL directory")
    from drivedit.models.codec import read_vae_config  # torch: only for VAE codecs (the pixel path stays numpy)

    return read_vae_config(source)


def describe_codec(codec: dict) -> CodecInfo:
    """What the shards need to know about a codec, without loading its weights."""
    from drivedit.models.codec import check_codec, codec_id, vae_geometry

    kind, source = codec.get("kind", "pixel"), codec.get("source")
    check_codec(kind, source)
    if kind == "pixel":
        return CodecInfo("pixel", 1, 3, 1.0)
    cfg = _vae_config(source)
    scale = codec.get("scale_factor") or cfg.get("scaling_factor", 0.18215)
    channels, factor = vae_geometry(cfg)
    return CodecInfo(codec_id(kind, source), factor, channels, float(scale))


def local_codec_source(source: str | None) -> str | None:
    """An s3:// codec directory is copied to a local cache once per node; other sources pass through."""
    if not source or not storage.is_remote(source):
        return source
    dest = os.path.join(tempfile.gettempdir(), "drivedit-codecs", source[len("s3://"):].strip("/").replace("/", "__"))
    marker = os.path.join(dest, ".complete")
    if not os.path.exists(marker):
        storage.download_dir(source, dest)
        open(marker, "w").close()
    return dest


def read_image_bytes(uri: str, retries: int = 3) -> bytes:
    """Bytes of one image; a missing file is final, other I/O errors are retried with backoff."""
    for attempt in range(retries + 1):
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:
            raise BadImage("missing image") from None
        except (OSError, IsADirectoryError) as e:
            if attempt == retries:
                raise BadImage(f"unreadable image: {type(e).__name__}: {e}") from None
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def decode_and_crop(data: bytes, resolution: int, resize: str = "crop"
                    ) -> tuple[np.ndarray, tuple[float, float, float, float], tuple[int, int]]:
    """Decode and bring to (res, res): `crop` resizes the short side to `resolution` and center-crops,
    `stretch` resizes both sides to it without keeping the aspect (as DriveDiTFit does with Ithaca365).
    -> ((res, res, 3) uint8, (sx, sy, left, top), (source width, source height)) where a source pixel x
    maps to x * sx - left in the result."""
    try:
        img = Image.open(io.BytesIO(data))
        ow, oh = img.size
        if min(ow, oh) < resolution:
            raise BadImage(f"too small: {ow}x{oh} < {resolution}")
        # JPEG: let the decoder downscale by 1/2, 1/4, 1/8 while each side stays >= its target
        if resize == "stretch":
            img.draft("RGB", (resolution, resolution))
        else:
            img.draft("RGB", (math.ceil(ow * resolution / min(ow, oh)), math.ceil(oh * resolution / min(ow, oh))))
        img = img.convert("RGB")
        img.load()
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise BadImage(f"undecodable image: {type(e).__name__}: {e}") from None
    # As ADM / DiT: halve with a box filter while possible, then bicubic to the exact size (less aliasing).
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    if resize == "stretch":
        img = img.resize((resolution, resolution), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8), (resolution / ow, resolution / oh, 0.0, 0.0), (ow, oh)
    scale = resolution / min(img.size)
    img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    crop = np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return crop, (img.width / ow, img.height / oh, float(left), float(top)), (ow, oh)


def _outside(boxes: list[list], size: tuple[int, int]) -> list[str]:
    """Why each box (any category) lies entirely outside the source image: such a box is broken labelling."""
    w, h = size
    return [f"{name} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies entirely outside the {w}x{h} image"
            for _, x1, y1, x2, y2, name in boxes if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h]


def frame_labels(record_boxes: list[list], segmentation: bytes | None, transform, size: tuple[int, int],
                 cfg: dict) -> dict:
    """One frame's labels after its resize and crop: object_mask (h*w,), layout (K*h*w,), segmentation
    (h*w,) uint8, num_objects, boxes (JSON of [[category id, x1, y1, x2, y2]] in [0, 1]), box counts.
    Raises BadImage for a box outside the image or a mask that does not fit it (the frame is listed)."""
    res, g, k = cfg["resolution"], cfg["resolution"] // cfg["factor"], cfg.get("num_categories", 0)
    outside = _outside(record_boxes, size)
    if outside:
        raise BadImage("broken box: " + "; ".join(outside))
    kept = [b[:5] for b in record_boxes if b[0] >= 0]
    placed, clipped, cropped_out = place_boxes(kept, transform, res)
    layout, drawn = rasterise_layout(placed, k, g, cfg.get("min_box_cells", 0.0), cfg.get("min_box_side_cells", 0.0))
    seg = empty_segmentation(g)
    if segmentation is not None:
        try:
            seg = segmentation_to_grid(crop_segmentation(segmentation, size, transform, res), g)
        except ValueError as e:
            raise BadImage(f"bad segmentation mask: {e}") from None
    return {"object_mask": layout.max(0).reshape(-1) if k else np.zeros(g * g, np.uint8),
            "layout": layout.reshape(-1), "segmentation": seg.reshape(-1), "num_objects": drawn,
            "boxes": json.dumps([[c] + [round(v, 6) for v in xy] for c, *xy in placed]),
            "boxes_clipped": clipped, "boxes_cropped_out": cropped_out, "boxes_too_small": len(placed) - drawn}


LABEL_COUNTS = ("boxes_clipped", "boxes_cropped_out", "boxes_too_small")


def load_images(batch: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """Ray Data stage: frame records (source_uri, boxes JSON of [[category id or -1, x1, y1, x2, y2, name]],
    segmentation URI or "") -> + image (N, res, res, 3) uint8, object_mask (N, h*w), layout (N, K*h*w),
    segmentation (N, h*w) uint8, num_objects (N,) int16, boxes (N,) JSON str, the box counts of
    LABEL_COUNTS (N,) int16, error (N,) str ("" when the frame is good)."""
    res, factor = cfg["resolution"], cfg["factor"]
    g, k = res // factor, cfg.get("num_categories", 0)
    n = len(batch["source_uri"])
    images = np.zeros((n, res, res, 3), np.uint8)
    out = {"object_mask": np.zeros((n, g * g), np.uint8), "layout": np.zeros((n, k * g * g), np.uint8),
           "segmentation": np.full((n, g * g), SEGMENTATION_IGNORE, np.uint8), "num_objects": np.zeros(n, np.int16),
           **{c: np.zeros(n, np.int16) for c in LABEL_COUNTS}}
    placed_boxes, errors = [], []
    retries = cfg.get("retries", 3)
    seg_uris = [str(u) for u in batch["segmentation"]] if "segmentation" in batch else [""] * n

    def fetch(uri: str) -> bytes | BadImage:
        if not uri:
            return None
        try:
            return read_image_bytes(uri, retries)
        except BadImage as e:
            return e

    # Object-store reads are latency-bound: fetch the whole batch with threads (the GIL is released while
    # waiting), then decode one by one.
    uris = [str(u) for u in batch["source_uri"]] + seg_uris
    threads = min(int(cfg.get("io_threads", 8)), len(uris))
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            blobs = list(pool.map(fetch, uris))
    else:
        blobs = [fetch(u) for u in uris]
    for i in range(n):
        try:
            if isinstance(blobs[i], BadImage):
                raise blobs[i]
            seg = blobs[n + i]
            if isinstance(seg, BadImage):
                raise BadImage(f"bad segmentation mask: {seg}")
            images[i], transform, size = decode_and_crop(blobs[i], res, cfg.get("resize", "crop"))
            labels = frame_labels(json.loads(str(batch["boxes"][i])), seg, transform, size, cfg)
            for key, col in out.items():
                col[i] = labels[key]
            placed_boxes.append(labels["boxes"])
            errors.append("")
        except BadImage as e:
            placed_boxes.append("[]")
            errors.append(str(e))
    result = {key: v for key, v in batch.items() if key not in ("boxes", "segmentation")}
    result.update(image=images, boxes=np.array(placed_boxes, dtype=object), error=np.array(errors, dtype=object),
                  **out)
    return result


class CodecEncoder:
    """Ray Data actor: images -> moments of the image and of its mirror, float16 (N, 2*C*h*w) each.
    The codec is loaded once per actor; on a GPU node it runs there."""

    def __init__(self, codec: dict, latent_shape: list[int], threads: int = 1):
        from drivedit.config.common import CodecConfig

        cfg = CodecConfig.model_validate(codec)  # re-validate: workers trust nothing but plain data
        self.latent_shape = tuple(latent_shape)
        self.torch = self.codec = None
        self.device_type = "cpu"
        if cfg.kind == "pixel":  # numpy only: the actor starts without importing torch
            return
        import torch

        from drivedit.models.codec import load_codec

        torch.set_num_threads(max(1, int(threads)))
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device_type = self.device.type
        self.codec = load_codec(cfg.kind, local_codec_source(cfg.source), cfg.scale_factor, cfg.dtype).to(self.device)

    def encode_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W, 3) uint8 -> (moments, moments_flip), each (n, 2*C*h*w) float16."""
        n = images.shape[0]
        if self.codec is None:  # the pixel codec
            m = pixel_moments(np.concatenate([images, images[:, :, ::-1]]))  # (2n, 6, H, W): image, then mirror
            self._check_shape(m.shape)
            m = m.reshape(2 * n, -1).astype(np.float16)
            return m[:n], m[n:]
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0        # (n, 3, H, W) in [-1, 1]
        x = torch.cat([x, x.flip(-1)])                          # (2n, 3, H, W): image, then mirror
        m = self.codec.encode(x)                                # (2n, 2C, h, w)
        self._check_shape(m.shape)
        m = m.reshape(2 * n, -1).to(torch.float16).cpu().numpy()
        return m[:n], m[n:]

    def _check_shape(self, shape) -> None:
        c, h, w = self.latent_shape
        if tuple(shape[1:]) != (2 * c, h, w):
            raise RuntimeError(f"codec produced moments of shape {tuple(shape[1:])}, expected {(2 * c, h, w)}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        c, h, w = self.latent_shape
        n = len(ok)
        moments = np.zeros((n, 2 * c * h * w), np.float16)
        moments_flip = np.zeros((n, 2 * c * h * w), np.float16)
        if ok.any():
            moments[ok], moments_flip[ok] = self.encode_images(images[ok])
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(moments=moments, moments_flip=moments_flip)
        return out
