"""Generation from layouts (`spec.layouts`): real frames' boxes -> items -> layout maps and box labels.

A source is a BDD100K-format label file (boxes in source pixels, placed on the square output by the
same resize + crop geometry the encode job uses, `data/layout.place_boxes`) or latent shards (their
boxes are already normalised to the crop). Each frame's boxes, as [[category id, x1, y1, x2, y2]] in
[0, 1] of the output and the branch's category ids, travel with its items; the sampler actor
rasterises them on the latent grid (`data/layout.rasterise_layout`), and the writer turns them into the
image's BDD100K `box2d` labels in output pixels. Items run frame by frame, then scenario, then variant,
so item i = (frame i // (S k), scenario (i // k) % S, variant i % k), seed base_seed + i.

A branch trained on segmentation also reads each frame's segmentation, and the image gets it as its mask
(`labels/sem_seg/masks/<shard>/<index>.png`, BDD100K's layout, uint8 train ids, 255 ignore):
- BDD100K source: the frame's mask `labels/sem_seg/masks/<image stem>.png` beside the label file, through
  the image's own resize and crop (`data/layout.crop_segmentation`); the branch sees it on the latent grid
  (`segmentation_to_grid`, as the encode job computes it), the written mask keeps the crop's pixels;
- latent shards: only their latent-grid segmentation exists, so the written mask is that grid upsampled
  (nearest) to the image: one label per latent cell (4 px at 128 px through a factor-4 VAE).
A frame without a mask is conditioned on "ignore everywhere" (as training saw it) and gets no mask file.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np
import torch

from drivedit import storage
from drivedit.data.bdd100k import SEGMENTATION_IGNORE, Box
from drivedit.data.layout import (crop_segmentation, empty_segmentation, place_boxes, rasterise_layout,
                                  segmentation_to_grid)
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


def _from_bdd100k(section, categories: list[str], resolution: int, segmentation_classes: list[str]
                  ) -> tuple[list[dict], int]:
    from drivedit.data.bdd100k import SEGMENTATION_CLASSES, read_bdd100k

    if segmentation_classes and list(segmentation_classes) != list(SEGMENTATION_CLASSES):
        raise SpecError([f"spec.layouts.source {section.source}: the layout branch reads segmentation over "
                         f"{len(segmentation_classes)} classes that are not BDD100K's {len(SEGMENTATION_CLASSES)}, so "
                         "a BDD100K mask cannot condition it; give the latent shards it was trained on"])

    root = section.source.rstrip("/").rsplit("/", 1)[0]
    source = read_bdd100k(root, labels=section.source, images=section.images or storage.join(root, "images"))
    ids = {name: i for i, name in enumerate(categories)}
    frames, skipped = [], 0
    for frame in source.frames:
        if section.limit is not None and len(frames) >= section.limit:
            break
        boxes = [[ids[b.category], b.x1, b.y1, b.x2, b.y2] for b in frame.boxes if b.category in ids]
        skipped += len(frame.boxes) - len(boxes)
        size = _image_size(storage.join(source.images, frame.name))
        transform = _crop_transform(size, resolution, section.resize)
        placed, _, _ = place_boxes(boxes, transform, resolution)
        record = {"source_frame": frame.name, "boxes": _rounded(placed)}
        if segmentation_classes:  # only then: the items (and spec hashes) of box-only branches stay as they were
            record.update(segmentation=frame.segmentation or "", source_size=list(size),
                          transform=[round(float(v), 9) for v in transform])
        frames.append(record)
    return frames, skipped


def _from_shards(section, categories: list[str], segmentation_classes: list[str]) -> tuple[list[dict], int]:
    import pyarrow.parquet as pq

    from drivedit.data.shards import _box_rows, read_shard_metadata, shard_files

    meta = read_shard_metadata(section.source)
    if meta.version < 2:
        raise SpecError([f"spec.layouts.source {section.source} are version {meta.version} shards, which carry no "
                         "boxes; re-encode them with this drivedit"])
    if segmentation_classes and list(meta.segmentation_classes) != list(segmentation_classes):
        raise SpecError([f"spec.layouts.source {section.source}: the layout branch reads segmentation over "
                         f"{len(segmentation_classes)} classes, but these shards carry "
                         f"{len(meta.segmentation_classes) or 'no'} segmentation classes"
                         f"{' (' + ', '.join(meta.segmentation_classes[:4]) + ', ...)' if meta.segmentation_classes else ''}"
                         "; give shards encoded from a dataset with BDD100K's masks, or a BDD100K-format source"])
    to_branch = {i: categories.index(n) for i, n in enumerate(meta.box_categories) if n in categories}
    columns = ["frame_id", "box_category", "boxes"] + (["segmentation"] if segmentation_classes else [])
    frames, skipped = [], 0
    for f in shard_files(section.source):
        fs, path = storage.filesystem_for(f)
        t = pq.read_table(path, filesystem=fs, columns=columns)
        segs = t.column("segmentation").to_pylist() if segmentation_classes else [None] * len(t)
        for fid, rows, seg in zip(t.column("frame_id").to_pylist(),
                                  _box_rows(t.column("box_category"), t.column("boxes")), segs):
            if section.limit is not None and len(frames) >= section.limit:
                return frames, skipped
            boxes = [[to_branch[int(r[0])], *r[1:]] for r in rows.tolist() if int(r[0]) in to_branch]
            skipped += len(rows) - len(boxes)
            record = {"source_frame": fid, "boxes": _rounded(boxes)}
            if seg is not None:  # the latent grid's train ids as hex; all ignore: the frame had no mask
                grid = np.asarray(seg, np.uint8)
                record["segmentation_grid"] = "" if (grid == SEGMENTATION_IGNORE).all() else grid.tobytes().hex()
            frames.append(record)
    return frames, skipped


def read_layout_frames(section, categories: list[str], resolution: int,
                       segmentation_classes: list[str] | None = None) -> list[dict]:
    """[{source_frame, boxes: [[category id in `categories`, x1, y1, x2, y2] in [0, 1]]}] of a LayoutsSection's
    source, in source order. Boxes of categories the branch does not know are left out (and counted).
    With `segmentation_classes` (a branch that reads segmentation) each frame also says where its mask is:
    `segmentation` (mask URI or "", source_size, transform) from BDD100K, `segmentation_grid` from shards."""
    try:
        if section.source.rstrip("/").endswith(".json"):
            frames, skipped = _from_bdd100k(section, categories, resolution, list(segmentation_classes or []))
        else:
            frames, skipped = _from_shards(section, categories, list(segmentation_classes or []))
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


def branch_input(items: list[dict], segmentation: torch.Tensor | None, spec, grid: int) -> torch.Tensor:
    """A layout branch's input for items with normalised `boxes` in the branch's category ids: (N, K, grid, grid)
    box maps, plus segmentation (N, grid, grid) train ids one-hot when the branch (`spec`) reads it -> (N, K_in,
    grid, grid) float32."""
    from drivedit.models.control import layout_input

    layout = layout_maps(items, len(spec.box_categories), grid)  # (N, K, grid, grid)
    if not spec.uses_segmentation:
        return layout
    return layout_input(layout, segmentation, len(spec.segmentation_classes))  # (N, K + S, grid, grid)


def layout_segmentation(items: list[dict], resolution: int, grid: int) -> tuple[torch.Tensor, list[np.ndarray | None]]:
    """The items' segmentation: ((N, grid, grid) train ids for the branch, per item its (res, res) mask or None)."""
    grids, masks = [], []
    for it in items:
        mask, cells = None, empty_segmentation(grid)
        if it.get("segmentation"):  # a BDD100K mask, through the image's crop
            try:
                mask = crop_segmentation(storage.read_bytes(it["segmentation"]), tuple(it["source_size"]),
                                         tuple(it["transform"]), resolution)
                cells = segmentation_to_grid(mask, grid)
            except (ValueError, OSError) as e:  # the image is still made, without a mask, and the reason logged
                log.warning("spec.layouts: item %d: mask %s left out: %s", it["index"], it["segmentation"], e)
                mask, cells = None, empty_segmentation(grid)
        elif it.get("segmentation_grid"):  # a shard's latent-grid segmentation
            cells = np.frombuffer(bytes.fromhex(it["segmentation_grid"]), np.uint8).reshape(grid, grid)
            f = resolution // grid
            mask = np.repeat(np.repeat(cells, f, axis=0), f, axis=1)  # (res, res): each cell's label
        grids.append(cells)
        masks.append(mask)
    return torch.from_numpy(np.stack(grids).astype(np.int64)), masks


def pixel_boxes(boxes: list[list[float]], categories: list[str], size: int) -> list[Box]:
    """Normalised boxes -> BDD100K boxes in the pixels of a (size, size) output image."""
    return [Box(categories[int(c)], round(x1 * size, 3), round(y1 * size, 3), round(x2 * size, 3),
                round(y2 * size, 3)) for c, x1, y1, x2, y2 in boxes]
