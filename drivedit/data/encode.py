"""`drivedit encode`: a BDD100K, Ithaca365 or COCO dataset -> latent shards, as a streaming Ray Data pipeline.

    frames (the format's reader, scenario rules, shard assignment; on the driver, no Ray)
      -> read bytes through the storage layer + decode + resize + crop; boxes, layout map and
         segmentation on the latent grid (CPU tasks)
      -> codec on the image and its mirror (actor pool; one GPU per actor when use_gpu)
      -> the driver gathers rows per shard and writes each shard atomically once it is complete

Frame k of the kept list always belongs to shard k // rows_per_shard, so a rerun over the same
output skips the shards that exist and never writes a row twice; `encode.json` beside the shards
records the settings and frame list, and a rerun with different ones stops instead of mixing them.
Frames that cannot be used (missing, unreadable, undecodable or too-small images, broken boxes or
boxes outside their image, bad segmentation masks, table rows that reference what does not exist)
are skipped, counted, and listed in `rejected.json` beside the shards.
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
from types import SimpleNamespace

import numpy as np

from drivedit import storage
from drivedit.config.base import ConfigError, load_config
from drivedit.config.encode import EncodeJob
from drivedit.data.bdd100k import CATEGORY_ALIASES, LabelFileError, ScenarioVocabulary
from drivedit.data.encode_stages import LABEL_COUNTS, CodecEncoder, CodecInfo, describe_codec, load_images
from drivedit.data.shards import (SHARD_RE, ShardMetadata, build_shard_table, read_file_metadata, shard_name,
                                  write_shard)
from drivedit.logs import setup_logging
from drivedit.raylocal import connect_ray
from drivedit.data.sources import default_images, default_labels, read_source

log = logging.getLogger("drivedit.encode")
ROW_COLUMNS = ("frame_id", "source_uri", "scenario", "weather", "timeofday", "moments", "moments_flip",
               "object_mask", "num_objects", "boxes", "layout", "segmentation")


@dataclass
class EncodePlan:
    """Everything decided on the driver before any Ray work."""

    codec: CodecInfo
    meta: ShardMetadata
    records: list[dict]                   # kept frames, in shard order
    frames_listed: int
    dropped: dict[str, int]               # scenario rules: reason -> count
    broken: list[dict]                    # skipped on the driver: broken boxes, duplicates, bad references
    settings: dict                        # what a rerun must match
    existing: set[int] = field(default_factory=set)  # complete shards already in the output

    @property
    def num_shards(self) -> int:
        return len({r["shard"] for r in self.records})


def _labels_uri(job: EncodeJob) -> str:
    return job.data.labels or default_labels(job.data.format, job.data.input)


def _images_uri(job: EncodeJob) -> str:
    return job.data.images or default_images(job.data.format, job.data.input)


def category_ids(vocabulary: list[str]) -> dict[str, int]:
    """Box category name -> id (position in the vocabulary); BDD100K's older names count as their det_20
    name when only that is in the vocabulary."""
    ids = {name: i for i, name in enumerate(vocabulary)}
    for old, new in CATEGORY_ALIASES.items():
        if old not in ids and new in ids:
            ids[old] = ids[new]
    return ids


def preflight(job: EncodeJob) -> CodecInfo:
    """Checks that need I/O (inputs exist, codec loadable, resolution fits the codec), all reported at once."""
    info, problems = io_checks(job.data, job.codec)
    if problems:
        raise ConfigError("encode", problems)
    return info


def config_checks(sections) -> list[str]:
    """`io_checks` of the sections that are valid (load_config's `checks`: listed with the field errors)."""
    return io_checks(sections.data, sections.codec)[1]


def io_checks(data, codec) -> tuple[CodecInfo | None, list[str]]:
    """(codec info, problems) of a data and a codec section; either may be None (invalid: not checked)."""
    job = SimpleNamespace(data=data, codec=codec)
    problems = []
    if data is not None:
        try:
            if not storage.exists(data.input):
                problems.append(f"data.input: {data.input} does not exist; point it at a dataset root with "
                                "images/ and labels.json (`drivedit scenes --out DIR` makes one)")
            elif not storage.exists(_labels_uri(job)):
                what = {"bdd100k": "the BDD100K label JSON", "ithaca365": "the folder of Ithaca365's v2.2 tables "
                        "(scene.json, weather.json, sample.json, sample_data.json, object_ann.json)",
                        "coco": "the COCO detection JSON"}[data.format]
                problems.append(f"data.labels: nothing at {_labels_uri(job)}; set data.labels to {what}")
            if not storage.is_remote(_images_uri(job)) and storage.exists(data.input) \
                    and not storage.is_dir(_images_uri(job)):
                problems.append(f"data.images: {_images_uri(job)} is not a directory; set data.images to the folder "
                                "the label names are relative to")
        except (ValueError, OSError) as e:  # an unsupported URI scheme, an unreachable or malformed bucket
            problems.append(f"data.input: {e}")
        try:
            storage.exists(data.output)
        except (ValueError, OSError) as e:
            problems.append(f"data.output: {e}")
    if codec is None:
        return None, problems
    info = None
    try:
        info = describe_codec(codec.model_dump(mode="json"))
    except (ValueError, KeyError) as e:
        problems.append(f"codec: {e}")
    if codec.kind == "pixel" and codec.scale_factor not in (None, 1.0):
        problems.append("codec.scale_factor: the pixel codec stores images as they are (scale 1); remove the field")
    if info is not None and data is not None and data.resolution % info.factor:
        lo = data.resolution // info.factor * info.factor
        problems.append(f"data.resolution: {data.resolution} is not divisible by the codec's downsampling "
                        f"factor {info.factor}; use {lo or info.factor} or {lo + info.factor}")
    return info, problems


def plan_frames(job: EncodeJob, codec: CodecInfo) -> EncodePlan:
    d = job.data
    try:
        src = read_source(d.format, d.input, _labels_uri(job), _images_uri(job), d.segmentation,
                          d.scenario_attribute, d.scenario_map)
    except LabelFileError as e:
        raise ConfigError("encode", [f"data.labels: {e}"]) from None
    vocab = ScenarioVocabulary(d.scenarios, d.night_scenario, tuple(d.drop_weathers))
    kept, dropped = vocab.split(src.frames)
    ids = category_ids(d.object_categories)
    records, broken, seen = [], list(src.problems), set()
    for frame, sid in kept:
        uri = storage.join(src.images, frame.name)
        if frame.name in seen:  # each frame is encoded once, whatever the label file says
            broken.append({"frame_id": frame.name, "source_uri": uri, "reason": "duplicate frame in the labels"})
            continue
        seen.add(frame.name)
        if frame.broken_boxes:
            broken.append({"frame_id": frame.name, "source_uri": uri,
                           "reason": "broken box: " + "; ".join(frame.broken_boxes)})
            continue
        if d.limit is not None and len(records) >= d.limit:
            break
        # every box travels (id -1: a category outside the vocabulary) so one outside its image is caught
        boxes = [[ids.get(b.category, -1), b.x1, b.y1, b.x2, b.y2, b.category] for b in frame.boxes]
        records.append({"index": len(records), "shard": len(records) // job.shards.rows_per_shard,
                        "frame_id": frame.name, "source_uri": uri, "scenario": sid, "weather": frame.weather,
                        "timeofday": frame.timeofday, "boxes": json.dumps(boxes),
                        "segmentation": frame.segmentation or ""})
    g = d.resolution // codec.factor
    meta = ShardMetadata(codec.codec_id, codec.scale_factor, d.resolution, (codec.latent_channels, g, g),
                         list(d.scenarios), box_categories=list(d.object_categories),
                         segmentation_classes=list(src.segmentation_classes))
    frame_hash = hashlib.sha256("\n".join(r["frame_id"] + "|" + r["boxes"] + "|" + r["segmentation"]
                                          for r in records).encode()).hexdigest()
    settings = {"format": d.format, "codec_id": codec.codec_id, "scale_factor": codec.scale_factor,
                "resolution": d.resolution, "resize": d.resize, "scenarios": list(d.scenarios),
                "night_scenario": d.night_scenario, "drop_weathers": list(d.drop_weathers),
                "object_categories": list(d.object_categories), "min_box_cells": d.min_box_cells,
                "min_box_side_cells": d.min_box_side_cells, "rows_per_shard": job.shards.rows_per_shard,
                "frames": len(records), "frames_sha256": frame_hash, "shard_version": meta.version}
    return EncodePlan(codec, meta, records, len(src.frames), dropped, broken, settings)


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
    ray = connect_ray(job.ray.address, job.ray.num_cpus, job.ray.worker_niceness)
    total = ray.cluster_resources()
    if job.scaling.use_gpu and total.get("GPU", 0) < 1:
        raise ConfigError("encode", ["scaling.use_gpu: the Ray cluster has no GPU; set scaling.use_gpu: false "
                                     "or connect to a cluster with GPUs (ray.address)"])
    sc, cpus = job.scaling, float(total.get("CPU", 0))
    need = sc.num_workers * sc.cpus_per_worker + job.pipeline.read_cpus
    if need > cpus:
        # Ray would start the codec actors and then wait forever for a CPU to read the first image with
        raise ConfigError("encode", [
            f"scaling: {sc.num_workers} codec actor(s) x scaling.cpus_per_worker {sc.cpus_per_worker:g} + one read "
            f"task x pipeline.read_cpus {job.pipeline.read_cpus:g} need {need:g} CPUs but the Ray cluster has "
            f"{cpus:g}; lower them, or give a local Ray more logical CPUs (ray.num_cpus)"])
    return ray


def stage_config(job: EncodeJob, codec: CodecInfo) -> dict:
    """The plain-data settings of the read/decode stage (encode_stages.load_images)."""
    d = job.data
    return {"resolution": d.resolution, "factor": codec.factor, "resize": d.resize,
            "num_categories": len(d.object_categories), "min_box_cells": d.min_box_cells,
            "min_box_side_cells": d.min_box_side_cells, "retries": job.pipeline.read_retries,
            "io_threads": job.pipeline.io_threads}


def build_dataset(job: EncodeJob, plan: EncodePlan, records: list[dict]):
    """The lazy Ray Dataset: records -> read/decode tasks -> codec actors."""
    import ray.data

    cfg = stage_config(job, plan.codec)
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
        self.box_counts = {c: 0 for c in LABEL_COUNTS}

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
        counts = {c: int(rows[c][ok].sum()) for c in LABEL_COUNTS}
        table = build_shard_table({k: rows[k][ok] for k in ROW_COLUMNS}, self.plan.meta, rejected, counts)
        for c in LABEL_COUNTS:
            self.box_counts[c] += counts[c]
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
                                     f"(dropped: {plan.dropped or 'none'}; skipped: {len(plan.broken)}"
                                     + (f", e.g. {plan.broken[0]['reason']}" if plan.broken else "") + ")"])
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
    bad_refs = [r for r in plan.broken if r["reason"].startswith("bad reference")]
    summary = {
        "output": out, "format": job.data.format, "frames_listed": plan.frames_listed,
        "dropped_by_scenario": sum(plan.dropped.values()), "dropped_reasons": plan.dropped,
        # broken boxes found in the labels, and boxes found outside their image once it was read
        "broken_boxes": sum(r["reason"].startswith("broken box") for r in plan.broken) + reasons.get("broken box", 0),
        "duplicates": sum(r["reason"].startswith("duplicate") for r in plan.broken),
        "bad_references": len(bad_refs),
        "frames_read": len(todo), "encoded": collector.encoded,
        "corrupt": len(collector.rejected), "corrupt_reasons": reasons, **collector.box_counts,
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
        prog="drivedit encode", description="Encode a BDD100K, Ithaca365 or COCO dataset into latent shards "
                                            "(Ray Data).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set in the YAML or override as --section.field VALUE):\n"
               + "\n".join(field_help_lines(EncodeJob)))
    ap.add_argument("--config", help="YAML job config (e.g. configs/demo/encode.yaml)")
    args, overrides = ap.parse_known_args(argv)
    setup_logging()
    try:
        job = load_config(EncodeJob, args.config, overrides, checks=config_checks)
        summary = run_encode(job)
    except ConfigError as e:
        print(storage.redact(f"drivedit encode: {e}"), file=sys.stderr)
        return 2
    print(storage.redact(json.dumps(summary, indent=2)))
    return 0
