"""BDD100K labels -> frames (weather, time of day, boxes), and the scenario vocabulary.

Two label layouts are read, both a JSON list of frames:
- the image-label file (`bdd100k_labels_images_*.json`): `labels[]` mixes `box2d` objects with
  `poly2d` lanes / drivable areas, which carry no box and are ignored here;
- the det_20 file (`det_20/det_*.json`): only `box2d` labels, and a frame with no objects may have
  no `labels` key at all (or `null`).
A Scalabel export (`{"frames": [...]}`) is accepted too. A frame without box labels keeps its
attributes. A box that cannot be a box (missing or non-numeric corners, x2 <= x1, NaN) does not
fail the file: it is kept in `Frame.broken_boxes` so the encode job can skip and list the frame.

Semantic segmentation is BDD100K's `labels/sem_seg/masks/<image stem>.png`: one uint8 train id per
pixel (the 19 classes of `SEGMENTATION_CLASSES`, 255 = ignore), the size of its image.
`read_bdd100k(root)` is the one function that reads a BDD100K-format folder (labels, image URIs,
masks where they exist): the encode job and the detection job both call it.
"""
from __future__ import annotations

import json
import math
import io
import posixpath
from dataclasses import dataclass, field

import numpy as np

from drivedit import storage
from drivedit.config.common import DEFAULT_SCENARIOS

DROPPED_WEATHERS = ("undefined", "foggy")
# the older image-label names of the same objects, mapped onto det_20's names
CATEGORY_ALIASES = {"person": "pedestrian", "bike": "bicycle", "motor": "motorcycle"}
# BDD100K's (and Cityscapes') 19 semantic segmentation classes; the train id is the position
SEGMENTATION_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                        "motorcycle", "bicycle")
SEGMENTATION_IGNORE = 255
# drivedit's box attribute for an ignore region: a box whose attributes say {"ignore": true} is neither an
# object to find nor background (the detect job's training and scoring, the COCO export's iscrowd)
IGNORE_ATTRIBUTE = "ignore"


def is_ignore(attributes: dict | None) -> bool:
    """Whether a label's attributes make it an ignore region."""
    return bool(attributes) and attributes.get(IGNORE_ATTRIBUTE) is True
SEGMENTATION_DIR = "labels/sem_seg/masks"


@dataclass
class Box:
    """One object box in image pixels (x right, y down), BDD100K's `box2d`."""

    category: str
    x1: float
    y1: float
    x2: float
    y2: float
    attributes: dict = field(default_factory=dict)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1


@dataclass
class Frame:
    """One labelled image: its file name (relative to the images folder), attributes and boxes."""

    name: str
    weather: str = "undefined"
    timeofday: str = "undefined"
    scene: str = "undefined"
    boxes: list[Box] = field(default_factory=list)
    broken_boxes: list[str] = field(default_factory=list)  # why each unusable box was unusable
    segmentation: str | None = None  # URI of its semantic segmentation mask, when the dataset has one

    def add_box(self, box: Box | None, problem: str | None) -> None:
        """Keep what a reader parsed: a box, or why a label could not be one (None, None: not a box label)."""
        if box is not None:
            self.boxes.append(box)
        elif problem is not None:
            self.broken_boxes.append(problem)


class LabelFileError(ValueError):
    """A label file that cannot be read as BDD100K frames; the message names the file and the frame."""


def box_from_corners(category: str, corners, label: str, attributes: dict | None = None
                     ) -> tuple[Box | None, str | None]:
    """(Box, None) when `corners` (x1, y1, x2, y2) make a box; (None, why) when they cannot (not four numbers,
    a non-finite corner, empty or inverted). `label` names the box in the reason. Every reader checks its
    boxes here."""
    try:
        x1, y1, x2, y2 = (float(v) for v in corners)
    except (TypeError, ValueError):
        return None, f"{label}: needs four numeric corners x1, y1, x2, y2, got {corners!r}"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, f"{label}: a non-finite corner ({x1}, {y1}, {x2}, {y2})"
    if x2 <= x1 or y2 <= y1:
        return None, f"{label}: empty or inverted box ({x1:g}, {y1:g}, {x2:g}, {y2:g})"
    return Box(category, x1, y1, x2, y2, dict(attributes or {})), None


def _parse_box(label: dict) -> tuple[Box | None, str | None]:
    """(box, None) for a usable box2d; (None, reason) for a broken one; (None, None) for no box2d."""
    b = label.get("box2d")
    category = str(label.get("category", ""))
    if b is None:
        return None, None
    name = f"{category or 'label'} {label.get('id', '?')}"
    if not isinstance(b, dict):
        return None, f"{name}: box2d is not an object"
    attrs = label.get("attributes") or {}
    return box_from_corners(category, [b.get(k) for k in ("x1", "y1", "x2", "y2")], f"{name} box2d",
                            attrs if isinstance(attrs, dict) else {})


def parse_frames(data, source: str = "(labels)") -> list[Frame]:
    """Frames from already-parsed JSON. Raises LabelFileError naming `source` and the offending frame."""
    if isinstance(data, dict) and isinstance(data.get("frames"), list):
        data = data["frames"]
    if not isinstance(data, list):
        raise LabelFileError(f"{source}: expected a JSON list of frames (BDD100K image labels or det_20), "
                             f"got {type(data).__name__}")
    frames = []
    for i, item in enumerate(data):
        where = f"{source}: frame #{i}"
        if not isinstance(item, dict):
            raise LabelFileError(f"{where} is {type(item).__name__}, not an object with name/attributes/labels")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise LabelFileError(f"{where} has no 'name' (the image file name): {json.dumps(item)[:200]}")
        where = f"{source}: frame #{i} ({name})"
        attrs = item.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise LabelFileError(f"{where}: 'attributes' must be an object, got {type(attrs).__name__}")
        labels = item.get("labels") or []
        if not isinstance(labels, list):
            raise LabelFileError(f"{where}: 'labels' must be a list, got {type(labels).__name__}")
        frame = Frame(name=name, weather=str(attrs.get("weather") or "undefined"),
                      timeofday=str(attrs.get("timeofday") or "undefined"),
                      scene=str(attrs.get("scene") or "undefined"))
        for label in labels:
            if not isinstance(label, dict):
                frame.broken_boxes.append(f"label is {type(label).__name__}, not an object")
                continue
            frame.add_box(*_parse_box(label))
        frames.append(frame)
    return frames


def load_label_file(uri: str) -> list[Frame]:
    """Read a BDD100K label JSON (image labels, det_20 or a Scalabel export) from a path or s3:// URI."""
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise LabelFileError(f"label file not found: {uri}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelFileError(f"{uri}: not valid JSON ({e})") from None
    return parse_frames(data, uri)


def frame_to_json(frame: Frame) -> dict:
    """A frame in the BDD100K image-label format."""
    labels = []
    for i, b in enumerate(frame.boxes):
        labels.append({"id": str(i), "category": b.category, "attributes": dict(b.attributes),
                       "box2d": {"x1": round(b.x1, 3), "y1": round(b.y1, 3),
                                 "x2": round(b.x2, 3), "y2": round(b.y2, 3)}})
    return {"name": frame.name,
            "attributes": {"weather": frame.weather, "timeofday": frame.timeofday, "scene": frame.scene},
            "timestamp": 10000, "labels": labels}


def write_label_file(frames: list[Frame], uri: str) -> None:
    """Write frames as a BDD100K label JSON, atomically."""
    storage.write_text_atomic(uri, json.dumps([frame_to_json(f) for f in frames], indent=1))


def segmentation_name(image_name: str) -> str:
    """The mask file of an image: `a/b.jpg` -> `a/b.png` (BDD100K names masks by the image's stem)."""
    return posixpath.splitext(image_name)[0] + ".png"


def load_segmentation(uri: str) -> np.ndarray:
    """A semantic segmentation mask -> (H, W) uint8 train ids. Raises ValueError naming the file when it is
    not a single-channel image of train ids (0..18, 255 = ignore)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(storage.read_bytes(uri)))
        img.load()
    except FileNotFoundError:
        raise ValueError(f"segmentation mask not found: {uri}") from None
    except Exception as e:  # PIL raises many types for broken files
        raise ValueError(f"segmentation mask {uri} is not a readable image ({type(e).__name__}: {e})") from None
    if img.mode not in ("L", "P"):
        raise ValueError(f"segmentation mask {uri} has mode {img.mode}; BDD100K masks are single-channel uint8 "
                         "train ids (mode L)")
    ids = np.asarray(img, np.uint8)
    bad = np.setdiff1d(np.unique(ids), np.r_[np.arange(len(SEGMENTATION_CLASSES)), SEGMENTATION_IGNORE])
    if len(bad):
        raise ValueError(f"segmentation mask {uri} holds values {bad[:8].tolist()} that are not train ids "
                         f"0..{len(SEGMENTATION_CLASSES) - 1} or {SEGMENTATION_IGNORE} (ignore)")
    return ids


@dataclass
class SourceFrames:
    """What a dataset reader returns: frames whose `name` is relative to `images`, the segmentation classes
    when the dataset has masks, and every reference that could not be resolved (each a dict with a
    `reason`, and `frame_id` / `source_uri` where there is a frame)."""

    frames: list[Frame]
    images: str
    segmentation_classes: list[str] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    source: str = ""  # what was read, for messages


def read_bdd100k(root: str, labels: str | None = None, images: str | None = None,
                 masks: str | None = None) -> SourceFrames:
    """A BDD100K-format folder (local or s3://): `labels` (default <root>/labels.json), images under `images`
    (default <root>/images), semantic segmentation masks under `masks` (default <root>/labels/sem_seg/masks)
    attached to the frames that have one (`Frame.segmentation`). The masks folder is listed once, so a
    frame without a mask costs nothing. Raises LabelFileError for an unreadable label file."""
    labels = labels or storage.join(root, "labels.json")
    images = images or storage.join(root, "images")
    masks = masks or storage.join(root, SEGMENTATION_DIR)
    frames = load_label_file(labels)
    have = set()
    if storage.exists(masks) and storage.is_dir(masks):
        prefix = masks.rstrip("/") + "/"
        have = {f[len(prefix):] for f in storage.list_files(masks, suffixes=[".png"]) if f.startswith(prefix)}
    for f in frames:
        name = segmentation_name(f.name)
        if name in have:
            f.segmentation = storage.join(masks, name)
    return SourceFrames(frames, images, list(SEGMENTATION_CLASSES) if have else [], [], labels)


class ScenarioVocabulary:
    """An ordered list of scenario names and the rule that maps a frame to one of them.

    The default rule (DESIGN.md): `timeofday == night` gives the night scenario whatever the
    weather; otherwise the weather names the scenario; weathers in `drop` (undefined, foggy) are
    dropped, as are weathers the vocabulary does not name. Ids are positions in `names`.
    """

    def __init__(self, names: list[str] | None = None, night: str | None = "night",
                 drop: tuple[str, ...] | list[str] = DROPPED_WEATHERS):
        names = list(DEFAULT_SCENARIOS if names is None else names)
        if not names:
            raise ValueError("a scenario vocabulary needs at least one name")
        if len(set(names)) != len(names):
            raise ValueError(f"scenario names must be unique, got {names}")
        if night is not None and night not in names:
            raise ValueError(f"night scenario {night!r} is not in the vocabulary {names}; add it or set night to None")
        self.names = names
        self.night = night
        self.drop = tuple(drop)
        self.index = {n: i for i, n in enumerate(names)}

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ScenarioVocabulary({self.names}, night={self.night!r}, drop={list(self.drop)})"

    def classify(self, frame: Frame) -> tuple[int | None, str | None]:
        """(scenario id, None) for a kept frame, (None, reason) for a dropped one."""
        if self.night is not None and frame.timeofday == "night":
            return self.index[self.night], None
        if frame.weather in self.drop:
            return None, f"weather {frame.weather}"
        if frame.weather not in self.index:
            return None, f"weather {frame.weather} (not in the vocabulary)"
        return self.index[frame.weather], None

    def scenario_of(self, frame: Frame) -> int | None:
        """The frame's scenario id, or None when the rules drop it."""
        return self.classify(frame)[0]

    def split(self, frames: list[Frame]) -> tuple[list[tuple[Frame, int]], dict[str, int]]:
        """Kept (frame, id) pairs in input order, and the dropped count per reason."""
        kept, dropped = [], {}
        for f in frames:
            sid, reason = self.classify(f)
            if sid is None:
                dropped[reason] = dropped.get(reason, 0) + 1
            else:
                kept.append((f, sid))
        return kept, dropped

    def to_json(self) -> dict:
        return {"names": self.names, "night": self.night, "drop": list(self.drop)}
