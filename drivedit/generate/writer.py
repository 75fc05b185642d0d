"""The writing stage of a generation job: `write_shards`, a Ray Data task on CPU.

Latents -> images (codec decode, unless the sampler actor already decoded) -> PNG -> files, then
the shard's manifest part, which marks the shard complete. It imports no DiT code, and a task
worker keeps its imports and its codec from one shard to the next.
"""
from __future__ import annotations

import functools
import json
import time

import numpy as np
import torch
from PIL import Image

from drivedit import storage
from drivedit.config.base import validate_config
from drivedit.config.generate import GenerateJob
from drivedit.generate import dataset, transfer
from drivedit.generate.images import decode_to_uint8, encode_png
from drivedit.generate.layouts import pixel_boxes
from drivedit.generate.undrawable import mark_undrawable
from drivedit.models.codec import load_codec

def limit_threads(cpus: float) -> None:
    # several CPU actors on one node would otherwise each start one thread per core
    torch.set_num_threads(max(1, int(cpus)))


def codec_from_info(info: dict):
    """A codec from its plain description {kind, source, scale_factor, dtype} (SamplingModel.codec_info)."""
    return load_codec(info["kind"], info.get("source"), info.get("scale_factor"), info.get("dtype") or "float32")


def resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image, mode="RGB").resize((size, size), Image.Resampling.LANCZOS))


@functools.lru_cache(maxsize=2)
def _cached_codec(info_json: str):
    # a task worker process outlives its task: a VAE is loaded once per process, not once per shard
    return codec_from_info(json.loads(info_json)).to("cpu")


def write_shards(batch: dict[str, np.ndarray], job: dict, context: dict) -> dict[str, list]:
    """Ray Data task: decode (unless the sampler did), encode PNGs, write each shard's images, then its
    manifest part. `context` holds spec_hash, model_version, image_size, codec and class_ids."""
    cfg = validate_config(GenerateJob, job, "generate job (writer)")
    limit_threads(cfg.scaling.cpus_per_write_task)
    out: dict[str, list] = {"shard": [], "num_images": [], "scenarios": [], "sample_s": [], "write_s": []}
    for shard, items_json, kind, payload, shape, sample_s, labels, masks in zip(
            batch["shard"], batch["items"], batch["kind"], batch["payload"], batch["shape"], batch["sample_s"],
            batch["labels"], batch["masks"]):
        t0 = time.perf_counter()
        items = json.loads(items_json)
        shape = json.loads(shape)
        if kind == "latents":
            latents = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(shape).copy())
            codec = _cached_codec(json.dumps(context["codec"], sort_keys=True))
            with torch.inference_mode():
                pixels = decode_to_uint8(codec, latents)  # (N, H, W, 3)
        else:
            pixels = np.frombuffer(payload, dtype=np.uint8).reshape(shape)  # (N, H, W, 3)
        write_shard(cfg, context, int(shard), items, pixels, json.loads(labels), masks)
        counts: dict[str, int] = {}
        for it in items:
            counts[it["scenario"]] = counts.get(it["scenario"], 0) + 1
        out["shard"].append(int(shard))
        out["num_images"].append(len(items))
        out["scenarios"].append(json.dumps(counts))
        out["sample_s"].append(float(sample_s))
        out["write_s"].append(time.perf_counter() - t0)
    return out


def write_shard(job: GenerateJob, context: dict, shard: int, items: list[dict], pixels: np.ndarray,
                labels: list[dict | None] | None = None, masks: bytes = b"") -> None:
    """Write one shard's PNGs (each atomically), their masks, then its manifest part: the part says the shard
    is complete. `labels` holds per item what the sampler actor kept ({boxes: a transfer's boxes in
    model-resolution pixels or None, mask: whether it has one} or None), `masks` the (N, res, res) uint8
    segmentation or b"" when no item has one."""
    uri, size = job.output.uri, context["image_size"]
    settings = dataset.manifest_settings(job.sampler)
    names = [dataset.image_name(shard, it["index"]) for it in items]
    attempt = context.get("attempt")  # None: a caller outside a job execution (no rerun to guard against)
    if attempt:
        dataset.check_attempt(uri, attempt, shard)
    dataset.remove_strays(uri, shard, {n.rsplit("/", 1)[-1] for n in names})
    carried = labels or [None] * len(items)
    native = context.get("native_size", size)
    mask_stack = np.frombuffer(masks, np.uint8).reshape(len(items), native, native) if masks else None
    rows = []
    for k, (it, name, image) in enumerate(zip(items, names, pixels)):
        image = resize(image, size)
        storage.write_bytes_atomic(storage.join(uri, dataset.IMAGES_DIR, name), encode_png(image))
        boxes = None
        if "source_frame" in it:  # made from a layout: its boxes are the image's labels, in output pixels
            boxes = pixel_boxes(it["boxes"], context["box_categories"], size)
        elif carried[k] is not None and carried[k]["boxes"] is not None:  # transferred: the source's, carried
            boxes = transfer.carried_boxes(carried[k]["boxes"], native, size)
        if boxes is not None:  # what is under a token is labelled an ignore region, not an object (undrawable.py)
            boxes = mark_undrawable(boxes, context.get("ignore_under", 0.0))
        mask = None
        if mask_stack is not None and carried[k] is not None and carried[k]["mask"]:
            mask = dataset.write_mask(uri, name, mask_stack[k], size)
        weather, timeofday = dataset.scenario_attributes(it["scenario"])
        rows.append({"index": it["index"], "seed": it["seed"], "scenario": it["scenario"],
                     "class_id": context["class_ids"][it["scenario"]], "shard": shard, "name": name,
                     "weather": weather, "timeofday": timeofday, "width": size, "height": size,
                     "model_version": context["model_version"], "spec_hash": context["spec_hash"], **settings,
                     "source_frame": it.get("source_frame", it.get("source")), "strength": it.get("strength"),
                     "labels": dataset.labels_json(boxes) if boxes is not None else None, "mask": mask})
    if attempt:
        dataset.check_attempt(uri, attempt, shard)
    dataset.write_part(uri, shard, rows)
