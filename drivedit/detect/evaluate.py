"""COCO evaluation with pycocotools: mAP@[.5:.95], AP50, AP75 overall, per category, per scenario and per
object size, plus the precision-recall curves, from ground truth and detections in COCO's JSON formats.

The numbers are pycocotools' `COCOeval` (the reference implementation), never our own matching. Two
settings differ from COCO's defaults, both stated in the results:
- object sizes: COCO's small / medium / large limits are areas of 32^2 and 96^2 px in images about
  640 px on the long side. At `image_size` px the limit sides are scaled by image_size / 640, so at
  128 px small < 6.4^2 = 41 px^2 <= medium < 19.2^2 = 369 px^2 <= large;
- per scenario: the same evaluation restricted (`params.imgIds`) to the scenario's images.
The ground truth and detections are plain COCO JSON (`gt.json`, `predictions.json`), so any COCO tool
rescores them; with default COCOeval settings the overall AP numbers are the same.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np

SIZE_LABELS = ("all", "small", "medium", "large")
COCO_REFERENCE_SIDE = 640


def area_ranges(image_size: int, reference: int = COCO_REFERENCE_SIDE) -> list[list[float]]:
    """COCOeval's areaRng for all / small / medium / large, COCO's 32 and 96 px sides scaled by image_size / reference."""
    s = image_size / reference
    small, medium = (32 * s) ** 2, (96 * s) ** 2
    return [[0.0, 1e10], [0.0, small], [small, medium], [medium, 1e10]]


@dataclass
class GroundTruthImage:
    """One scored image: its boxes (k, 4) x1, y1, x2, y2 in pixels and 1-based category ids (k,), and its ignore
    regions (m, 4) with their category ids (m,), 0 for a region of any category."""

    name: str
    scenario: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def coco_ground_truth(images: list[GroundTruthImage], categories: list[str]) -> dict:
    """COCO instances JSON; image ids are 1-based positions, each image records its scenario. An ignore region is
    COCO's crowd annotation (`iscrowd` 1, `ignore_region` true): a detection on it counts neither as found nor as
    false, and it is no box to find; a region of any category (id 0) is one crowd annotation per category."""
    out_images, annotations = [], []

    def add(i: int, box, label: int, crowd: bool, any_category: bool = False) -> None:
        x1, y1, x2, y2 = (float(v) for v in box)
        w, h = x2 - x1, y2 - y1
        region = ({"ignore_region": True} if crowd else {}) | ({"any_category": True} if any_category else {})
        annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                            "bbox": [round(x1, 3), round(y1, 3), round(w, 3), round(h, 3)],
                            "area": round(w * h, 4), "iscrowd": int(crowd), **region})

    for i, im in enumerate(images, start=1):
        out_images.append({"id": i, "file_name": im.name, "width": int(im.width), "height": int(im.height),
                           "scenario": im.scenario})
        for box, label in zip(np.asarray(im.boxes, np.float64).reshape(-1, 4), im.labels):
            add(i, box, label, False)
        for box, label in zip(np.asarray(im.ignore, np.float64).reshape(-1, 4), im.ignore_labels):
            for c in ([int(label)] if label > 0 else range(1, len(categories) + 1)):
                add(i, box, c, True, any_category=label <= 0)
    return {"images": out_images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)]}


def coco_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Detections of one image in COCO's results format (bbox as x, y, w, h)."""
    out = []
    for (x1, y1, x2, y2), s, c in zip(np.asarray(boxes, np.float64).reshape(-1, 4), scores, labels):
        out.append({"image_id": int(image_id), "category_id": int(c),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(float(s), 5)})
    return out


def _coco(gt: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(coco_gt, results: list[dict]):
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    # loadRes cannot take an empty list; no detection at all scores 0 wherever there are boxes
    return _coco({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                  "annotations": []})


def _value(x: float) -> float | None:
    return None if x < 0 else float(x)  # COCOeval writes -1 where there is no ground truth


def _run_cocoeval(coco_gt, coco_dt, img_ids: list[int], image_size: int, reference: int) -> dict:
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.params.imgIds = sorted(img_ids)
    ev.params.areaRng = area_ranges(image_size, reference)
    ev.params.areaRngLbl = list(SIZE_LABELS)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    out = {"mAP": _value(s[0]), "AP50": _value(s[1]), "AP75": _value(s[2]), "AP_small": _value(s[3]),
           "AP_medium": _value(s[4]), "AP_large": _value(s[5]), "AR100": _value(s[8])}
    # boxes each size range counts: COCOeval's own non-ignored ground truth at the largest maxDet
    max_det = ev.params.maxDets[-1]
    counts = dict.fromkeys(SIZE_LABELS, 0)
    for e in ev.evalImgs:
        if e is not None and e["maxDet"] == max_det:
            label = SIZE_LABELS[ev.params.areaRng.index(list(e["aRng"]))]
            counts[label] += int((np.asarray(e["gtIgnore"]) == 0).sum())
    out["num_boxes"] = counts
    # AP at IoU 0.5 per object size (COCO's summary gives sizes only averaged over IoUs): layout fidelity's
    # per-size ratio needs the AP50 the overall ratio uses
    p50 = ev.eval["precision"][0, :, :, :, -1]  # (R recall, K categories, A areas)
    out["AP50_by_size"] = {label: _value(p50[:, :, a][p50[:, :, a] > -1].mean()) if (p50[:, :, a] > -1).any()
                           else None for a, label in enumerate(SIZE_LABELS)}
    out["num_images"] = len(img_ids)
    precision = ev.eval["precision"]  # (T iou, R recall, K categories, A areas, M maxDets)
    for a, label in enumerate(SIZE_LABELS[1:], start=1):  # AP50 per object size (COCO's summary has only AP)
        p50 = precision[0, :, :, a, -1]
        out[f"AP50_{label}"] = _value(p50[p50 > -1].mean()) if (p50 > -1).any() else None
    per_category, curves = {}, {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = coco_gt.cats[cat_id]["name"]
        p = precision[:, :, k, 0, -1]
        n = len(coco_gt.getAnnIds(imgIds=img_ids, catIds=[cat_id], iscrowd=0))  # ignore regions are no boxes
        per_category[name] = {"AP": _value(p[p > -1].mean()) if (p > -1).any() else None,
                              "AP50": _value(p[0][p[0] > -1].mean()) if (p[0] > -1).any() else None,
                              "num_boxes": n}
        curves[name] = p[0].tolist()  # precision at IoU 0.5 over the 101 recall thresholds
    out["per_category"] = per_category
    out["pr_curve"] = {"recall": ev.params.recThrs.tolist(), "precision_iou50": curves}
    return out


def evaluate(gt: dict, results: list[dict], image_size: int, reference: int = COCO_REFERENCE_SIDE) -> dict:
    """Scores overall and per scenario (from each image's `scenario`). `gt`: COCO instances JSON as written by
    `coco_ground_truth`; `results`: COCO detections."""
    coco_gt = _coco(gt)
    coco_dt = _detections(coco_gt, results)
    all_ids = [im["id"] for im in gt["images"]]
    overall = _run_cocoeval(coco_gt, coco_dt, all_ids, image_size, reference)
    by_scenario: dict[str, list[int]] = {}
    for im in gt["images"]:
        by_scenario.setdefault(im.get("scenario", "other"), []).append(im["id"])
    per_scenario = {}
    for name, ids in sorted(by_scenario.items()):
        r = _run_cocoeval(coco_gt, coco_dt, ids, image_size, reference)
        per_scenario[name] = {k: r[k] for k in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                                                "AP50_small", "AP50_medium", "AP50_large", "num_boxes", "num_images")}
    limits = area_ranges(image_size, reference)
    return {**overall, "per_scenario": per_scenario,
            "size_limits_px2": {"small_below": limits[1][1], "large_from": limits[2][1]},
            "size_scaling": f"COCO's 32^2 / 96^2 px area limits with sides scaled by {image_size}/{reference}"}


def ap50(gt: dict, results: list[dict], image_size: int, reference: int = COCO_REFERENCE_SIDE) -> float | None:
    """`evaluate(...)["AP50"]` alone, in one COCOeval pass at IoU 0.5 over the whole area range: what a bootstrap
    draws hundreds of times (None: no box to find)."""
    from pycocotools.cocoeval import COCOeval

    coco_gt = _coco(gt)
    ev = COCOeval(coco_gt, _detections(coco_gt, results), "bbox")
    ev.params.imgIds = sorted(im["id"] for im in gt["images"])
    ev.params.iouThrs = np.array([0.5])
    ev.params.areaRng = area_ranges(image_size, reference)[:1]  # "all"
    ev.params.areaRngLbl = list(SIZE_LABELS[:1])
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"][0, :, :, 0, -1]  # (R recall, K categories) at IoU 0.5, every size, 100 detections
    return _value(p[p > -1].mean()) if (p > -1).any() else None


def scenario_table(metrics: dict) -> str:
    """The per-scenario scores as CSV (scenario, images, boxes, mAP, AP50, AP75, AP small/medium/large)."""
    def f(v):
        return "" if v is None else f"{v:.4f}"

    rows = ["scenario,images,boxes,mAP,AP50,AP75,AP_small,AP_medium,AP_large"]
    for name, r in list(metrics["per_scenario"].items()) + [("all", metrics)]:
        rows.append(",".join([name, str(r["num_images"]), str(r["num_boxes"]["all"])]
                             + [f(r[k]) for k in ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")]))
    return "\n".join(rows) + "\n"


def pr_figure(metrics: dict, path) -> None:
    """Precision-recall curves at IoU 0.5, one per category with boxes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    recall = metrics["pr_curve"]["recall"]
    for name, precision in metrics["pr_curve"]["precision_iou50"].items():
        if metrics["per_category"][name]["num_boxes"] == 0:
            continue
        p = np.clip(np.asarray(precision), 0, None)
        ax.plot(recall, p, label=f"{name} (AP50 {metrics['per_category'][name]['AP50'] or 0:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"IoU 0.5: mAP {metrics['mAP'] or 0:.3f}, AP50 {metrics['AP50'] or 0:.3f}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
