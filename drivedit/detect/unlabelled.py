"""Mark what a generated frame shows but its labels do not, so a detector trained on it is not taught that
those things are background.

A generator that draws whole scenes puts vehicles where the layout asked for none. Each such object is a
false negative in the frame's labels: trained on it, a detector learns to call vehicles background (on the
demo data its recall on real frames drops; BENCHMARKS.md). A detector trained on real frames alone sees
those objects: its confident detections that overlap no label are written back as boxes with attributes
`{"ignore": true, "marked_by": ..., "score": ...}`, which the detect job reads as ignore regions, into a
new label file beside the dataset's own (its `data.train[].labels_file`). Nothing of the dataset is changed.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchvision.ops import box_iou

from drivedit import storage
from drivedit.data.bdd100k import IGNORE_ATTRIBUTE, Box, ScenarioVocabulary, load_label_file, write_label_file
from drivedit.detect.dataset import DetItem, OTHER_SCENARIO, decode_image, to_batch


@torch.no_grad()
def mark_unlabelled(detector, spec: dict, uri: str, labels_file: str = "labels.json",
                    out_file: str = "labels-marked.json", score: float = 0.5, max_iou: float = 0.3,
                    marked_by: str = "", batch_size: int = 16, device: str = "cpu") -> dict:
    """Write `out_file` in the folder `uri`: its `labels_file` plus, per frame, the detector's detections scoring at
    least `score` whose IoU with every labelled box (any category) is under `max_iou`, as ignore boxes. Returns
    counts: frames, marked boxes, frames with any, corrupt images (left unmarked and listed)."""
    from drivedit.detect.detector import run_detector

    size = spec["image_size"]
    vocab = ScenarioVocabulary()
    frames = list(load_label_file(storage.join(uri, labels_file)))
    empty = np.zeros((0, 4), np.float32)
    was_training = detector.training
    detector.eval().to(device)
    marked, corrupt = [0] * len(frames), []
    for start in range(0, len(frames), batch_size):
        chunk, images, sizes = [], [], []
        for i in range(start, min(start + batch_size, len(frames))):
            try:
                img, w, h = decode_image(storage.join(uri, "images", frames[i].name), size)
            except (OSError, ValueError, SyntaxError) as e:
                corrupt.append(f"{frames[i].name}: {type(e).__name__}: {e}"[:300])
                continue
            chunk.append(i)
            images.append(DetItem(img, empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64)))
            sizes.append((w, h))
        if not chunk:
            continue
        x, _ = to_batch(images)  # (n, 3, S, S)
        scenarios = [vocab.names[s] if (s := vocab.scenario_of(frames[i])) is not None else OTHER_SCENARIO
                     for i in chunk]
        for i, (w, h), det in zip(chunk, sizes, run_detector(detector, spec, x.to(device), scenarios)):
            keep = det["scores"] >= score
            boxes = det["boxes"][keep].float().cpu() * torch.tensor([w / size, h / size] * 2)  # (k, 4) original px
            scores, labels = det["scores"][keep].float().cpu(), det["labels"][keep].cpu()
            f = frames[i]
            if f.boxes:
                labelled = torch.tensor([[b.x1, b.y1, b.x2, b.y2] for b in f.boxes])  # (m, 4)
                new = box_iou(boxes, labelled).amax(dim=1) < max_iou if len(boxes) else torch.zeros(0, dtype=bool)
            else:
                new = torch.ones(len(boxes), dtype=torch.bool)
            extra = [Box(spec["categories"][int(c) - 1], *map(float, b),
                         attributes={IGNORE_ATTRIBUTE: True, "marked_by": marked_by, "score": round(float(s), 3)})
                     for b, s, c in zip(boxes[new], scores[new], labels[new])]
            frames[i] = dataclasses.replace(f, boxes=[*f.boxes, *extra])
            marked[i] = len(extra)
    detector.train(was_training)
    write_label_file(frames, storage.join(uri, out_file))
    return {"frames": len(frames), "marked_boxes": int(sum(marked)), "frames_marked": int(sum(m > 0 for m in marked)),
            "score": score, "max_iou": max_iou, "labels_file": out_file, "corrupt_images": corrupt}


def main(argv: list[str] | None = None) -> int:
    """`drivedit mark-unlabelled`: write a generated dataset's label file with a detector's unlabelled detections
    marked as ignore regions."""
    import argparse
    import json
    import sys

    from drivedit.data.bdd100k import LabelFileError
    from drivedit.detect.detector import load_detector

    ap = argparse.ArgumentParser(prog="drivedit mark-unlabelled", description=__doc__.split("\n\n")[0])
    ap.add_argument("--detector", required=True, help="a detector trained on real frames: a run's `detector` folder "
                                                       "(local or s3://) or models:/NAME/VERSION")
    ap.add_argument("--data", required=True, help="BDD100K-format folder (images/ + label file), e.g. a generated set")
    ap.add_argument("--labels-file", default="labels.json", help="its label file (default labels.json)")
    ap.add_argument("--out-file", default="labels-marked.json", help="the label file to write beside it; give it to "
                                                                    "the detect job as data.train[].labels_file")
    ap.add_argument("--score", type=float, default=0.5, help="lowest detection score marked (default 0.5)")
    ap.add_argument("--max-iou", type=float, default=0.3, help="a detection overlapping a label by this IoU or "
                                                              "more is that label, not an unlabelled object")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for a models:/ detector")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if not 0 < args.score < 1 or not 0 < args.max_iou <= 1:
        print(f"drivedit mark-unlabelled: --score must lie in (0, 1) and --max-iou in (0, 1], got {args.score} "
              f"and {args.max_iou}", file=sys.stderr)
        return 2
    if args.out_file == args.labels_file:
        print("drivedit mark-unlabelled: --out-file must differ from --labels-file (the dataset's own labels are "
              "kept as they are)", file=sys.stderr)
        return 2
    try:
        detector, spec = load_detector(args.detector, args.tracking_uri)
        report = mark_unlabelled(detector, spec, args.data, args.labels_file, args.out_file, args.score,
                                 args.max_iou, marked_by=args.detector, device=args.device)
    except (FileNotFoundError, LabelFileError, ValueError) as e:
        print(f"drivedit mark-unlabelled: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0
