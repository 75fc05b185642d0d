"""BDD100K labels -> frames (weather, time of day, boxes), and the scenario vocabulary.

Two label layouts are read, both a JSON list of frames:
- the image-label file (`bdd100k_labels_images_*.json`): `labels[]` mixes `box2d` objects with
  `poly2d` lanes / drivable areas, which carry no box and are ignored here;
- the det_20 file (`det_20/det_*.json`): only `box2d` labels, and a frame with no objects may have
  no `labels` key at all (or `null`).
A Scalabel export (`{"frames": [...]}`) is accepted too. A frame without box labels keeps its
attributes. A box that cannot be a box (missing or non-numeric corners, x2 <= x1, NaN) does not
fail the file: it is kept in `Frame.broken_boxes` so the encode job can skip and list the frame.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from drivedit import storage
from drivedit.config.common import DEFAULT_SCENARIOS

DROPPED_WEATHERS = ("undefined", "foggy")


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


class LabelFileError(ValueError):
    """A label file that cannot be read as BDD100K frames; the message names the file and the frame."""


def _parse_box(label: dict) -> tuple[Box | None, str | None]:
    """(box, None) for a usable box2d; (None, reason) for a broken one; (None, None) for no box2d."""
    b = label.get("box2d")
    category = str(label.get("category", ""))
    if b is None:
        return None, None
    if not isinstance(b, dict):
        return None, f"{category or 'label'} {label.get('id', '?')}: box2d is not an object"
    try:
        x1, y1, x2, y2 = (float(b[k]) for k in ("x1", "y1", "x2", "y2"))
    except (KeyError, TypeError, ValueError):
        return None, f"{category or 'label'} {label.get('id', '?')}: box2d needs numeric x1, y1, x2, y2"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, f"{category} {label.get('id', '?')}: box2d has a non-finite corner"
    if x2 <= x1 or y2 <= y1:
        return None, f"{category} {label.get('id', '?')}: empty or inverted box2d ({x1}, {y1}, {x2}, {y2})"
    attrs = label.get("attributes") or {}
    return Box(category, x1, y1, x2, y2, dict(attrs) if isinstance(attrs, dict) else {}), None


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
            box, problem = _parse_box(label)
            if box is not None:
                frame.boxes.append(box)
            elif problem is not None:
                frame.broken_boxes.append(problem)
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
