"""Latent shards: the Parquet schema (docs/shards.md), writing one shard atomically, and reading shards back.

One row per frame: `frame_id`, `source_uri`, `scenario` (int16, an id into the vocabulary stored in
the file metadata), `weather`, `timeofday`, `moments` / `moments_flip` (float16 posterior mean and
log-variance of the image and of its mirror, 2*C*h*w values, so training draws a fresh latent every
step), `object_mask` (uint8, h*w, 1 inside object boxes on the latent grid) and `num_objects`.
Version 2 adds `box_category` (list<int16>) and `boxes` (list of [x1, y1, x2, y2] float32 in [0, 1] of
the crop), `layout` (uint8, K*h*w: one channel per box category) and `segmentation` (uint8, h*w train
ids, 255 = ignore, all 255 where the dataset has no mask).
The file metadata (key `drivedit.shard`, JSON) holds the format version, codec id, scale factor,
resolution, latent shape, scenario vocabulary, box category vocabulary, segmentation classes, box
counts, and the frames of this shard that were skipped and why. Version 1 shards (no box columns)
still read: their box vocabulary is empty and they have no layout, boxes or segmentation.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from drivedit import storage
from drivedit.models.codec import sample_latents

METADATA_KEY = b"drivedit.shard"
FORMAT_VERSION = 2
SEGMENTATION_IGNORE = 255
SHARD_RE = re.compile(r"shard-(\d{5,})\.parquet$")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


@dataclass
class ShardMetadata:
    codec_id: str
    scale_factor: float
    resolution: int
    latent_shape: tuple[int, int, int]  # (C, h, w)
    scenarios: list[str]
    num_rows: int = 0
    num_files: int = 1
    box_categories: list[str] = field(default_factory=list)        # box category id -> name
    segmentation_classes: list[str] = field(default_factory=list)  # train id -> name; empty: no masks
    version: int = FORMAT_VERSION

    @property
    def layout_size(self) -> int:
        c, h, w = self.latent_shape
        return len(self.box_categories) * h * w

    def to_json(self) -> dict:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        return d


def shard_schema(latent_shape: tuple[int, int, int], num_box_categories: int = 0) -> pa.Schema:
    """The current version's schema; `layout` only when there are box categories (Arrow has no
    fixed-size list of size 0)."""
    c, h, w = latent_shape
    layout = [("layout", pa.list_(pa.uint8(), num_box_categories * h * w))] if num_box_categories else []
    return pa.schema([
        ("frame_id", pa.string()), ("source_uri", pa.string()), ("scenario", pa.int16()),
        ("weather", pa.string()), ("timeofday", pa.string()),
        ("moments", pa.list_(pa.float16(), 2 * c * h * w)), ("moments_flip", pa.list_(pa.float16(), 2 * c * h * w)),
        ("object_mask", pa.list_(pa.uint8(), h * w)), ("num_objects", pa.int16()),
        ("box_category", pa.list_(pa.int16())), ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        *layout, ("segmentation", pa.list_(pa.uint8(), h * w)),
    ])


def _box_lists(boxes, n: int) -> tuple[pa.ListArray, pa.ListArray]:
    """Per-row boxes ([[category id, x1, y1, x2, y2]], or that as a JSON string) -> (box_category, boxes)."""
    rows = [json.loads(b) if isinstance(b, (str, bytes)) else b for b in boxes]
    if len(rows) != n:
        raise ValueError(f"boxes has {len(rows)} rows, the other columns {n}")
    offsets = np.zeros(n + 1, np.int32)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = np.asarray([b for r in rows for b in r], np.float64).reshape(-1, 5)
    cats = pa.array(flat[:, 0].astype(np.int16), pa.int16())
    corners = _fixed_list(flat[:, 1:].astype(np.float32), pa.float32())
    offsets = pa.array(offsets, pa.int32())
    return pa.ListArray.from_arrays(offsets, cats), pa.ListArray.from_arrays(offsets, corners)


def _fixed_list(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    # (N, D) -> fixed_size_list<D>; a zero-row matrix still knows D
    n, d = matrix.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=value_type), d)


def build_shard_table(rows: dict[str, np.ndarray], meta: ShardMetadata, rejected: list[dict] | None = None,
                      box_counts: dict[str, int] | None = None) -> pa.Table:
    """rows: frame_id, source_uri, scenario, weather, timeofday (N,), moments, moments_flip (N, 2Chw),
    object_mask (N, hw), num_objects (N,), and optionally boxes (N,) per-row [[category id, x1, y1, x2, y2]]
    (or JSON strings of it), layout (N, K*h*w), segmentation (N, h*w) -> a table with the shard schema
    (the current version) and metadata. Missing optional columns mean no boxes, an empty layout and
    no segmentation (all ignore)."""
    c, h, w = meta.latent_shape
    n = len(rows["frame_id"])
    k = len(meta.box_categories)
    moments = np.asarray(rows["moments"], np.float16).reshape(n, 2 * c * h * w)
    moments_flip = np.asarray(rows["moments_flip"], np.float16).reshape(n, 2 * c * h * w)
    mask = np.asarray(rows["object_mask"], np.uint8).reshape(n, h * w)
    layout = (np.asarray(rows["layout"], np.uint8).reshape(n, k * h * w) if "layout" in rows
              else np.zeros((n, k * h * w), np.uint8))
    seg = (np.asarray(rows["segmentation"], np.uint8).reshape(n, h * w) if "segmentation" in rows
           else np.full((n, h * w), SEGMENTATION_IGNORE, np.uint8))
    box_category, boxes = _box_lists(rows["boxes"] if "boxes" in rows else [[]] * n, n)
    if len(box_category.values) and (box_category.values.to_numpy().max() >= k
                                     or box_category.values.to_numpy().min() < 0):
        raise ValueError(f"box category ids must lie in 0..{k - 1} (the box vocabulary {meta.box_categories})")
    schema = shard_schema(meta.latent_shape, k)
    arrays = [pa.array([str(x) for x in rows["frame_id"]], pa.string()),
              pa.array([str(x) for x in rows["source_uri"]], pa.string()),
              pa.array(np.asarray(rows["scenario"], np.int16), pa.int16()),
              pa.array([str(x) for x in rows["weather"]], pa.string()),
              pa.array([str(x) for x in rows["timeofday"]], pa.string()),
              _fixed_list(moments, pa.float16()), _fixed_list(moments_flip, pa.float16()),
              _fixed_list(mask, pa.uint8()), pa.array(np.asarray(rows["num_objects"], np.int16), pa.int16()),
              box_category, boxes, *([_fixed_list(layout, pa.uint8())] if k else []), _fixed_list(seg, pa.uint8())]
    info = {"format": "drivedit.latent_shard", "version": FORMAT_VERSION, "codec_id": meta.codec_id,
            "scale_factor": meta.scale_factor, "resolution": meta.resolution,
            "latent_shape": list(meta.latent_shape), "scenarios": list(meta.scenarios),
            "box_categories": list(meta.box_categories), "layout": "one channel per box category",
            "segmentation_classes": list(meta.segmentation_classes),
            "box_counts": dict(box_counts or {}), "rejected": list(rejected or [])}
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata(
        {METADATA_KEY: storage.redact(json.dumps(info)).encode()}))


def write_shard(uri: str, table: pa.Table, compression: str = "zstd") -> None:
    """Serialise in memory, then one atomic write: a reader never sees half a shard."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=None if compression == "none" else compression)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())


def shard_files(uri: str) -> list[str]:
    """The complete shard files under a directory URI (or the file itself), sorted."""
    if storage.exists(uri) and not storage.is_dir(uri):
        return [uri]
    return [f for f in storage.list_files(uri, suffixes=[".parquet"]) if SHARD_RE.search(f)]


def _file_info(uri: str) -> tuple[dict, int]:
    fs, path = storage.filesystem_for(uri)
    with fs.open_input_file(path) as f:
        md = pq.ParquetFile(f).metadata
        raw = (md.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{uri} is a Parquet file without drivedit shard metadata; "
                             "was it written by `drivedit encode`?")
        return json.loads(raw), md.num_rows


def read_file_metadata(uri: str) -> dict:
    """The raw metadata dict of one shard file (including its `rejected` list)."""
    return _file_info(uri)[0]


def read_shard_metadata(uri: str) -> ShardMetadata:
    """Metadata of a shard file or of every shard under a directory (checked to agree; rows summed)."""
    files = shard_files(uri)
    if not files:
        raise FileNotFoundError(f"no latent shards (shard-NNNNN.parquet) at {uri}; run `drivedit encode` first")
    first, total = None, 0
    for f in files:
        info, rows = _file_info(f)
        # version 1 files carry no box vocabulary and no segmentation classes
        key = (info["codec_id"], info["scale_factor"], info["resolution"], info["latent_shape"], info["scenarios"],
               info.get("box_categories", []), info.get("segmentation_classes", []), info.get("version", 1))
        if first is None:
            first, first_file = key, f
        elif key != first:
            raise ValueError(f"shards disagree: {first_file} has (codec, scale, resolution, latent shape, scenarios, "
                             f"box categories, segmentation classes, format version) = {first} but {f} has {key}; "
                             "encode them into separate folders")
        total += rows
    codec_id, scale, res, shape, scenarios, box_categories, seg_classes, version = first
    return ShardMetadata(codec_id, float(scale), int(res), tuple(int(x) for x in shape), list(scenarios),
                         total, len(files), list(box_categories), list(seg_classes), int(version))


def read_latent_dataset(uri: str, columns: list[str] | None = None, in_memory: bool = False):
    """The shards as a ray.data.Dataset. Streamed (the default): read by Ray Data tasks, file order shuffled each
    epoch. `in_memory`: read here with pyarrow, one block per shard, and held in the object store (a
    MaterializedDataset, for shards that fit in memory: Ray Data's read tasks spend seconds starting where
    pyarrow reads a few MB in a fraction of one; the order is the files'). Map its batches with `training_batch`
    to get latents."""
    import ray.data

    files = shard_files(uri)
    if not files:
        raise FileNotFoundError(f"no latent shards (shard-NNNNN.parquet) at {uri}; run `drivedit encode` first")
    fs, _ = storage.filesystem_for(uri)
    paths = [storage.filesystem_for(f)[1] for f in files]
    if in_memory:
        return ray.data.from_arrow([pq.read_table(path, filesystem=fs, columns=columns) for path in paths])
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle="files")
    return ds.select_columns(columns) if columns else ds


def _matrix(column, width: int, name: str) -> np.ndarray:
    """A batch column of fixed-size lists as (N, width), whatever container Ray or pyarrow gave."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.FixedSizeListArray):
        # flatten() honours slicing, unlike .values
        return _matrix(column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1), width, name)
    arr = np.asarray(column)
    if arr.dtype == object:
        arr = np.stack([np.asarray(x) for x in arr]) if len(arr) else np.zeros((0, width))
    arr = arr.reshape(len(arr), -1)
    if arr.shape[1] != width:
        raise ValueError(f"column {name} has {arr.shape[1]} values per row but the shard metadata says {width}")
    return arr


def _box_rows(categories, corners) -> list[np.ndarray]:
    """box_category / boxes batch columns -> per row a (n_i, 5) float32 array [category id, x1, y1, x2, y2]."""
    out = []
    for cats, xy in zip(_pylist(categories), _pylist(corners)):
        cats = np.asarray([] if cats is None else cats, np.float32).reshape(-1, 1)
        xy = np.asarray([np.asarray(b, np.float32) for b in ([] if xy is None else xy)], np.float32).reshape(-1, 4)
        out.append(np.concatenate([cats, xy], 1))
    return out


def _pylist(column) -> list:
    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        return column.to_pylist()
    return list(column)


def training_batch(batch: dict, meta: ShardMetadata, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A batch of shard rows -> {"latents": (N, C, h, w) float32 drawn from the stored moments times the
    scale factor, each item mirrored with probability 1/2 (its labels mirrored with it),
    "scenario": (N,) int64, "object_mask": (N, 1, h, w) float32}, and when the batch has the columns
    (version 2 shards): "layout": (N, K, h, w) float32, "segmentation": (N, h, w) int64 (255 ignore),
    "boxes": a list of N (n_i, 5) float32 tensors [category id, x1, y1, x2, y2] in [0, 1]."""
    c, h, w = meta.latent_shape
    moments = torch.from_numpy(_matrix(batch["moments"], 2 * c * h * w, "moments").astype(np.float32))
    moments_flip = torch.from_numpy(_matrix(batch["moments_flip"], 2 * c * h * w, "moments_flip").astype(np.float32))
    mask = torch.from_numpy(_matrix(batch["object_mask"], h * w, "object_mask").astype(np.float32))
    n = moments.shape[0]
    moments, moments_flip = moments.view(n, 2 * c, h, w), moments_flip.view(n, 2 * c, h, w)
    mask = mask.view(n, 1, h, w)
    flip = (torch.rand(n, generator=generator) < 0.5).view(n, 1, 1, 1)     # (N, 1, 1, 1)
    chosen = torch.where(flip, moments_flip, moments)                        # (N, 2C, h, w)
    mask = torch.where(flip, mask.flip(-1), mask)                            # (N, 1, h, w)
    scenario = torch.from_numpy(np.asarray(batch["scenario"]).astype(np.int64))
    out = {"latents": sample_latents(chosen, meta.scale_factor, generator), "scenario": scenario,
           "object_mask": mask}
    if "layout" in batch and meta.box_categories:
        k = len(meta.box_categories)
        layout = torch.from_numpy(_matrix(batch["layout"], k * h * w, "layout").astype(np.float32)).view(n, k, h, w)
        out["layout"] = torch.where(flip, layout.flip(-1), layout)          # (N, K, h, w)
    if "segmentation" in batch:
        seg = torch.from_numpy(_matrix(batch["segmentation"], h * w, "segmentation").astype(np.int64)).view(n, h, w)
        out["segmentation"] = torch.where(flip.view(n, 1, 1), seg.flip(-1), seg)  # (N, h, w)
    if "boxes" in batch and "box_category" in batch:
        boxes = []
        for b, f in zip(_box_rows(batch["box_category"], batch["boxes"]), flip.view(-1).tolist()):
            b = torch.from_numpy(b)                                          # (n_i, 5)
            if f:  # mirrored: x -> 1 - x, so x1' = 1 - x2 and x2' = 1 - x1
                b = torch.stack([b[:, 0], 1 - b[:, 3], b[:, 2], 1 - b[:, 1], b[:, 4]], 1)
            boxes.append(b)
        out["boxes"] = boxes
    return out


def label_columns(meta: ShardMetadata) -> list[str]:
    """The label columns a shard of this version has beyond object_mask (none before version 2)."""
    if meta.version < 2:
        return []
    return (["layout"] if meta.box_categories else []) + ["segmentation", "box_category", "boxes"]


def load_latents_local(uri: str, limit: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The first `limit` rows (all when None) in shard order, read with pyarrow only (no Ray), as
    `training_batch` returns them (with the label columns the shards have), drawn with a generator
    seeded by `seed`. For small probes."""
    meta = read_shard_metadata(uri)
    cols = ["scenario", "moments", "moments_flip", "object_mask"] + label_columns(meta)
    tables, have = [], 0
    for f in shard_files(uri):
        fs, path = storage.filesystem_for(f)
        t = pq.read_table(path, filesystem=fs, columns=cols)
        tables.append(t)
        have += t.num_rows
        if limit is not None and have >= limit:
            break
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    batch = {name: table.column(name).combine_chunks() for name in cols}
    return training_batch(batch, meta, torch.Generator().manual_seed(seed))


def scenario_counts(uri: str) -> dict[str, int]:
    """Rows per scenario name (vocabulary order, zeros included) over the shards at `uri`."""
    meta = read_shard_metadata(uri)
    counts = Counter()
    for f in shard_files(uri):
        fs, path = storage.filesystem_for(f)
        counts.update(pq.read_table(path, filesystem=fs, columns=["scenario"]).column("scenario").to_pylist())
    return {name: int(counts.get(i, 0)) for i, name in enumerate(meta.scenarios)}


def describe(uri: str) -> dict:
    """Rows, per-scenario counts, objects and metadata of the shards at `uri` (what `inspect shards` prints)."""
    meta = read_shard_metadata(uri)
    counts, with_objects, num_objects, rejected = Counter(), 0, 0, []
    per_category, box_counts = Counter(), Counter()
    for f in shard_files(uri):
        fs, path = storage.filesystem_for(f)
        cols = ["scenario", "num_objects"] + (["box_category"] if meta.version >= 2 else [])
        t = pq.read_table(path, filesystem=fs, columns=cols)
        counts.update(t.column("scenario").to_numpy().tolist())
        objs = t.column("num_objects").to_numpy()
        with_objects += int((objs > 0).sum())
        num_objects += int(objs.sum())
        if meta.version >= 2:
            per_category.update(t.column("box_category").combine_chunks().flatten().to_numpy().tolist())
        info = json.loads(t.schema.metadata[METADATA_KEY])
        rejected += info.get("rejected", [])
        box_counts.update(info.get("box_counts", {}))
    return {"uri": uri, **meta.to_json(),
            "per_scenario": {name: int(counts.get(i, 0)) for i, name in enumerate(meta.scenarios)},
            "rows_with_objects": with_objects, "objects": num_objects, "rejected": len(rejected),
            "boxes_per_category": {name: int(per_category.get(i, 0)) for i, name in enumerate(meta.box_categories)},
            "box_counts": dict(box_counts)}


def inspect_main(argv: list[str]) -> int:
    """`drivedit inspect shards URI [--json]`."""
    ap = argparse.ArgumentParser(prog="drivedit inspect shards", description="rows, per-scenario counts and "
                                 "metadata of latent shards")
    ap.add_argument("uri", help="a shard folder or file (local path or s3://)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    try:
        info = describe(args.uri)
    except (FileNotFoundError, ValueError) as e:
        print(f"drivedit inspect shards: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c, h, w = info["latent_shape"]
    print(f"{info['uri']}: {info['num_rows']} rows in {info['num_files']} files")
    print(f"  codec {info['codec_id']}  scale {info['scale_factor']}  resolution {info['resolution']}  "
          f"latent {c}x{h}x{w}")
    print(f"  format version {info['version']}  rows with objects {info['rows_with_objects']}  objects in the "
          f"layout {info['objects']}  frames skipped while encoding {info['rejected']}")
    if info["box_categories"]:
        print("  boxes: " + ", ".join(f"{k} {v}" for k, v in info["boxes_per_category"].items())
              + "".join(f"; {k} {v}" for k, v in info["box_counts"].items()))
    if info["segmentation_classes"]:
        print(f"  segmentation: {len(info['segmentation_classes'])} classes on the latent grid")
    width = max(len(n) for n in info["per_scenario"])
    for i, (name, n) in enumerate(info["per_scenario"].items()):
        print(f"  {i:>3}  {name.ljust(width)}  {n}")
    return 0
