"""Generation from layouts (`spec.layouts`): real frames' boxes -> items -> layout maps and box labels.

A source is a BDD100K-format label file (boxes in source pixels, placed on the square output by the
same resize + crop geometry the encode job uses, `data/layout.place_boxes`) or latent shards (their
boxes are already normalised to the crop). Each frame's boxes, as [[category id, x1, y1, x2, y2]] in
[0, 1] of the output and the branch's category ids, travel with its items; the sampler actor
rasterises them on the latent grid (`data/layout.rasterise_layout`), and the writer turns them into the
image's BDD100K `box2d` labels in output pixels. Items run frame by frame, then scenario, then variant,
so item i = (frame i // (S k), scenario (i // k) % S, variant i % k), seed base_seed + i.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np
import torch

from drivedit import storage
from drivedit.data.layout import place_boxes, rasterise_layout
from drivedit.generate.spec import ItemPlan, SpecError

log = logging.getLogger("drivedit.generate")


def _crop_transform(size: tuple[int, int], resolution: int, resize: str) -> tuple[float, float, float, float]:
    """(sx, sy, left, top) of encode_stages.decode_and_crop for an image of `size`, without decoding it."""
    ow, oh = size
    if resize == "stretch":
        return resolution / ow, resolution / oh, 0.0, 0.0
    scale = resolution / min(ow, oh)
    w, h = max(resolution, round(ow * scale)), max(resolution, round(oh * scale))
    return w / ow, h / oh, float((w - resolution) // 2), float((h - resolution) // 2)


def _image_size(uri: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
        return img.size


def _rounded(placed: list[list[float]]) -> list[list[float]]:
    # JSON-stable values: the items (and so the spec hash) do not depend on float printing
    return [[int(c)] + [round(float(v), 6) for v in xy] for c, *xy in placed]


def _from_bdd100k(section, categories: list[str], resolution: int) -> tuple[list[dict], int]:
    from drivedit.data.bdd100k import load_label_file

    images = section.images or storage.join(section.source.rsplit("/", 1)[0], "images")
    ids = {name: i for i, name in enumerate(categories)}
    frames, skipped = [], 0
    for frame in load_label_file(section.source):
        if section.limit is not None and len(frames) >= section.limit:
            break
        boxes = [[ids[b.category], b.x1, b.y1, b.x2, b.y2] for b in frame.boxes if b.category in ids]
        skipped += len(frame.boxes) - len(boxes)
        size = _image_size(storage.join(images, frame.name))
        placed, _, _ = place_boxes(boxes, _crop_transform(size, resolution, section.resize), resolution)
        frames.append({"source_frame": frame.name, "boxes": _rounded(placed)})
    return frames, skipped


def _from_shards(section, categories: list[str]) -> tuple[list[dict], int]:
    import pyarrow.parquet as pq

    from drivedit.data.shards import _box_rows, read_shard_metadata, shard_files

    meta = read_shard_metadata(section.source)
    if meta.version < 2:
        raise SpecError([f"spec.layouts.source {section.source} are version {meta.version} shards, which carry no "
                         "boxes; re-encode them with this drivedit"])
    to_branch = {i: categories.index(n) for i, n in enumerate(meta.box_categories) if n in categories}
    frames, skipped = [], 0
    for f in shard_files(section.source):
        fs, path = storage.filesystem_for(f)
        t = pq.read_table(path, filesystem=fs, columns=["frame_id", "box_category", "boxes"])
        for fid, rows in zip(t.column("frame_id").to_pylist(), _box_rows(t.column("box_category"), t.column("boxes"))):
            if section.limit is not None and len(frames) >= section.limit:
                return frames, skipped
            boxes = [[to_branch[int(r[0])], *r[1:]] for r in rows.tolist() if int(r[0]) in to_branch]
            skipped += len(rows) - len(boxes)
            frames.append({"source_frame": fid, "boxes": _rounded(boxes)})
    return frames, skipped


def read_layout_frames(section, categories: list[str], resolution: int) -> list[dict]:
    """[{source_frame, boxes: [[category id in `categories`, x1, y1, x2, y2] in [0, 1]]}] of a LayoutsSection's
    source, in source order. Boxes of categories the branch does not know are left out (and counted)."""
    try:
        if section.source.rstrip("/").endswith(".json"):
            frames, skipped = _from_bdd100k(section, categories, resolution)
        else:
            frames, skipped = _from_shards(section, categories)
    except (FileNotFoundError, OSError, ValueError) as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError([f"spec.layouts.source {section.source}: {e}"]) from None
    if not frames:
        raise SpecError([f"spec.layouts.source {section.source} holds no frames"])
    if skipped:
        log.info("spec.layouts: %d boxes of categories outside the model's %s were left out", skipped, categories)
    return frames


def layout_plan(frames: list[dict], scenarios: list[str], variants: int, base_seed: int, shard_size: int) -> ItemPlan:
    """Items frame-major: each frame under each scenario, `variants` times; extras carry frame and boxes."""
    per = len(scenarios) * variants
    pos = np.tile(np.repeat(np.arange(len(scenarios), dtype=np.int32), variants), len(frames))  # (F S k,)
    extras = tuple(frames[i // per] for i in range(len(frames) * per))
    return ItemPlan(scenarios=list(scenarios), scenario_pos=pos, base_seed=base_seed, shard_size=shard_size,
                    extras=extras)


def frames_digest(frames: list[dict]) -> str:
    return hashlib.sha256(json.dumps(frames, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def layout_maps(items: list[dict], num_categories: int, grid: int) -> torch.Tensor:
    """The items' boxes rasterised on the latent grid -> (N, K, grid, grid) float32."""
    maps = [rasterise_layout(it["boxes"], num_categories, grid)[0] for it in items]
    return torch.from_numpy(np.stack(maps).astype(np.float32))


def pixel_labels(boxes: list[list[float]], categories: list[str], size: int) -> list[dict]:
    """Normalised boxes -> BDD100K box2d labels in the pixels of a (size, size) output image."""
    return [{"category": categories[int(c)], "x1": round(x1 * size, 3), "y1": round(y1 * size, 3),
             "x2": round(x2 * size, 3), "y2": round(y2 * size, 3)} for c, x1, y1, x2, y2 in boxes]
