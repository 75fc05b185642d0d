"""Layout fidelity: do frames generated from layouts show the objects their labels say?

A detector trained on real frames only (the detect job) is run over the generated frames and scored against
their own labels (`drivedit detect --eval-only --data.val GENERATED`), and over held-out real frames
(`--data.val REAL`). Fidelity is its AP50 on the generated frames over its AP50 on the real ones: 1 means
the generated boxes hold as well as real labels do for this detector; a weak detector lowers both sides,
so the ratio measures the images, not the detector (GeoDiffusion reports 0.72 of real on nuImages).

Per scenario: the generated frames of a scenario against the real frames of the same scenario (the
detector's own weakness at night cancels out), against all real frames when the real set has none of it.
Per object size: AP50 over boxes of each COCO size range (scaled to the image size, as the detect job
scores), generated over real. Both score folders are rescored from their gt.json and predictions.json.

What is scored: the generated frames' labels as the generate job wrote them, whose boxes under one DiT
token are ignore regions (generate/undrawable.py: the model cannot promise them), and the real frames
with the same rule applied, so both sides count the same boxes; `all_boxes` gives the same ratios over
every box of the layouts (what the frames were asked to show), the figure before there were ignore marks.
"""
from __future__ import annotations

import math

from drivedit.eval.survival import rescore


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _row(generated: float | None, real: float | None, **extra) -> dict:
    return {"ap50_generated": generated, "ap50_real": real, "fidelity": _ratio(generated, real), **extra}


def _compare(gen: dict, real: dict) -> dict:
    per_scenario = {}
    for name, g in gen["per_scenario"].items():
        r = real["per_scenario"].get(name)
        ref = r["AP50"] if r is not None and r["AP50"] is not None else real["AP50"]
        per_scenario[name] = _row(g["AP50"], ref, real_reference=name if r is not None and r["AP50"] is not None
                                  else "all", num_images=g["num_images"], num_boxes=g["num_boxes"]["all"])
    per_size = {size: _row(gen["AP50_by_size"][size], real["AP50_by_size"][size],
                           num_boxes_generated=gen["num_boxes"][size], num_boxes_real=real["num_boxes"][size])
                for size in ("small", "medium", "large")}
    return {**_row(gen["AP50"], real["AP50"]), "per_scenario": per_scenario, "per_size": per_size,
            "num_boxes_generated": gen["num_boxes"]["all"], "num_boxes_real": real["num_boxes"]["all"]}


def layout_fidelity(generated_scores: str, real_scores: str, ignore_under: float = 0.0) -> dict:
    """{ap50_generated, ap50_real, fidelity, per_scenario: {name: row}, per_size: {small|medium|large: row},
    all_boxes: the same over every layout box, ignore_under, size_scaling} from two detect score folders (row:
    ap50_generated, ap50_real, fidelity and box counts).

    The headline figures score the generated frames against their labels as written (the boxes the generator
    marked as ignore regions are COCO crowd regions) and the real frames under the same rule: boxes with a
    side under `ignore_under` px (the generated dataset's, `dataset_ignore_under`) are ignore regions on both
    sides, so the ratio compares like with like. `all_boxes` scores every box of the layouts as one to find,
    what the frames were asked to show."""
    gen, real = rescore(generated_scores, ignore_under), rescore(real_scores, ignore_under)
    everything = _compare(rescore(generated_scores, all_boxes=True), rescore(real_scores))
    return {**_compare(gen, real), "ignore_under": float(ignore_under), "all_boxes": everything,
            "num_generated": gen["num_images"], "num_real": real["num_images"],
            "size_scaling": gen["size_scaling"], "generated_scores": generated_scores, "real_scores": real_scores}


def dataset_ignore_under(uri: str, scores_dir: str | None = None) -> float:
    """The side in px under which a generated dataset labels boxes as ignore regions (its spec.json's layouts or
    transfer `ignore_under`, in its images' pixels), or, with `scores_dir` (the detect job's scores of it), in the
    pixels that folder was scored at (the detect job resizes every image to its own size); 0 for a dataset made
    before there was one, or not generated."""
    import json

    from drivedit import storage
    from drivedit.generate.dataset import read_spec

    spec = (read_spec(uri) or {}).get("spec", {})
    side = float((spec.get("layouts") or spec.get("transfer") or {}).get("ignore_under", 0.0))
    if side and scores_dir is not None and spec.get("image_size"):
        images = json.loads(storage.read_bytes(storage.join(scores_dir, "gt.json")))["images"]
        side *= max([int(im["width"]) for im in images] or [spec["image_size"]]) / float(spec["image_size"])
    return side


def fidelity_metrics(result: dict, prefix: str) -> dict[str, float]:
    """Flat MLflow metrics of a layout_fidelity result: <prefix>.{fidelity, ap50_generated, ap50_real},
    <prefix>.<scenario>.fidelity, <prefix>.size_<size>.fidelity (values that could not be computed left out)."""
    out = {f"{prefix}.{k}": result[k] for k in ("fidelity", "ap50_generated", "ap50_real")}
    out.update({f"{prefix}.{name.replace(' ', '_')}.fidelity": row["fidelity"]
                for name, row in result["per_scenario"].items()})
    out.update({f"{prefix}.size_{size}.fidelity": row["fidelity"] for size, row in result["per_size"].items()})
    if "all_boxes" in result:
        everything = result["all_boxes"]
        out[f"{prefix}.all_boxes.fidelity"] = everything["fidelity"]
        out.update({f"{prefix}.all_boxes.size_{size}.fidelity": row["fidelity"]
                    for size, row in everything["per_size"].items()})
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}
