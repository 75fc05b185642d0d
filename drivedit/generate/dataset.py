"""The files of a generated dataset, and how they become visible.

    <uri>/spec.json                      written first; its spec hash names the dataset
    <uri>/images/<shard>/<index>.png     one PNG per item (shard 5 digits, index 8 digits)
    <uri>/manifest/part-<shard>.parquet  written last for a shard: it marks the shard complete
    <uri>/manifest.parquet               every item, sorted by index (written when all shards are complete)
    <uri>/labels.json                    BDD100K frames (name relative to images/, weather, timeofday, scene;
                                         the box2d labels of frames made from a layout or a transfer)
    <uri>/coco.json, labels/, dataset.yaml  COCO / YOLO labels of the same frames, when output.label_formats asks
    <uri>/labels/sem_seg/masks/<shard>/<index>.png   the image's segmentation (BDD100K's layout: uint8 train
                                         ids, 255 ignore): a layout's, when the branch reads segmentation, or a
                                         transfer's carried mask
    <uri>/mlflow_run.json                the MLflow run of this dataset (when tracking is on), for reruns
    <uri>/attempt.json                   the id of the execution now writing the dataset (see below)

Every file is written under a temporary name and renamed (S3 puts are atomic), so nothing
half-written is ever visible under a final name. A rerun skips shards that have a manifest part
and rewrites the others completely.

A killed job's Ray workers can live on for seconds and keep writing. Each execution therefore
writes a new id to attempt.json before its workers start, and a writer checks that its own id is
still the one there before it clears a shard's folder and before it commits the shard's manifest
part: a writer of a superseded execution stops, so it can neither delete the files a rerun is
writing nor mark a shard complete under the rerun's feet.
"""
from __future__ import annotations

import io
import json
import os
import re
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from drivedit import storage
from drivedit.data.bdd100k import Box, Frame, frame_to_json, write_label_file

SPEC_FILE = "spec.json"
ATTEMPT_FILE = "attempt.json"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "manifest.parquet"
IMAGES_DIR = "images"
PARTS_DIR = "manifest"
MASKS_DIR = "labels/sem_seg/masks"  # BDD100K's place for semantic segmentation, under the dataset root
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")

MANIFEST_SCHEMA = pa.schema([
    ("index", pa.int64()),
    ("seed", pa.int64()),
    ("scenario", pa.string()),
    ("class_id", pa.int32()),
    ("shard", pa.int32()),
    ("name", pa.string()),  # image path relative to images/, as labels.json names it
    ("weather", pa.string()),
    ("timeofday", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("model_version", pa.string()),
    ("spec_hash", pa.string()),
    ("sampler", pa.string()),
    ("steps", pa.int32()),
    ("guidance", pa.float64()),
    ("guidance_kind", pa.string()),
    ("guide_channels", pa.int32()),
    # labelled items (spec.layouts, spec.transfer); null for items sampled from counts or balance
    ("source_frame", pa.string()),  # the real frame the image was made from: whose layout / which was re-rendered
    ("strength", pa.float64()),  # spec.transfer: the SDEdit strength s; null otherwise
    ("labels", pa.string()),  # JSON list of the image's BDD100K labels in its pixels: [{category, attributes,
    #                           box2d: {x1, y1, x2, y2}}], exactly as labels.json holds them
    ("mask", pa.string()),  # the image's segmentation mask relative to the dataset root, or null
])


class OutputConflictError(ValueError):
    """The output location holds a different dataset (another spec hash)."""


def manifest_settings(sampler) -> dict:
    """The sampler settings that decide the images (a SamplerSection): in the spec hash and every manifest row."""
    return {"sampler": sampler.sampler, "steps": sampler.steps, "guidance": float(sampler.guidance),
            "guidance_kind": sampler.guidance_kind, "guide_channels": sampler.guide_channels}


def spec_settings(sampler) -> dict:
    """The sampler settings in the spec hash: the manifest's, and the guidance interval where one is set (only
    then: datasets sampled with guidance at every step keep the hashes they had)."""
    settings = manifest_settings(sampler)
    if sampler.guidance_interval is not None:
        settings["guidance_interval"] = [float(v) for v in sampler.guidance_interval]
    return settings


def image_name(shard: int, index: int) -> str:
    """Path of an item's image relative to images/ (the BDD100K `name`)."""
    return f"{shard:05d}/{index:08d}.png"


def shard_dir(uri: str, shard: int) -> str:
    return storage.join(uri, IMAGES_DIR, f"{shard:05d}")


def part_uri(uri: str, shard: int) -> str:
    return storage.join(uri, PARTS_DIR, f"part-{shard:05d}.parquet")


def mask_path(name: str) -> str:
    """Path of an image's segmentation mask relative to the dataset root: BDD100K's masks/<image stem>.png."""
    return storage.join(MASKS_DIR, name.rsplit(".", 1)[0] + ".png")


def write_mask(uri: str, name: str, mask: np.ndarray, size: int) -> str:
    """A (res, res) train-id mask, resized (nearest: ids are labels) to the written (size, size) image, as
    <uri>/<mask_path(name)>; returns that relative path."""
    from PIL import Image

    if mask.shape[0] != size:
        mask = np.asarray(Image.fromarray(mask, mode="L").resize((size, size), Image.Resampling.NEAREST))
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask), mode="L").save(out, format="PNG", compress_level=6)
    storage.write_bytes_atomic(storage.join(uri, mask_path(name)), out.getvalue())
    return mask_path(name)


# ----------------------------------------------------------------------------- spec claim


def read_spec(uri: str) -> dict | None:
    path = storage.join(uri, SPEC_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path))


def claim_output(uri: str, document: dict, digest: str, model_version: str = "") -> bool:
    """Make `uri` this spec's dataset. Returns True when it already was (a resume).

    Raises OutputConflictError, before anything is written, when `uri` holds another spec, or
    holds files but no spec.json (some other directory).
    """
    existing = read_spec(uri)
    if existing is not None:
        if existing.get("spec_hash") != digest:
            differences = sorted(k for k in set(document) | set(existing.get("spec", {}))
                                 if document.get(k) != existing.get("spec", {}).get(k))
            raise OutputConflictError(
                f"{uri} holds a different dataset (spec hash {str(existing.get('spec_hash'))[:12]}, this job's is "
                f"{digest[:12]}; they differ in: {', '.join(differences) or 'format'}). Choose another "
                f"output.uri, or delete the old dataset to regenerate it")
        return True
    if storage.exists(uri) and storage.list_files(uri):
        raise OutputConflictError(
            f"{uri} is not empty and has no {SPEC_FILE}, so it is not a generated dataset; choose an empty or "
            f"new output.uri")
    body = json.dumps({"spec_hash": digest, "spec": document, "model_version": model_version}, indent=2, sort_keys=True)
    storage.write_text_atomic(storage.join(uri, SPEC_FILE), body)  # redacted: a model ref may carry a URI
    return False


# ----------------------------------------------------------------------------- shards


def complete_shards(uri: str) -> set[int]:
    """Shards with a manifest part: complete, every image written before the part."""
    parts_dir = storage.join(uri, PARTS_DIR)
    if not storage.exists(parts_dir):
        return set()
    done = set()
    for path in storage.list_files(parts_dir):
        m = _PART_RE.match(path.rstrip("/").rsplit("/", 1)[-1])
        if m:
            done.add(int(m.group(1)))
    return done


class SupersededError(RuntimeError):
    """A writer of an execution that a rerun has replaced."""


def begin_attempt(uri: str) -> str:
    """Make a new execution the dataset's writer: its id goes to attempt.json before any worker starts."""
    attempt = uuid.uuid4().hex
    storage.write_text_atomic(storage.join(uri, ATTEMPT_FILE), json.dumps(
        {"attempt": attempt, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    return attempt


def check_attempt(uri: str, attempt: str, shard: int) -> None:
    """SupersededError unless `attempt` is still the execution named in attempt.json."""
    current = json.loads(storage.read_text(storage.join(uri, ATTEMPT_FILE))).get("attempt")
    if current != attempt:
        raise SupersededError(f"{uri}: execution {attempt[:12]} was replaced by a rerun ({str(current)[:12]}); its "
                              f"writer stops before touching shard {shard}")


def remove_strays(uri: str, shard: int, keep: set[str]) -> int:
    """Before a shard is rewritten: delete files in its folder that are not one of its final images
    (hidden temporary files of an interrupted write included). Returns how many were removed."""
    fs, folder = storage.filesystem_for(shard_dir(uri, shard))
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return 0
    removed = 0
    for info in fs.get_file_info(pafs.FileSelector(folder, recursive=True)):
        if info.type == pafs.FileType.File and info.base_name not in keep:
            fs.delete_file(info.path)
            removed += 1
    return removed


def scenario_attributes(scenario: str, night: str = "night") -> tuple[str, str]:
    """(weather, timeofday) of a generated frame, so that the BDD100K rule maps it back to `scenario`:
    the night scenario is timeofday night (its weather unknown), any other scenario is daytime
    with the scenario as its weather."""
    if scenario == night:
        return "undefined", "night"
    return scenario, "daytime"


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_part(uri: str, shard: int, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    storage.write_bytes_atomic(part_uri(uri, shard), table_bytes(table))


# ----------------------------------------------------------------------------- final files


def read_parts(uri: str, shards: list[int]) -> pa.Table:
    tables = [_with_schema(pq.read_table(io.BytesIO(storage.read_bytes(part_uri(uri, k))))) for k in shards]
    table = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
    return table.sort_by("index")


# columns of parts written before the one schema of labelled items (spec.transfer's source and boxes)
_LEGACY = {"source": "source_frame", "boxes": "labels"}


def _with_schema(table: pa.Table) -> pa.Table:
    """A part in MANIFEST_SCHEMA: columns it lacks (an older part) are null, an older transfer part's
    `source` / `boxes` fill `source_frame` / `labels` (label_boxes reads every label form written)."""
    for old, new in _LEGACY.items():
        if old in table.column_names:
            merged = [a if a is not None else b for a, b in zip(
                table.column(new).to_pylist() if new in table.column_names else [None] * len(table),
                table.column(old).to_pylist())]
            table = table.drop_columns([old] + ([new] if new in table.column_names else []))
            table = table.append_column(new, pa.array(merged, pa.string()))
    for f in MANIFEST_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(len(table), f.type))
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def labels_json(boxes: list[Box]) -> str:
    """The manifest's `labels` of an image: its boxes as labels.json writes them (frame_to_json's labels)."""
    return json.dumps(frame_to_json(Frame(name="", boxes=boxes))["labels"], separators=(",", ":"))


def label_boxes(labels: str | None) -> list[Box]:
    """Boxes of a manifest `labels` value; also reads the forms older parts hold ({category, x1, .., y2} of
    layouts, box2d as [x1, y1, x2, y2] of transfers)."""
    boxes = []
    for b in json.loads(labels) if labels else []:
        xy = b.get("box2d", b)
        xy = [xy[k] for k in ("x1", "y1", "x2", "y2")] if isinstance(xy, dict) else list(xy)
        boxes.append(Box(b["category"], *map(float, xy), attributes=b.get("attributes") or {}))
    return boxes


def finalize(uri: str, num_items: int, num_shards: int, label_formats: list[str] | tuple[str, ...] = ()) -> pa.Table:
    """Join the shards' manifest parts into manifest.parquet and labels.json (and the `label_formats`
    asked for: COCO / YOLO, from the same frames).

    Checks that every index 0..N-1 is there exactly once before writing any file.
    """
    table = read_parts(uri, list(range(num_shards)))
    index = table.column("index").to_numpy()
    if len(index) != num_items or not np.array_equal(index, np.arange(num_items)):
        seen = np.unique(index)
        raise RuntimeError(f"{uri}: the manifest parts hold {len(index)} rows for {num_items} items "
                           f"({num_items - len(seen)} missing, {len(index) - len(seen)} duplicated); "
                           f"rerun the job to rewrite the damaged shards")
    storage.write_bytes_atomic(storage.join(uri, MANIFEST_FILE), table_bytes(table))
    write_label_file(label_frames(table), storage.join(uri, LABELS_FILE))
    write_label_formats(uri, table, label_formats)
    return table


def write_label_formats(uri: str, table: pa.Table, label_formats: list[str] | tuple[str, ...]) -> dict:
    """COCO / YOLO files of the manifest's frames (image sizes from the manifest); the conversion report."""
    if not label_formats:
        return {}
    from drivedit.generate.label_formats import write_formats

    sizes = list(zip(table.column("width").to_pylist(), table.column("height").to_pylist()))
    return write_formats(uri, label_frames(table), sizes, label_formats).to_dict()


def missing_label_formats(uri: str, label_formats: list[str] | tuple[str, ...]) -> list[str]:
    """The formats among `label_formats` whose final file is not in the dataset yet."""
    from drivedit.generate.label_formats import COCO_FILE, YOLO_DATASET_FILE

    final = {"coco": COCO_FILE, "yolo": YOLO_DATASET_FILE}
    return [f for f in dict.fromkeys(label_formats) if not storage.exists(storage.join(uri, final[f]))]


def read_manifest(uri: str) -> pa.Table:
    """The dataset's manifest.parquet."""
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, MANIFEST_FILE))))


def label_frames(table: pa.Table) -> list[Frame]:
    """BDD100K frames of the manifest: name (relative to images/), weather, timeofday, and the box2d labels of
    frames made from a layout or transferred from a real frame (`labels`)."""
    table = _with_schema(table)
    cols = table.select(["name", "weather", "timeofday", "labels"]).to_pydict()
    return [Frame(name=n, weather=w, timeofday=t, boxes=label_boxes(lab))
            for n, w, t, lab in zip(cols["name"], cols["weather"], cols["timeofday"], cols["labels"])]


def manifest_row_count(uri: str) -> int | None:
    path = storage.join(uri, MANIFEST_FILE)
    if not storage.exists(path):
        return None
    return pq.read_metadata(io.BytesIO(storage.read_bytes(path))).num_rows
