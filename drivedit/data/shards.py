"""Latent shards: the Parquet schema (DESIGN.md), writing one shard atomically, and reading shards back.

One row per frame: `frame_id`, `source_uri`, `scenario` (int16, an id into the vocabulary stored in
the file metadata), `weather`, `timeofday`, `moments` / `moments_flip` (float16 posterior mean and
log-variance of the image and of its mirror, 2*C*h*w values, so training draws a fresh latent every
step), `object_mask` (uint8, h*w, 1 inside object boxes on the latent grid) and `num_objects`.
The file metadata (key `drivedit.shard`, JSON) holds the codec id, scale factor, resolution, latent
shape, scenario vocabulary, and the frames of this shard that were skipped and why.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from drivedit import storage
from drivedit.models.codec import sample_latents

METADATA_KEY = b"drivedit.shard"
FORMAT_VERSION = 1
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

    def to_json(self) -> dict:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        return d


def shard_schema(latent_shape: tuple[int, int, int]) -> pa.Schema:
    c, h, w = latent_shape
    return pa.schema([
        ("frame_id", pa.string()), ("source_uri", pa.string()), ("scenario", pa.int16()),
        ("weather", pa.string()), ("timeofday", pa.string()),
        ("moments", pa.list_(pa.float16(), 2 * c * h * w)), ("moments_flip", pa.list_(pa.float16(), 2 * c * h * w)),
        ("object_mask", pa.list_(pa.uint8(), h * w)), ("num_objects", pa.int16()),
    ])


def _fixed_list(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    # (N, D) -> fixed_size_list<D>; a zero-row matrix still knows D
    n, d = matrix.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=value_type), d)


def build_shard_table(rows: dict[str, np.ndarray], meta: ShardMetadata, rejected: list[dict] | None = None) -> pa.Table:
    """rows: frame_id, source_uri, scenario, weather, timeofday (N,), moments, moments_flip (N, 2Chw),
    object_mask (N, hw), num_objects (N,) -> a table with the shard schema and metadata."""
    c, h, w = meta.latent_shape
    n = len(rows["frame_id"])
    moments = np.asarray(rows["moments"], np.float16).reshape(n, 2 * c * h * w)
    moments_flip = np.asarray(rows["moments_flip"], np.float16).reshape(n, 2 * c * h * w)
    mask = np.asarray(rows["object_mask"], np.uint8).reshape(n, h * w)
    schema = shard_schema(meta.latent_shape)
    arrays = [pa.array([str(x) for x in rows["frame_id"]], pa.string()),
              pa.array([str(x) for x in rows["source_uri"]], pa.string()),
              pa.array(np.asarray(rows["scenario"], np.int16), pa.int16()),
              pa.array([str(x) for x in rows["weather"]], pa.string()),
              pa.array([str(x) for x in rows["timeofday"]], pa.string()),
              _fixed_list(moments, pa.float16()), _fixed_list(moments_flip, pa.float16()),
              _fixed_list(mask, pa.uint8()), pa.array(np.asarray(rows["num_objects"], np.int16), pa.int16())]
    info = {"format": "drivedit.latent_shard", "version": FORMAT_VERSION, "codec_id": meta.codec_id,
            "scale_factor": meta.scale_factor, "resolution": meta.resolution,
            "latent_shape": list(meta.latent_shape), "scenarios": list(meta.scenarios),
            "rejected": list(rejected or [])}
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata({METADATA_KEY: json.dumps(info).encode()}))


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
        key = (info["codec_id"], info["scale_factor"], info["resolution"], info["latent_shape"], info["scenarios"])
        if first is None:
            first, first_file = key, f
        elif key != first:
            raise ValueError(f"shards disagree: {first_file} has (codec, scale, resolution, latent shape, scenarios) "
                             f"= {first} but {f} has {key}; encode them into separate folders")
        total += rows
    codec_id, scale, res, shape, scenarios = first
    return ShardMetadata(codec_id, float(scale), int(res), tuple(int(x) for x in shape), list(scenarios),
                         total, len(files))


def read_latent_dataset(uri: str, columns: list[str] | None = None):
    """The shards as a ray.data.Dataset (file order shuffled each epoch). Map its batches with
    `training_batch` to get latents."""
    import ray.data

    files = shard_files(uri)
    if not files:
        raise FileNotFoundError(f"no latent shards (shard-NNNNN.parquet) at {uri}; run `drivedit encode` first")
    fs, _ = storage.filesystem_for(uri)
    paths = [storage.filesystem_for(f)[1] for f in files]
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


def training_batch(batch: dict, meta: ShardMetadata, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A batch of shard rows -> {"latents": (N, C, h, w) float32 drawn from the stored moments times the
    scale factor, each item mirrored with probability 1/2 (its mask mirrored with it),
    "scenario": (N,) int64, "object_mask": (N, 1, h, w) float32}."""
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
    return {"latents": sample_latents(chosen, meta.scale_factor, generator), "scenario": scenario,
            "object_mask": mask}


def load_latents_local(uri: str, limit: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The first `limit` rows (all when None) in shard order, read with pyarrow only (no Ray), as
    `training_batch` returns them, drawn with a generator seeded by `seed`. For small probes."""
    meta = read_shard_metadata(uri)
    cols = ["scenario", "moments", "moments_flip", "object_mask"]
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
    for f in shard_files(uri):
        fs, path = storage.filesystem_for(f)
        t = pq.read_table(path, filesystem=fs, columns=["scenario", "num_objects"])
        counts.update(t.column("scenario").to_numpy().tolist())
        objs = t.column("num_objects").to_numpy()
        with_objects += int((objs > 0).sum())
        num_objects += int(objs.sum())
        rejected += json.loads(t.schema.metadata[METADATA_KEY]).get("rejected", [])
    return {"uri": uri, **meta.to_json(),
            "per_scenario": {name: int(counts.get(i, 0)) for i, name in enumerate(meta.scenarios)},
            "rows_with_objects": with_objects, "objects": num_objects, "rejected": len(rejected)}


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
    print(f"  rows with objects {info['rows_with_objects']}  objects {info['objects']}  "
          f"frames skipped while encoding {info['rejected']}")
    width = max(len(n) for n in info["per_scenario"])
    for i, (name, n) in enumerate(info["per_scenario"].items()):
        print(f"  {i:>3}  {name.ljust(width)}  {n}")
    return 0
