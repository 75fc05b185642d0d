"""`drivedit encode`: a BDD100K-layout dataset -> latent shards, as a streaming Ray Data pipeline.

    frames (labels, scenario rules, shard assignment; on the driver, no Ray)
      -> read bytes through the storage layer + decode + resize + center-crop + rasterise boxes
         (CPU tasks)
      -> codec on the image and its mirror (actor pool; one GPU per actor when use_gpu)
      -> the driver gathers rows per shard and writes each shard atomically once it is complete

Frame k of the kept list always belongs to shard k // rows_per_shard, so a rerun over the same
output skips the shards that exist and never writes a row twice; `encode.json` beside the shards
records the settings and frame list, and a rerun with different ones stops instead of mixing them.
Frames that cannot be used (missing, unreadable, undecodable or too-small images, broken boxes) are
skipped, counted, and listed in `rejected.json` beside the shards.
"""
from __future__ import annotations

from drivedit.config.base import field_help_lines
import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from drivedit import storage
from drivedit.config.base import ConfigError, load_config
from drivedit.config.encode import EncodeJob
from drivedit.data.bdd100k import LabelFileError, ScenarioVocabulary, load_label_file
from drivedit.data.encode_stages import CodecEncoder, CodecInfo, describe_codec, load_images
from drivedit.data.shards import (SHARD_RE, ShardMetadata, build_shard_table, read_file_metadata, shard_name,
                                  write_shard)
from drivedit.logs import setup_logging
from drivedit.raylocal import connect_ray

log = logging.getLogger("drivedit.encode")
ROW_COLUMNS = ("frame_id", "source_uri", "scenario", "weather", "timeofday", "moments", "moments_flip",
               "object_mask", "num_objects")


@dataclass
class EncodePlan:
    """Everything decided on the driver before any Ray work."""

    codec: CodecInfo
    meta: ShardMetadata
    records: list[dict]                   # kept frames, in shard order
    frames_listed: int
    dropped: dict[str, int]               # scenario rules: reason -> count
    broken: list[dict]                    # frames skipped on the driver: broken boxes, duplicates
    settings: dict                        # what a rerun must match
    existing: set[int] = field(default_factory=set)  # complete shards already in the output

    @property
    def num_shards(self) -> int:
        return len({r["shard"] for r in self.records})


def _labels_uri(job: EncodeJob) -> str:
    return job.data.labels or storage.join(job.data.input, "labels.json")


def _images_uri(job: EncodeJob) -> str:
    return job.data.images or storage.join(job.data.input, "images")


def preflight(job: EncodeJob) -> CodecInfo:
    """Checks that need I/O (inputs exist, codec loadable, resolution fits the codec), all reported at once."""
    problems = []
    try:
        if not storage.exists(job.data.input):
            problems.append(f"data.input: {job.data.input} does not exist; point it at a dataset root with "
                            "images/ and labels.json (`drivedit scenes --out DIR` makes one)")
        elif not storage.exists(_labels_uri(job)):
            problems.append(f"data.labels: no label file at {_labels_uri(job)}; set data.labels to the BDD100K "
                            "label JSON")
        if not storage.is_remote(_images_uri(job)) and storage.exists(job.data.input) \
                and not storage.is_dir(_images_uri(job)):
            problems.append(f"data.images: {_images_uri(job)} is not a directory; set data.images to the folder "
                            "the label names are relative to")
    except ValueError as e:  # an unsupported URI scheme
        problems.append(f"data: {e}")
    info = None
    try:
        info = describe_codec(job.codec.model_dump(mode="json"))
    except (ValueError, KeyError) as e:
        problems.append(f"codec: {e}")
    if job.codec.kind == "pixel" and job.codec.scale_factor not in (None, 1.0):
        problems.append("codec.scale_factor: the pixel codec stores images as they are (scale 1); remove the field")
    if info is not None and job.data.resolution % info.factor:
        lo = job.data.resolution // info.factor * info.factor
        problems.append(f"data.resolution: {job.data.resolution} is not divisible by the codec's downsampling "
                        f"factor {info.factor}; use {lo or info.factor} or {lo + info.factor}")
    if problems:
        raise ConfigError("encode", problems)
    return info


def plan_frames(job: EncodeJob, codec: CodecInfo) -> EncodePlan:
    try:
        frames = load_label_file(_labels_uri(job))
    except LabelFileError as e:
        raise ConfigError("encode", [f"data.labels: {e}"]) from None
    vocab = ScenarioVocabulary(job.data.scenarios, job.data.night_scenario, tuple(job.data.drop_weathers))
    kept, dropped = vocab.split(frames)
    images, wanted = _images_uri(job), set(job.data.object_categories)
    records, broken, seen = [], [], set()
    for frame, sid in kept:
        uri = storage.join(images, frame.name)
        if frame.name in seen:  # each frame is encoded once, whatever the label file says
            broken.append({"frame_id": frame.name, "source_uri": uri, "reason": "duplicate frame in the labels"})
            continue
        seen.add(frame.name)
        if frame.broken_boxes:
            broken.append({"frame_id": frame.name, "source_uri": uri,
                           "reason": "broken box: " + "; ".join(frame.broken_boxes)})
            continue
        if job.data.limit is not None and len(records) >= job.data.limit:
            break
        boxes = [[b.x1, b.y1, b.x2, b.y2] for b in frame.boxes if b.category in wanted]
        records.append({"index": len(records), "shard": len(records) // job.shards.rows_per_shard,
                        "frame_id": frame.name, "source_uri": uri, "scenario": sid, "weather": frame.weather,
                        "timeofday": frame.timeofday, "boxes": json.dumps(boxes)})
    g = job.data.resolution // codec.factor
    meta = ShardMetadata(codec.codec_id, codec.scale_factor, job.data.resolution, (codec.latent_channels, g, g),
                         list(job.data.scenarios))
    frame_hash = hashlib.sha256("\n".join(r["frame_id"] + "|" + r["boxes"] for r in records).encode()).hexdigest()
    settings = {"codec_id": codec.codec_id, "scale_factor": codec.scale_factor, "resolution": job.data.resolution,
                "scenarios": list(job.data.scenarios), "night_scenario": job.data.night_scenario,
                "drop_weathers": list(job.data.drop_weathers), "object_categories": sorted(wanted),
                "min_box_cells": job.data.min_box_cells, "rows_per_shard": job.shards.rows_per_shard,
                "frames": len(records), "frames_sha256": frame_hash}
    return EncodePlan(codec, meta, records, len(frames), dropped, broken, settings)


def _check_output(job: EncodeJob, plan: EncodePlan) -> None:
    """Find complete shards of an earlier run; refuse to mix shards of different settings."""
    out = job.data.output
    record_uri = storage.join(out, "encode.json")
    existing = {int(SHARD_RE.search(f).group(1)) for f in storage.list_files(out, suffixes=[".parquet"])
                if SHARD_RE.search(f)}
    if storage.exists(record_uri):
        before = json.loads(storage.read_text(record_uri)).get("settings", {})
        differs = sorted(k for k in set(before) | set(plan.settings) if before.get(k) != plan.settings.get(k))
        if differs and existing:  # (a run that wrote no shard yet may be restarted with other settings)
            raise ConfigError("encode", [f"data.output: {out} holds shards of a different encode (differs in: "
                                         f"{', '.join(differs)}); choose a new data.output or delete that one"])
    elif existing:
        raise ConfigError("encode", [f"data.output: {out} holds shard files but no encode.json; choose a new "
                                     "data.output or delete those files"])
    plan.existing = existing & {r["shard"] for r in plan.records}
    if not storage.is_remote(out):  # temporary files of a run that died mid-write
        _, path = storage.filesystem_for(out)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if name.startswith(".shard-") and storage.TMP_MARKER in name:
                    os.remove(os.path.join(path, name))


def _start_ray(job: EncodeJob):
    ray = connect_ray(job.ray.address, job.ray.num_cpus)
    if job.scaling.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("encode", ["scaling.use_gpu: the Ray cluster has no GPU; set scaling.use_gpu: false "
                                     "or connect to a cluster with GPUs (ray.address)"])
    return ray


def build_dataset(job: EncodeJob, plan: EncodePlan, records: list[dict]):
    """The lazy Ray Dataset: records -> read/decode tasks -> codec actors."""
    import ray.data

    cfg = {"resolution": job.data.resolution, "factor": plan.codec.factor, "min_box_cells": job.data.min_box_cells,
           "retries": job.pipeline.read_retries, "io_threads": job.pipeline.io_threads}
    rb = job.pipeline.read_batch_size
    ds = ray.data.from_items(records, override_num_blocks=max(1, math.ceil(len(records) / rb)))
    read_compute = ray.data.TaskPoolStrategy(size=job.pipeline.max_read_tasks) if job.pipeline.max_read_tasks else None
    # Read tasks ask for other resources than the codec actors (read_cpus), which keeps them a stage of their
    # own: Ray fuses a task stage into an actor stage with equal requests, and decoding could then use only
    # as many CPUs as there are actors, never overlapping with encoding.
    ds = ds.map_batches(load_images, batch_size=rb, fn_kwargs={"cfg": cfg}, compute=read_compute,
                        batch_format="numpy", num_cpus=job.pipeline.read_cpus)
    sc = job.scaling
    if not sc.use_gpu and job.pipeline.read_cpus == sc.cpus_per_worker:
        log.warning("pipeline.read_cpus equals scaling.cpus_per_worker: Ray fuses reading into the codec actors, "
                    "so decoding will not overlap with encoding; set them apart (e.g. read_cpus: 0.5)")
    return ds.map_batches(
        CodecEncoder, batch_size=job.pipeline.encode_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=sc.num_workers),
        fn_constructor_kwargs={"codec": job.codec.model_dump(mode="json"), "latent_shape": list(plan.meta.latent_shape),
                               "threads": max(1, int(sc.cpus_per_worker))},
        num_gpus=1 if sc.use_gpu else 0, num_cpus=sc.cpus_per_worker, resources=sc.resources_per_worker or None)


class ShardCollector:
    """Gathers encoded rows per shard; a shard whose every frame has come back is written (in a thread,
    so the pipeline keeps flowing) with its good rows in frame order and its skipped frames listed."""

    def __init__(self, job: EncodeJob, plan: EncodePlan, expected: dict[int, int], writer: ThreadPoolExecutor):
        self.job, self.plan, self.expected, self.writer = job, plan, dict(expected), writer
        self.parts: dict[int, list[dict]] = {s: [] for s in expected}
        self.counts = {s: 0 for s in expected}
        self.futures, self.rejected, self.encoded = [], [], 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        shards = np.asarray(batch["shard"])
        for s in np.unique(shards):
            sel = shards == s
            self.parts[int(s)].append({k: np.asarray(v)[sel] for k, v in batch.items()})
            self.counts[int(s)] += int(sel.sum())
            if self.counts[int(s)] == self.expected[int(s)]:
                self._finish(int(s))

    def _finish(self, s: int) -> None:
        parts = self.parts.pop(s)
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(rows["index"], kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
        ok = np.array([e == "" for e in rows["error"]], dtype=bool)
        rejected = [{"frame_id": str(f), "source_uri": str(u), "shard": s, "reason": str(e)}
                    for f, u, e, good in zip(rows["frame_id"], rows["source_uri"], rows["error"], ok) if not good]
        table = build_shard_table({k: rows[k][ok] for k in ROW_COLUMNS}, self.plan.meta, rejected)
        uri = storage.join(self.job.data.output, shard_name(s))
        self.futures.append(self.writer.submit(write_shard, uri, table, self.job.shards.compression))
        self.rejected += rejected
        self.encoded += int(ok.sum())
        log.info("shard %s: %d rows, %d skipped", shard_name(s), int(ok.sum()), len(rejected))

    def wait(self) -> None:
        for f in self.futures:
            f.result()  # re-raises a failed write
        if self.parts:
            raise RuntimeError(f"shards {sorted(self.parts)} did not receive all their rows; nothing was written "
                               "for them, rerun to complete them")


def run_encode(job: EncodeJob) -> dict:
    """Encode `job.data.input` into shards under `job.data.output`; returns the summary (also written to
    encode.json beside the shards). Raises ConfigError, before any Ray work, for a job that cannot run."""
    codec = preflight(job)
    plan = plan_frames(job, codec)
    if not plan.records:
        raise ConfigError("encode", [f"data.input: no frame of {_labels_uri(job)} is left after the scenario rules "
                                     f"(dropped: {plan.dropped or 'none'}; skipped: {len(plan.broken)})"])
    _check_output(job, plan)
    todo = [r for r in plan.records if r["shard"] not in plan.existing]
    expected: dict[int, int] = {}
    for r in todo:
        expected[r["shard"]] = expected.get(r["shard"], 0) + 1
    if todo:
        _start_ray(job)
    out = job.data.output
    storage.makedirs(out)
    storage.write_text_atomic(storage.join(out, "encode.json"),
                              json.dumps({"settings": plan.settings, "config": job.model_dump(mode="json")}, indent=1))
    start = time.perf_counter()  # images/s of the pipeline, not of starting Ray
    with ThreadPoolExecutor(max_workers=2) as writer:
        collector = ShardCollector(job, plan, expected, writer)
        if todo:
            log.info("encoding %d frames into %d shards (%d complete shards skipped)", len(todo), len(expected),
                     len(plan.existing))
            for batch in build_dataset(job, plan, todo).iter_batches(batch_size=None, batch_format="numpy"):
                collector.add(batch)
        collector.wait()
    seconds = time.perf_counter() - start
    # the skipped-frame list covers the whole output: this run, earlier runs' shards, broken boxes
    earlier = []
    for s in sorted(plan.existing):
        earlier += read_file_metadata(storage.join(out, shard_name(s))).get("rejected", [])
    rejected = plan.broken + sorted(earlier + collector.rejected, key=lambda r: (r["shard"], r["frame_id"]))
    storage.write_text_atomic(storage.join(out, "rejected.json"), json.dumps(rejected, indent=1))
    reasons: dict[str, int] = {}
    for r in collector.rejected:
        key = r["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = {
        "output": out, "frames_listed": plan.frames_listed,
        "dropped_by_scenario": sum(plan.dropped.values()), "dropped_reasons": plan.dropped,
        "broken_boxes": sum(r["reason"].startswith("broken box") for r in plan.broken),
        "duplicates": sum(r["reason"].startswith("duplicate") for r in plan.broken),
        "frames_read": len(todo), "encoded": collector.encoded,
        "corrupt": len(collector.rejected), "corrupt_reasons": reasons,
        "already_encoded_shards": len(plan.existing), "shards_written": len(expected),
        "rows_total": len(plan.records) - sum(1 for r in rejected if "shard" in r),
        "rejected_list": storage.join(out, "rejected.json"), "seconds": round(seconds, 3),
        "images_per_s": round(len(todo) / seconds, 2) if todo and seconds > 0 else 0.0,
    }
    storage.write_text_atomic(storage.join(out, "encode.json"), json.dumps(
        {"settings": plan.settings, "config": job.model_dump(mode="json"), "summary": summary}, indent=1))
    return summary


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="drivedit encode", description="Encode a BDD100K-layout dataset into latent shards (Ray Data).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set in the YAML or override as --section.field VALUE):\n"
               + "\n".join(field_help_lines(EncodeJob)))
    ap.add_argument("--config", help="YAML job config (e.g. configs/demo/encode.yaml)")
    args, overrides = ap.parse_known_args(argv)
    setup_logging()
    try:
        job = load_config(EncodeJob, args.config, overrides)
        summary = run_encode(job)
    except ConfigError as e:
        print(f"drivedit encode: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
