"""BDD100K-format folders as detection data: frames with boxes in the pixels of the resized image.

A folder holds `images/` and a label file read by `drivedit.data.bdd100k` (image labels, det_20 or
Scalabel). Categories go through the job's category map; boxes of other categories are dropped and
counted. Images are resized to `image_size` x `image_size` and their boxes scaled with them; a box
reaching outside the image is clipped to it, and one with nothing left inside is dropped, both
counted. A frame without boxes stays, as a negative. An image that cannot be decoded is skipped and
listed. Ignore regions (drivedit.detect.ignore_regions) come from a training dataset's boxes under its
`ignore_under` side (sqrt of the area, in resized pixels) and from boxes whose attributes say
`"ignore": true` (drivedit.detect.unlabelled and the generate job mark those; in a scored folder they are
COCO crowd regions), both counted; a dataset with
`learn_background` false has its whole frame as one (only its boxes teach). Each frame's scenario comes from its attributes through the scenario vocabulary (frames the
vocabulary drops still train and are scored; their scenario is `other`).
"""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from drivedit import storage
from drivedit.data.bdd100k import ScenarioVocabulary, is_ignore, load_label_file

OTHER_SCENARIO = "other"


@dataclass
class DetFrame:
    """One frame: where its image is and its boxes in the image's own pixels (x1, y1, x2, y2)."""

    name: str
    image_uri: str
    scenario: str
    boxes: np.ndarray  # (k, 4) float32, original pixels
    labels: np.ndarray  # (k,) int64, 1-based category ids
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (m, 4) original px
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (m,) their ids, 0: unknown
    ignore_under: float = 0.0  # boxes with a smaller side (resized pixels) are ignore regions, not targets
    learn_background: bool = True  # False: the whole frame but its boxes is an ignore region


class DetItem(NamedTuple):
    """One decoded training or validation frame, in the resized image's pixels."""

    image: np.ndarray  # (S, S, 3) uint8
    boxes: np.ndarray  # (k, 4) float32: what the detector learns to find
    labels: np.ndarray  # (k,) int64
    ignore: np.ndarray  # (m, 4) float32: regions it is neither taught to find nor to call background
    ignore_labels: np.ndarray  # (m,) int64: their category ids, 0 for any (scoring: COCO crowd of that category)


@dataclass
class LabelReport:
    """What reading a label file kept and dropped."""

    frames: int = 0
    boxes: int = 0
    negatives: int = 0  # frames without a box of a known category
    ignore_regions: int = 0  # boxes marked {"ignore": true}, read as ignore regions
    unknown_categories: Counter = field(default_factory=Counter)
    broken_boxes: int = 0
    scenarios: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"frames": self.frames, "boxes": self.boxes, "negatives": self.negatives,
                "ignore_regions": self.ignore_regions,
                "unknown_categories": dict(self.unknown_categories), "broken_boxes": self.broken_boxes,
                "scenarios": dict(self.scenarios)}


@dataclass
class BoxReport:
    """What fitting boxes into decoded images changed (counted as images are decoded)."""

    clipped: int = 0
    dropped_outside: int = 0
    ignored_small: int = 0  # boxes under their dataset's ignore_under, made ignore regions
    corrupt_images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"clipped_boxes": self.clipped, "dropped_outside_boxes": self.dropped_outside,
                "ignored_small_boxes": self.ignored_small, "corrupt_images": list(self.corrupt_images)}


def read_frames(uri: str, labels_file: str, categories: list[str], category_map: dict[str, str],
                scenarios: list[str]) -> tuple[list[DetFrame], LabelReport]:
    """Frames of one folder and what was dropped; boxes marked {"ignore": true} become the frame's ignore regions
    (with their category id, 0 when it is not one of `categories`): in training neither object nor background,
    in scoring COCO crowd regions. Raises LabelFileError for an unreadable label file."""
    index = {c: i + 1 for i, c in enumerate(categories)}
    vocab = ScenarioVocabulary(scenarios, night="night" if "night" in scenarios else None)
    report = LabelReport()
    frames = []
    for f in load_label_file(storage.join(uri, labels_file)):
        boxes, labels, ignore, ignore_labels = [], [], [], []
        for b in f.boxes:
            name = category_map.get(b.category, b.category)
            if is_ignore(b.attributes):
                ignore.append((b.x1, b.y1, b.x2, b.y2))
                ignore_labels.append(index.get(name, 0))
                continue
            if name not in index:
                report.unknown_categories[b.category] += 1
                continue
            boxes.append((b.x1, b.y1, b.x2, b.y2))
            labels.append(index[name])
        report.broken_boxes += len(f.broken_boxes)
        sid = vocab.scenario_of(f)
        scenario = OTHER_SCENARIO if sid is None else vocab.names[sid]
        report.frames += 1
        report.boxes += len(boxes)
        report.negatives += not boxes
        report.ignore_regions += len(ignore)
        report.scenarios[scenario] += 1
        frames.append(DetFrame(f.name, storage.join(uri, "images", f.name), scenario,
                               np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                               np.asarray(ignore, np.float32).reshape(-1, 4), np.asarray(ignore_labels, np.int64)))
    return frames, report


def fit_boxes(boxes: np.ndarray, labels: np.ndarray, width: int, height: int, size: int,
              report: BoxReport) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a width x height image -> boxes of its size x size resize, clipped to the image; boxes
    with less than a pixel inside are dropped. Both are counted in `report`."""
    clipped = boxes.copy()  # (k, 4)
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    changed = (clipped != boxes).any(axis=1)
    scaled = clipped * np.array([size / width, size / height] * 2, np.float32)
    keep = ((scaled[:, 2] - scaled[:, 0]) >= 1) & ((scaled[:, 3] - scaled[:, 1]) >= 1)
    report.clipped += int((changed & keep).sum())
    report.dropped_outside += int((~keep).sum())
    return scaled[keep], labels[keep]


def decode_image(uri: str, size: int) -> tuple[np.ndarray, int, int]:
    """(size, size, 3) uint8 RGB and the original width and height. Raises OSError/ValueError if corrupt."""
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        im.load()
        w, h = im.size
        arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    return arr, w, h


class FrameStore:
    """Decoded, resized frames with fitted boxes, decoded on first use and optionally kept."""

    def __init__(self, frames: list[DetFrame], size: int, cache: bool = True):
        self.frames, self.size, self.cache = frames, size, cache
        self.report = BoxReport()
        self._cache: dict[int, tuple] = {}
        self.corrupt: set[int] = set()

    def get(self, i: int) -> DetItem | None:
        """The frame decoded, resized, its boxes fitted and split into targets and ignore regions; None for a
        corrupt image (listed)."""
        if i in self._cache:
            return self._cache[i]
        if i in self.corrupt:
            return None
        f = self.frames[i]
        try:
            img, w, h = decode_image(f.image_uri, self.size)
        except (OSError, ValueError, SyntaxError) as e:
            self.corrupt.add(i)
            self.report.corrupt_images.append(f"{f.image_uri}: {type(e).__name__}: {e}"[:300])
            return None
        boxes, labels = fit_boxes(f.boxes, f.labels, w, h, self.size, self.report)
        side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))  # (k,)
        small = side < f.ignore_under
        self.report.ignored_small += int(small.sum())
        marked, marked_labels = fit_boxes(f.ignore_boxes, f.ignore_labels, w, h, self.size, BoxReport())
        ignore, ignore_labels = [boxes[small], marked], [labels[small], marked_labels]
        if not f.learn_background:  # a region past every edge: no anchor of the frame is background, targets stay
            ignore.append(np.array([[-self.size, -self.size, 2 * self.size, 2 * self.size]], np.float32))
            ignore_labels.append(np.zeros(1, np.int64))
        item = DetItem(img, boxes[~small], labels[~small], np.concatenate(ignore), np.concatenate(ignore_labels))
        if self.cache:
            self._cache[i] = item
        return item


def to_batch(items: list[DetItem], flips: np.ndarray | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Images (n, 3, S, S) float in [0, 1] and torchvision targets (with `ignore_boxes`); `flips[i]` mirrors
    item i, its boxes and its ignore regions."""
    from drivedit.detect.ignore_regions import IGNORE_KEY

    images, targets = [], []
    for i, (img, boxes, labels, ignore, _) in enumerate(items):
        boxes, ignore = boxes.copy(), ignore.copy()
        if flips is not None and flips[i]:
            img = img[:, ::-1]
            s = img.shape[1]
            for b in (boxes, ignore):
                b[:, [0, 2]] = s - b[:, [2, 0]]  # x1' = S - x2, x2' = S - x1
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))  # (3, S, S) uint8
        targets.append({"boxes": torch.from_numpy(boxes).float().reshape(-1, 4),
                        "labels": torch.from_numpy(labels).long(),
                        IGNORE_KEY: torch.from_numpy(ignore).float().reshape(-1, 4)})
    return torch.stack(images).float() / 255.0, targets


class WeightedMix:
    """Draws frame indices over several datasets: dataset d gets weight_d / sum(weights) of the draws,
    uniformly over its frames; corrupt frames are taken out of the draw as they are found."""

    def __init__(self, sizes: list[int], weights: list[float]):
        probs = [np.full(n, w / n / sum(weights)) for n, w in zip(sizes, weights) if n]
        self.probs = np.concatenate(probs) if probs else np.zeros(0)

    def remove(self, index: int) -> None:
        self.probs[index] = 0.0

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        total = self.probs.sum()
        if total <= 0:
            raise RuntimeError("no training frame left to draw: every image is corrupt")
        return rng.choice(len(self.probs), size=n, p=self.probs / total)


class FixedCountMix:
    """Draws a fixed number of frames from every dataset per step, each dataset from its own random stream
    (the caller's), so adding a dataset changes nothing of what the others give: the downstream experiment's
    real-only and real + synthetic arms see the same real frames at every step. Corrupt frames are taken
    out of their dataset's draw as they are found."""

    def __init__(self, sizes: list[int], counts: list[int]):
        self.counts = list(counts)
        self.offsets = np.cumsum([0, *sizes])  # dataset d owns global indices offsets[d]:offsets[d + 1]
        self.alive = [np.ones(n, bool) for n in sizes]

    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right") - 1)

    def remove(self, index: int) -> None:
        d = self.source_of(index)
        self.alive[d][index - self.offsets[d]] = False

    def draw_from(self, d: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """n global frame indices of dataset d, uniformly over its frames still alive."""
        alive = np.flatnonzero(self.alive[d])
        if not alive.size:
            raise RuntimeError(f"no training frame left to draw in dataset {d}: every image is corrupt")
        return self.offsets[d] + alive[rng.integers(alive.size, size=n)]
