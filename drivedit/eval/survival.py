"""Label survival of condition transfer: a detector's AP50 on transferred frames over its AP50 on their originals.

A transfer keeps its source's boxes; if the re-rendered picture no longer shows the objects where the
boxes say, a detector trained on real frames finds fewer of them against those labels, and the ratio
drops below 1. The detector is not run here: it takes its predictions as COCO detection results JSON
([{image_id, category_id, bbox: [x, y, w, h], score}], what `drivedit detect` and most detectors write),
scored against a dataset's BDD100K labels.json by the detect job's COCOeval scoring
(drivedit.detect.evaluate: AP at IoU 0.5, all areas).

`image_id` may be the frame's `name` (as labels.json spells it) or its 0-based position in labels.json;
`category_id` may be the category name or its position in `categories`.
"""
from __future__ import annotations

import json

import numpy as np

from drivedit import storage
from drivedit.data.bdd100k import Frame, is_ignore, load_label_file


def _ground_truth(frames: list[Frame], categories: list[str]) -> dict:
    """The frames' boxes of `categories` as COCO instances JSON (the detect job's layout: ids are positions + 1);
    boxes marked {"ignore": true} are crowd regions, as the detect job scores them."""
    from drivedit.detect.evaluate import GroundTruthImage, coco_ground_truth

    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    images = []
    for f in frames:
        kept = [b for b in f.boxes if b.category in cat_id and not is_ignore(b.attributes)]
        marked = [b for b in f.boxes if is_ignore(b.attributes)]
        images.append(GroundTruthImage(f.name, "all", 0, 0, np.array([[b.x1, b.y1, b.x2, b.y2] for b in kept]),
                                       np.array([cat_id[b.category] for b in kept], np.int64),
                                       np.array([[b.x1, b.y1, b.x2, b.y2] for b in marked], np.float32).reshape(-1, 4),
                                       np.array([cat_id.get(b.category, 0) for b in marked], np.int64)))
    return coco_ground_truth(images, categories)


def apply_regions(gt: dict, ignore_under: float = 0.0, all_boxes: bool = False) -> dict:
    """A copy of COCO ground truth as the detect job writes it, rescored under another labelling:
    `ignore_under` > 0 makes every box with a side (sqrt of the area) under it an ignore region (crowd), as
    the generate job labels what is under one token; `all_boxes` makes the ignore regions that name one
    category boxes to find again (what the frames were asked to show, before any was marked)."""
    annotations = []
    for a in gt["annotations"]:
        a = dict(a)
        if all_boxes and a.get("ignore_region") and not a.get("any_category"):
            a["iscrowd"] = 0
            a.pop("ignore_region")
        if ignore_under > 0 and not a["iscrowd"] and np.sqrt(max(a["bbox"][2], 0) * max(a["bbox"][3], 0)) < ignore_under:
            a.update(iscrowd=1, ignore_region=True)
        annotations.append(a)
    return {**gt, "annotations": annotations}


def _coco_results(predictions: list[dict], frames: list[Frame], categories: list[str], where: str) -> list[dict]:
    """Predictions with image and category ids mapped onto the ground truth's; raises ValueError naming
    every prediction that refers to an unknown image or category."""
    by_name = {f.name: i + 1 for i, f in enumerate(frames)}
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    out, problems = [], []
    for k, p in enumerate(predictions):
        img, cat = p.get("image_id"), p.get("category_id")
        image_id = by_name.get(img) if isinstance(img, str) else (img + 1 if isinstance(img, int)
                                                                   and 0 <= img < len(frames) else None)
        category = cat_id.get(cat) if isinstance(cat, str) else (cat + 1 if isinstance(cat, int)
                                                                  and 0 <= cat < len(categories) else None)
        bbox = p.get("bbox")
        if image_id is None:
            problems.append(f"prediction {k}: image_id {img!r} is neither a frame name nor a position in labels.json")
        if category is None:
            problems.append(f"prediction {k}: category_id {cat!r} is not one of {', '.join(categories)} "
                            f"(or a position in that list)")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            problems.append(f"prediction {k}: bbox must be [x, y, width, height], got {bbox!r}")
        if image_id is not None and category is not None and not problems:
            out.append({"image_id": image_id, "category_id": category, "bbox": [float(v) for v in bbox],
                        "score": float(p.get("score", 1.0))})
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(f"{where}: " + "; ".join(problems[:10]) + more)
    return out


def ap50(frames: list[Frame], predictions: list[dict], categories: list[str], where: str = "predictions",
         all_boxes: bool = False) -> float:
    """COCO AP at IoU 0.5 (the detect job's COCOeval scoring, over the categories that have ground truth) of
    `predictions` on `frames`' boxes (boxes marked as ignore regions are crowd, unless `all_boxes`). NaN when
    the frames hold no box of `categories` to find."""
    from drivedit.detect.evaluate import evaluate

    gt = apply_regions(_ground_truth(frames, categories), all_boxes=all_boxes)
    results = _coco_results(predictions, frames, categories, where)
    if not _boxes_to_find(gt):
        return float("nan")
    value = evaluate(gt, results, image_size=640)["AP50"]  # the size ranges play no part in AP50 over all areas
    return float("nan") if value is None else float(value)


def _load_predictions(uri: str) -> list[dict]:
    try:
        data = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"detector predictions not found: {uri}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{uri}: expected COCO detection results, a JSON list of "
                         "{image_id, category_id, bbox, score}")
    return data


def _ratio(a: float, b: float) -> float:
    """Survival a / b: NaN when the originals score nothing or the transferred AP is undefined."""
    return a / b if b > 0 and np.isfinite(a) else float("nan")


def label_survival(transferred_labels: str, transferred_predictions: str, original_labels: str,
                   original_predictions: str, categories: list[str] | None = None) -> dict:
    """{ap50_transferred, ap50_original, survival = their ratio, categories} from two labels.json and the
    detector's COCO results on each set of images. `categories` default: those of the originals' boxes.

    Every carried box counts here, the ones the transfer marked as ignore regions too: the originals' boxes are
    in their own images' pixels, so the transfer's size rule cannot be applied to them alike. The score-folder
    route (`label_survival_from_scores`), where both sides are at the detector's size, gives both figures."""
    transferred, original = load_label_file(transferred_labels), load_label_file(original_labels)
    if categories is None:
        categories = sorted({b.category for f in original for b in f.boxes})
    a_t = ap50(transferred, _load_predictions(transferred_predictions), categories, transferred_predictions, True)
    a_o = ap50(original, _load_predictions(original_predictions), categories, original_predictions, True)
    return {"ap50_transferred": a_t, "ap50_original": a_o, "survival": _ratio(a_t, a_o), "categories": categories,
            "num_transferred": len(transferred), "num_original": len(original)}


def _boxes_to_find(gt: dict) -> bool:
    return any(not a.get("iscrowd") for a in gt["annotations"])


def _read_scores(scores_dir: str, ignore_under: float = 0.0, all_boxes: bool = False) -> tuple[dict, list[dict]]:
    """A `drivedit detect --eval-only` scores folder -> (its gt.json relabelled by `apply_regions`, its detections)."""
    try:
        gt = json.loads(storage.read_bytes(storage.join(scores_dir, "gt.json")))
    except FileNotFoundError:
        raise FileNotFoundError(f"{scores_dir} is not a detect scores folder: it has no gt.json (write one with "
                                f"`drivedit detect --eval-only --data.val DIR`)") from None
    results = _load_predictions(storage.join(scores_dir, "predictions.json"))
    return apply_regions({**gt, "annotations": gt.get("annotations") or []}, ignore_under, all_boxes), results


def rescore(scores_dir: str, ignore_under: float = 0.0, all_boxes: bool = False) -> dict:
    """The detect job's evaluation (`detect.evaluate.evaluate`) of a `drivedit detect --eval-only` scores folder,
    recomputed from its gt.json and predictions.json at the scored image size (gt.json's image width), so
    a folder written by any version scores alike; `ignore_under` and `all_boxes` relabel it (`apply_regions`).
    Raises ValueError when its ground truth holds no box to find."""
    from drivedit.detect.evaluate import evaluate

    gt, results = _read_scores(scores_dir, ignore_under, all_boxes)
    if not _boxes_to_find(gt):
        raise ValueError(f"{scores_dir}: its ground truth holds no box, so there is no AP to score")
    size = max([max(int(im["width"]), int(im["height"])) for im in gt["images"]] or [640])
    return evaluate(gt, results, image_size=size)


def _scores_ap50(scores_dir: str, ignore_under: float = 0.0, all_boxes: bool = False) -> float:
    try:
        value = rescore(scores_dir, ignore_under, all_boxes)["AP50"]
    except ValueError:
        return float("nan")
    return float("nan") if value is None else float(value)


def label_survival_from_scores(transferred_scores: str, original_scores: str, ignore_under: float = 0.0) -> dict:
    """Label survival from two score folders of the detect job (`drivedit detect --eval-only --data.val DIR`
    run once on the transferred dataset and once on its source): each holds gt.json and predictions.json.

    `survival` scores the transferred frames' labels as written (boxes the transfer marked are crowd regions)
    and the originals with the same rule (boxes with a side under `ignore_under` px, the transferred dataset's:
    `fidelity.dataset_ignore_under`); `survival_all_boxes` counts every carried box on both sides."""
    a_t, a_o = _scores_ap50(transferred_scores, ignore_under), _scores_ap50(original_scores, ignore_under)
    all_t, all_o = _scores_ap50(transferred_scores, all_boxes=True), _scores_ap50(original_scores)
    return {"ap50_transferred": a_t, "ap50_original": a_o, "survival": _ratio(a_t, a_o), "ignore_under": ignore_under,
            "ap50_transferred_all_boxes": all_t, "ap50_original_all_boxes": all_o,
            "survival_all_boxes": _ratio(all_t, all_o),
            "transferred_scores": transferred_scores, "original_scores": original_scores}


# ----------------------------------------------------------------------------- spread over source frames


def _scored(scores_dir: str, ignore_under: float) -> tuple[dict, dict[int, list[dict]]]:
    """A score folder's ground truth under the side rule and its detections grouped by image id."""
    gt, results = _read_scores(scores_dir, ignore_under)
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    return gt, by_image


def _resampled_ap50(gt: dict, by_image: dict[int, list[dict]], image_ids: list[int]) -> float:
    """AP50 of the images `image_ids` (repeats allowed: each copy is its own image), as `rescore` scores."""
    from drivedit.detect.evaluate import ap50 as coco_ap50

    images = {im["id"]: im for im in gt["images"]}
    anns: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        anns.setdefault(int(a["image_id"]), []).append(a)
    new_images, new_anns, results = [], [], []
    for k, old in enumerate(image_ids, start=1):
        new_images.append({**images[old], "id": k})
        new_anns += [{**a, "id": len(new_anns) + n + 1, "image_id": k} for n, a in enumerate(anns.get(old, []))]
        results += [{**r, "image_id": k} for r in by_image.get(old, [])]
    sub = {**gt, "images": new_images, "annotations": new_anns}
    if not _boxes_to_find(sub):
        return float("nan")
    size = max(max(int(im["width"]), int(im["height"])) for im in new_images)
    value = coco_ap50(sub, results, image_size=size)
    return float("nan") if value is None else float(value)


def survival_interval(transferred_scores: str, original_scores: str, source_of: dict[str, str],
                      ignore_under: float = 0.0, draws: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """A percentile bootstrap interval of label survival over the source frames: each draw resamples the source
    frames with replacement and scores, on both sides, the drawn frames' images (a frame's every transfer goes
    with it), so the spread is that of the frames a survival figure rests on. `source_of` maps each transferred
    image's file name to its source frame's (the transferred dataset's manifest: `transfer_sources`); the
    originals' gt.json names its frames by file name. Returns {low, high, level, draws, frames}."""
    t_gt, t_pred = _scored(transferred_scores, ignore_under)
    o_gt, o_pred = _scored(original_scores, ignore_under)
    original_id = {im["file_name"]: im["id"] for im in o_gt["images"]}
    transferred_ids: dict[str, list[int]] = {}
    for im in t_gt["images"]:
        frame = source_of.get(im["file_name"])
        if frame not in original_id:
            raise ValueError(f"{transferred_scores}: image {im['file_name']} comes from source frame {frame!r}, "
                             f"which {original_scores} did not score; score the transfer's own source folder")
        transferred_ids.setdefault(frame, []).append(im["id"])
    frames = sorted(transferred_ids)
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(draws):
        drawn = [frames[k] for k in rng.integers(0, len(frames), len(frames))]
        a_t = _resampled_ap50(t_gt, t_pred, [i for f in drawn for i in transferred_ids[f]])
        a_o = _resampled_ap50(o_gt, o_pred, [original_id[f] for f in drawn])
        ratios.append(_ratio(a_t, a_o))
    ratios = np.asarray([r for r in ratios if np.isfinite(r)])
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(ratios, [tail, 100 - tail]) if len(ratios) else (float("nan"), float("nan")))
    return {"low": float(low), "high": float(high), "level": level, "draws": int(len(ratios)), "frames": len(frames)}


def transfer_sources(dataset_uri: str) -> dict[str, str]:
    """A transferred dataset's image name -> the source frame it was made from (its manifest's source_frame)."""
    from drivedit.generate.dataset import read_manifest

    rows = read_manifest(dataset_uri).select(["name", "source_frame"]).to_pylist()
    return {r["name"]: r["source_frame"] for r in rows if r["source_frame"] is not None}
