"""COCO JSON and YOLO labels from BDD100K frames: the same boxes in the formats detection tools read.

A BDD100K-format folder (`labels.json` + images under `images/`: a generated dataset, `drivedit
scenes` output, a BDD100K release) gets, beside its `labels.json`:

- `coco.json`: a COCO detection file. `images[].file_name` is relative to `images/` (COCO's image
  prefix), each image keeps its `weather` / `timeofday` / `scene`; `annotations[].bbox` is
  [x, y, w, h] in pixels; category ids start at 1, in the category vocabulary's order.
- `labels/<path>.txt` for every `images/<path>.<ext>` (the path ultralytics derives by replacing
  `/images/` with `/labels/`): one `class cx cy w h` line per box, normalised to [0, 1], class ids
  from 0 in the same order; a frame without boxes gets an empty file (a background image).
- `dataset.yaml`: the ultralytics dataset file (`path`, `train`, `val`, `names`).

Boxes are clipped to the image; a box with nothing left inside it, and a box whose category is not in
the vocabulary, is left out and counted. A box whose attributes say `"ignore": true` (an ignore region:
generate/undrawable.py, `drivedit mark-unlabelled`) is COCO's `iscrowd: 1`; YOLO has no ignore label, so
it is left out of the YOLO files and counted. The default vocabulary is BDD100K's det_20 ten categories
followed by any other category the frames use (sorted), so the ids of the common classes are the same
for every dataset converted.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from dataclasses import dataclass, field

import yaml

from drivedit import storage
from drivedit.data.bdd100k import Box, Frame, is_ignore, load_label_file

FORMATS = ("coco", "yolo")
LABELS_FILE = "labels.json"
COCO_FILE = "coco.json"
YOLO_LABELS_DIR = "labels"
YOLO_DATASET_FILE = "dataset.yaml"
IMAGES_DIR = "images"
DET20_CATEGORIES = ("pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
                    "traffic light", "traffic sign")
_YOLO_DIGITS = 6  # normalised coordinates: 1e-6 of a 4096 px image is well under a pixel


@dataclass
class ConversionReport:
    """What a conversion wrote and what it left out."""

    written: dict[str, str] = field(default_factory=dict)  # format -> file or folder
    categories: list[str] = field(default_factory=list)
    frames: int = 0
    boxes: int = 0
    skipped_boxes: dict[str, int] = field(default_factory=dict)  # reason -> count
    missing_images: list[str] = field(default_factory=list)  # frame names with no image file

    def to_dict(self) -> dict:
        return {"written": self.written, "categories": self.categories, "frames": self.frames,
                "boxes": self.boxes, "skipped_boxes": self.skipped_boxes,
                "missing_images": len(self.missing_images), "missing_examples": self.missing_images[:5]}


def category_vocabulary(frames: list[Frame], categories: list[str] | None = None) -> list[str]:
    """The ordered category names: `categories` when given, else det_20's ten then the frames' others."""
    if categories is not None:
        if not categories or len(set(categories)) != len(categories):
            raise ValueError(f"categories must be a non-empty list of unique names, got {categories}")
        return list(categories)
    seen = {b.category for f in frames for b in f.boxes}
    return list(DET20_CATEGORIES) + sorted(seen - set(DET20_CATEGORIES))


def clip_box(box: Box, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The box's corners clipped to the image, or None when nothing of it is inside."""
    x1, y1 = min(max(box.x1, 0.0), width), min(max(box.y1, 0.0), height)
    x2, y2 = min(max(box.x2, 0.0), width), min(max(box.y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def _kept_boxes(frame: Frame, size: tuple[int, int], index: dict[str, int], report: ConversionReport,
                keep_ignore: bool = True):
    """(category id from 0, x1, y1, x2, y2, is an ignore region) of each usable box of `frame`, counting the
    others; `keep_ignore` False leaves the ignore regions out (a format that cannot say "ignore")."""
    out = []
    for box in frame.boxes:
        ignore = is_ignore(box.attributes)
        if box.category not in index:
            reason = f"category {box.category!r} not in the vocabulary"
        elif ignore and not keep_ignore:
            reason = "ignore region (the format has no way to say ignore)"
        else:
            corners = clip_box(box, *size)
            if corners is not None:
                out.append((index[box.category], *corners, ignore))
                continue
            reason = "outside the image"
        report.skipped_boxes[reason] = report.skipped_boxes.get(reason, 0) + 1
    return out


def coco_document(frames: list[Frame], sizes: list[tuple[int, int]], categories: list[str],
                  report: ConversionReport | None = None) -> dict:
    """A COCO detection dict of `frames` (each with its image's (width, height))."""
    report = report if report is not None else ConversionReport()
    index = {c: i for i, c in enumerate(categories)}
    images, annotations = [], []
    for image_id, (frame, (w, h)) in enumerate(zip(frames, sizes), start=1):
        images.append({"id": image_id, "file_name": frame.name.lstrip("/"), "width": int(w), "height": int(h),
                       "weather": frame.weather, "timeofday": frame.timeofday, "scene": frame.scene})
        for cid, x1, y1, x2, y2, ignore in _kept_boxes(frame, (w, h), index, report):
            bw, bh = x2 - x1, y2 - y1  # an ignore region is COCO's iscrowd: detections on it count neither way
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cid + 1,
                                "bbox": [round(x1, 3), round(y1, 3), round(bw, 3), round(bh, 3)],
                                "area": round(bw * bh, 3), "iscrowd": int(ignore)})
    return {"info": {"description": "converted from BDD100K labels by drivedit"},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(categories)]}


def yolo_lines(frame: Frame, size: tuple[int, int], categories: list[str],
               report: ConversionReport | None = None) -> list[str]:
    """`class cx cy w h` lines (normalised to the image) for the frame's boxes."""
    report = report if report is not None else ConversionReport()
    w, h = size
    lines = []
    for cid, x1, y1, x2, y2, _ in _kept_boxes(frame, size, {c: i for i, c in enumerate(categories)}, report,
                                              keep_ignore=False):
        cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
        lines.append(f"{cid} " + " ".join(f"{v:.{_YOLO_DIGITS}f}" for v in (cx, cy, bw, bh)))
    return lines


def yolo_label_path(image_rel: str) -> str:
    """`images/a/b.png` -> `labels/a/b.txt` (what ultralytics' img2label_paths computes)."""
    if not image_rel.startswith(IMAGES_DIR + "/"):
        raise ValueError(f"image {image_rel!r} is not under {IMAGES_DIR}/; YOLO tools find labels by replacing "
                         f"/{IMAGES_DIR}/ with /{YOLO_LABELS_DIR}/ in the image path, so move the images there")
    stem = image_rel[len(IMAGES_DIR) + 1:].rsplit(".", 1)[0]
    return f"{YOLO_LABELS_DIR}/{stem}.txt"


def yolo_dataset_yaml(root: str, categories: list[str]) -> str:
    """The ultralytics dataset file: every image is both train and val (split it as you need)."""
    doc = {"path": root, "train": IMAGES_DIR, "val": IMAGES_DIR, "names": dict(enumerate(categories))}
    return "# written by drivedit from labels.json\n" + yaml.safe_dump(doc, sort_keys=False)


def write_formats(root: str, frames: list[Frame], sizes: list[tuple[int, int]], formats: list[str] | tuple[str, ...],
                  categories: list[str] | None = None, image_paths: list[str] | None = None) -> ConversionReport:
    """Write the `formats` of `frames` under `root`; every file atomically, `coco.json` and `dataset.yaml` last.

    image_paths: each frame's image path relative to `root` (default `images/<name>`).
    """
    bad = sorted(set(formats) - set(FORMATS))
    if bad:
        raise ValueError(f"unknown label format(s) {bad}; choose from {', '.join(FORMATS)}")
    if len(sizes) != len(frames):
        raise ValueError(f"{len(sizes)} image sizes for {len(frames)} frames")
    root = str(root).rstrip("/")
    image_paths = image_paths or [f"{IMAGES_DIR}/{f.name.lstrip('/')}" for f in frames]
    report = ConversionReport(categories=category_vocabulary(frames, categories), frames=len(frames))
    vocab = report.categories
    if "yolo" in formats:
        label_paths = [yolo_label_path(rel) for rel in image_paths]  # every path checked before anything is written
        yolo_report = ConversionReport()
        for frame, size, label in zip(frames, sizes, label_paths):
            lines = yolo_lines(frame, size, vocab, yolo_report)
            storage.write_text_atomic(storage.join(root, label), "".join(f"{ln}\n" for ln in lines))
        storage.write_text_atomic(storage.join(root, YOLO_DATASET_FILE), yolo_dataset_yaml(root, vocab))
        report.written["yolo"] = storage.join(root, YOLO_DATASET_FILE)
    count_report = ConversionReport()
    doc = coco_document(frames, sizes, vocab, count_report)
    report.boxes, report.skipped_boxes = len(doc["annotations"]), dict(count_report.skipped_boxes)
    if "yolo" in formats:  # what only YOLO left out (its ignore regions), named as such
        for reason, n in yolo_report.skipped_boxes.items():
            if reason not in report.skipped_boxes:
                report.skipped_boxes[f"yolo: {reason}"] = n
    if "coco" in formats:
        storage.write_text_atomic(storage.join(root, COCO_FILE), json.dumps(doc))
        report.written["coco"] = storage.join(root, COCO_FILE)
    return report


def image_size(uri: str) -> tuple[int, int]:
    """(width, height) from the image header."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read the size of image {uri} ({err}); remove or replace the file") from err


def convert_folder(root: str, formats: list[str] | tuple[str, ...],
                   categories: list[str] | None = None) -> ConversionReport:
    """Convert a BDD100K-format folder's `labels.json` to `formats` beside it.

    Frames whose image is missing are left out and listed; an unreadable image is an error naming it.
    """
    from drivedit.eval.folders import list_images, match_names, relative_to_root

    root = str(root).rstrip("/")
    labels_uri = storage.join(root, LABELS_FILE)
    if not storage.exists(labels_uri):
        raise FileNotFoundError(f"{root} has no {LABELS_FILE}; convert reads a BDD100K-format folder "
                                f"(labels.json + images/)")
    frames = load_label_file(labels_uri)
    uris, ambiguous = match_names(root, list_images(root), [f.name for f in frames])
    if ambiguous:
        raise ValueError(f"{labels_uri}: {len(ambiguous)} label names match several image files "
                         f"(e.g. {ambiguous[0]!r}); write names as paths relative to images/")
    kept = [(f, u) for f, u in zip(frames, uris) if u is not None]
    missing = [f.name for f, u in zip(frames, uris) if u is None]
    if not kept:
        raise ValueError(f"{labels_uri}: none of its {len(frames)} frames matches an image under {root}")
    rel = [relative_to_root(u, root) for _, u in kept]
    # COCO's file_name is relative to images/: the matched file's path, whatever the label name said
    named = [dataclasses.replace(f, name=r[len(IMAGES_DIR) + 1:] if r.startswith(IMAGES_DIR + "/") else r)
             for (f, _), r in zip(kept, rel)]
    report = write_formats(root, named, [image_size(u) for _, u in kept], formats, categories, rel)
    report.missing_images = missing
    return report


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="drivedit convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a BDD100K-format folder (labels.json + images/), local or s3://")
    ap.add_argument("--to", nargs="+", choices=FORMATS, required=True, metavar="FORMAT",
                    help=f"formats to write beside labels.json: {', '.join(FORMATS)}")
    ap.add_argument("--categories", help="comma-separated category vocabulary in id order (default: BDD100K "
                                         "det_20's ten, then any others the labels use); other boxes are left out")
    args = ap.parse_args(argv)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    try:
        report = convert_folder(args.folder, args.to, categories)
    except (ValueError, FileNotFoundError) as err:
        print(f"drivedit convert: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2))
    return 0
