"""Condition transfer (`spec.transfer`): real labelled frames re-rendered into target scenarios with SDEdit.

    source frame ──decode_and_crop (the encode job's resize + center crop)──▶ (res, res) image + transform
                 ──codec.encode (mean)──▶ latent ──q_sample to t = s·T, denoise under the target──▶ image
    its boxes    ──place_boxes (the same transform)──▶ boxes in the output image's pixels
    its mask     ──crop_segmentation──▶ labels/sem_seg/masks/<shard>/<index>.png (BDD100K's layout)
                 (the manifest's `mask`; its boxes are the manifest's `labels`, its name `source_frame`)

Items are frame-major: frame f into target j is item f * len(targets) + j, seed base_seed + index,
so every generation rule (shards, resume, byte-identical reruns) holds unchanged. The plan carries each
item's source (image URI, boxes in source pixels, mask URI), so sampler actors read nothing but images.

Layout-guided transfer (`spec.transfer.layout_guidance`, a model with a layout branch): the denoising is
conditioned on the very boxes the output carries (placed as above, rasterised on the latent grid as
spec.layouts does; categories the branch does not know are left out of the layout but still labelled)
and, for a branch that reads segmentation, on the frame's cropped mask (none: "ignore everywhere"), with
guidance on the layout as spec.layouts (`generate/sampler.py`). Plain SDEdit rewrites the whole scene at
the strengths that change the scenario; the branch holds the objects where the labels say they are.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from drivedit import storage
from drivedit.data.bdd100k import SEGMENTATION_CLASSES, Box, LabelFileError, SourceFrames
from drivedit.data.encode_stages import decode_and_crop, read_image_bytes
from drivedit.data.layout import crop_segmentation, empty_segmentation, place_boxes, segmentation_to_grid
from drivedit.data.sources import read_source
from drivedit.generate.spec import ShardedItems, SpecError

MAX_LISTED = 10  # frames named in one problem line


# ----------------------------------------------------------------------------- reading and checking


def read_transfer_source(section) -> SourceFrames:
    """The transfer source's frames, read as the encode job reads that format. Raises LabelFileError."""
    return read_source(section.format, section.source, section.labels, section.images)


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def guidance_problems(section, branch_spec, model_version: str) -> list[str]:
    """Why `section.layout_guidance` cannot steer this model: it has no layout branch, or its branch reads
    segmentation over classes other than BDD100K's (the masks transfer crops from its sources)."""
    if section.layout_guidance is None:
        return []
    if branch_spec is None:
        return [f"spec.transfer.layout_guidance is {section.layout_guidance:g} but {model_version} has no layout "
                f"branch to steer with; leave spec.transfer.layout_guidance out (null) for plain SDEdit, or use a "
                f"bundle fine-tuned with layout.kind controlnet or light"]
    seg = list(branch_spec.segmentation_classes)
    if seg and seg != list(SEGMENTATION_CLASSES):
        return [f"spec.transfer.layout_guidance: the layout branch of {model_version} reads segmentation over "
                f"{len(seg)} classes that are not BDD100K's {len(SEGMENTATION_CLASSES)}, so a source frame's mask "
                f"cannot condition it; leave spec.transfer.layout_guidance out, or use a branch trained on "
                f"BDD100K's classes"]
    return []


def start_problems(section, sampler: str) -> list[str]:
    """Why `section.start` cannot run with the job's sampler: an inverted start is a point on DDIM's ODE, which
    DDPM's fresh noise at every step would not follow."""
    if section.start == "inversion" and sampler != "ddim":
        return [f"spec.transfer.start inversion needs sampler.sampler ddim, got {sampler}: DDPM draws fresh noise at "
                f"every step and forgets the inverted start; set sampler.sampler ddim, or spec.transfer.start noise"]
    return []


def transfer_problems(section, vocabulary: list[str], source: SourceFrames | None, read_error: str | None,
                      branch_spec=None, model_version: str = "the model") -> list[str]:
    """Every reason `section` cannot run against a model with `vocabulary` (and layout branch `branch_spec`, or
    None): strength, targets, layout guidance, the source."""
    problems = guidance_problems(section, branch_spec, model_version)
    s = section.strength
    if not (isinstance(s, (int, float)) and 0.0 < s <= 1.0):
        problems.append(f"spec.transfer.strength must lie in (0, 1] (the fraction of the noise schedule the source "
                        f"is noised to), got {s!r}")
    if not section.targets:
        problems.append("spec.transfer.targets is empty; name at least one scenario to transfer into")
    unknown = [t for t in section.targets if t not in vocabulary]
    if unknown:
        problems.append(f"spec.transfer.targets: unknown scenario{'s' * (len(unknown) > 1)} "
                        f"{', '.join(map(repr, unknown))}; the model's vocabulary is: {', '.join(vocabulary)}")
    if len(set(section.targets)) != len(section.targets):
        problems.append("spec.transfer.targets names a scenario twice")
    if read_error is not None:
        problems.append(f"spec.transfer.source: {read_error}")
        return problems
    frames = source.frames
    if not frames:
        problems.append(f"spec.transfer.source: {source.source} holds no frames")
    elif not any(f.boxes for f in frames):
        problems.append(f"spec.transfer.source: {source.source} has no box2d labels on any of its {len(frames)} "
                        f"frames; transfer carries a frame's labels over, so give a labelled dataset")
    elif section.layout_guidance is not None and branch_spec is not None:
        have = sorted({b.category for f in frames for b in f.boxes})
        if not set(have) & set(branch_spec.box_categories):
            problems.append(f"spec.transfer.layout_guidance: none of the source's box categories ({', '.join(have)}) "
                            f"is one the layout branch knows ({', '.join(branch_spec.box_categories)}), so it would "
                            f"steer with empty layouts; leave spec.transfer.layout_guidance out for plain SDEdit")
    broken = [f"{f.name} ({'; '.join(f.broken_boxes)})" for f in frames if f.broken_boxes]
    if broken:
        problems.append(f"spec.transfer.source: {len(broken)} frame(s) with unusable boxes: {_listed(broken)}; "
                        f"fix or remove them")
    if source.problems:
        problems.append(f"spec.transfer.source: {len(source.problems)} unresolved reference(s): "
                        f"{_listed([str(p.get('reason')) for p in source.problems])}")
    return problems


def source_records(section, source: SourceFrames) -> list[dict]:
    """One record per usable source frame (in label-file order, at most max_frames): what an actor needs."""
    records = []
    for f in source.frames:
        if not f.boxes:
            continue  # nothing to carry over: an unlabelled frame makes no labelled data
        records.append({"source": f.name, "source_uri": storage.join(source.images, f.name),
                        "segmentation": f.segmentation or "",
                        "boxes": [[b.category, b.x1, b.y1, b.x2, b.y2, b.attributes] for b in f.boxes]})
        if section.max_frames is not None and len(records) >= section.max_frames:
            break
    return records


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TransferPlan(ShardedItems):
    """The items of a transfer spec, with ItemPlan's interface: frame f into target j is item f * J + j."""

    records: list[dict]
    targets: list[str]  # in the spec's order
    scenarios: list[str]  # the targets in vocabulary order (as ItemPlan.scenarios)
    strength: float
    base_seed: int
    shard_size: int
    layout_guidance: float | None = None  # None: plain SDEdit
    branch: dict | None = None  # guided: what of the branch decides its input (box categories, segmentation)
    start: str = "noise"  # how the source latent reaches t = s * T (TransferSection.start)

    @property
    def num_items(self) -> int:
        return len(self.records) * len(self.targets)

    def item(self, i: int) -> dict:
        f, j = divmod(i, len(self.targets))
        return {"index": i, "seed": self.base_seed + i, "scenario": self.targets[j], "strength": self.strength,
                "start": self.start, **self.records[f]}

    def shard_items(self, shard: int) -> list[dict]:
        return [self.item(i) for i in self.shard_range(shard)]

    def counts(self) -> dict[str, int]:
        return {s: len(self.records) * self.targets.count(s) for s in self.scenarios}

    def document(self) -> dict:
        """What of the source decides the dataset: strength, targets, and a digest of the frames' labels."""
        digest = hashlib.sha256(json.dumps(self.records, sort_keys=True).encode()).hexdigest()
        document = {"strength": float(self.strength), "targets": self.targets, "num_frames": len(self.records),
                    "frames_sha256": digest}
        if self.layout_guidance is not None:  # only then: unguided datasets keep the hashes they had
            document.update(layout_guidance=float(self.layout_guidance), branch=self.branch)
        if self.start != "noise":  # likewise: noised datasets keep their hashes
            document["start"] = self.start
        return document


def plan_transfer(job, vocabulary: list[str], branch_spec=None, model_version: str = "the model"):
    """Read and check the source, then plan (`branch_spec`: the model's layout branch's LayoutSpec, or None).
    Raises SpecError listing every problem at once."""
    section = job.spec.transfer
    source, read_error = None, None
    try:
        source = read_transfer_source(section)
    except (LabelFileError, FileNotFoundError, ValueError) as e:
        read_error = str(e)
    problems = transfer_problems(section, vocabulary, source, read_error, branch_spec, model_version)
    problems += start_problems(section, job.sampler.sampler)
    if problems:
        raise SpecError(problems)
    guided = section.layout_guidance is not None
    branch = ({"box_categories": list(branch_spec.box_categories),
               "segmentation_classes": list(branch_spec.segmentation_classes)} if guided else None)
    return TransferPlan(records=source_records(section, source), targets=list(section.targets),
                        scenarios=[s for s in vocabulary if s in section.targets], strength=float(section.strength),
                        base_seed=job.spec.base_seed, shard_size=job.spec.shard_size,
                        layout_guidance=float(section.layout_guidance) if guided else None, branch=branch,
                        start=section.start)


# ----------------------------------------------------------------------------- on the sampler actor


def load_source(item: dict, resolution: int) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
    """A source frame as the model sees it -> ((res, res, 3) uint8, boxes in crop pixels, (res, res) mask or None).

    Boxes the crop cuts are clipped to it, boxes it removes entirely are dropped (as the encode job does).
    """
    data = read_image_bytes(item["source_uri"])
    image, transform, size = decode_and_crop(data, resolution, "crop")
    boxes = item["boxes"]
    placed, _, _ = place_boxes([[k, *b[1:5]] for k, b in enumerate(boxes)], transform, resolution)
    kept = [{"category": boxes[k][0], "attributes": boxes[k][5],
             "box2d": [v * resolution for v in xy]} for k, *xy in placed]  # crop pixels
    mask = None
    if item.get("segmentation"):
        mask = crop_segmentation(storage.read_bytes(item["segmentation"]), size, transform, resolution)
    return image, kept, mask


@torch.no_grad()
def encode_sources(codec, images: np.ndarray, device) -> torch.Tensor:
    """(N, res, res, 3) uint8 -> latents (N, C, h, w): the codec's posterior mean times its scale factor
    (the mean, not a draw: SDEdit's own noise is the only randomness, drawn from each item's seed)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)  # (N, 3, H, W)
    moments = codec.encode(x)  # (N, 2C, h, w)
    mean = moments.float().chunk(2, dim=1)[0]
    return mean * float(codec.scale_factor)


def source_layout(boxes: list[list[dict]], masks: list[np.ndarray | None], branch_spec, resolution: int,
                  grid: int) -> torch.Tensor:
    """A guided transfer's branch input -> (n, K_in, grid, grid) float32: per item, the boxes `load_source` kept
    (crop pixels of `resolution`, the labels the output carries; categories the branch does not know are left
    out) rasterised as spec.layouts does, and, for a branch that reads segmentation, its (res, res) mask on
    the latent grid (no mask: ignore everywhere, as training saw such frames)."""
    from drivedit.generate.layouts import branch_input

    ids = {name: k for k, name in enumerate(branch_spec.box_categories)}
    items = [{"boxes": [[ids[b["category"]], *(v / resolution for v in b["box2d"])]  # [0, 1] of the crop
                        for b in item_boxes if b["category"] in ids]} for item_boxes in boxes]
    cells = None
    if branch_spec.uses_segmentation:
        cells = torch.from_numpy(np.stack([segmentation_to_grid(m, grid) if m is not None else empty_segmentation(grid)
                                           for m in masks]).astype(np.int64))  # (n, grid, grid)
    return branch_input(items, cells, branch_spec, grid)


# ----------------------------------------------------------------------------- on the writer


def carried_boxes(boxes: list[dict], resolution: int, size: int) -> list[Box]:
    """A transferred item's boxes, in crop pixels of the model's resolution -> pixels of the written (size, size)
    image, with their source attributes."""
    f = size / resolution
    return [Box(b["category"], *(v * f for v in b["box2d"]), attributes=b["attributes"] or {}) for b in boxes]
