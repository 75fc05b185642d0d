"""Everything about a detection job that can be checked before Ray starts: the config, the label files
(an empty training set or a validation set without boxes is an error), the weights file or detector
being started from, and a run being resumed. `check` raises one ConfigError listing every problem."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydantic import ValidationError

from drivedit import storage
from drivedit.config.base import ConfigError, format_validation_error
from drivedit.config.detect import DetectJob
from drivedit.data.bdd100k import LabelFileError
from drivedit.train.preflight import latest_checkpoint

# fields that decide the detector's tensors: a resumed run must keep them
STRUCTURAL_MODEL_FIELDS = ("arch", "backbone", "fpn_channels", "weights", "ref", "dit")


@dataclass
class Plan:
    job: DetectJob
    run_dir: str
    latest: dict | None
    reports: dict = field(default_factory=dict)  # folder -> LabelReport.to_dict()


def _absolute(raw: dict) -> dict:
    """Local paths the Ray workers read, made absolute against the driver's directory."""
    if not isinstance(raw, dict):
        return raw
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    data, model, run = out.get("data"), out.get("model"), out.get("run")
    if isinstance(data, dict):
        if isinstance(data.get("train"), list):
            data["train"] = [{**s, "uri": storage.absolute(s["uri"])} if isinstance(s, dict) and
                             isinstance(s.get("uri"), str) else s for s in data["train"]]
        if isinstance(data.get("val"), str):
            data["val"] = storage.absolute(data["val"])
    if isinstance(model, dict):
        for key in ("weights", "ref"):
            if isinstance(model.get(key), str):
                model[key] = storage.absolute(model[key])
        if isinstance(model.get("dit"), dict) and isinstance(model["dit"].get("source"), str):
            model["dit"] = {**model["dit"], "source": storage.absolute(model["dit"]["source"])}
    if isinstance(run, dict) and isinstance(run.get("storage_path"), str):
        run["storage_path"] = storage.absolute(run["storage_path"])
    return out


def read_folder(uri: str, job: DetectJob, categories: list[str], what: str, problems: list[str],
                labels_file: str | None = None) -> dict | None:
    from drivedit.detect.dataset import read_frames

    d = job.data
    try:
        _, report = read_frames(uri, labels_file or d.labels_file, categories, d.category_map, d.scenarios)
    except (LabelFileError, OSError, ValueError) as e:
        problems.append(f"{what}: {e}")
        return None
    return report.to_dict()


def describe(uri: str, r: dict) -> str:
    unknown = ", ".join(f"{k} {v}" for k, v in sorted(r["unknown_categories"].items()))
    return (f"{uri}: {r['frames']} frames, {r['boxes']} boxes, {r['negatives']} without boxes"
            + (f"; dropped boxes of unknown categories: {unknown}" if unknown else "")
            + (f"; {r['broken_boxes']} broken boxes skipped" if r["broken_boxes"] else "")
            + (f"; {r['ignore_regions']} boxes marked as ignore regions" if r.get("ignore_regions") else ""))


def _check_sources(job: DetectJob, problems: list[str]) -> None:
    m = job.model
    if m.weights and not storage.exists(m.weights):
        problems.append(f"model.weights: file not found: {m.weights}")
    if m.ref and not m.ref.startswith("models:/") and not storage.exists(storage.join(m.ref, "detector.json")):
        problems.append(f"model.ref: {m.ref} holds no detector.json (give a run's detector folder or "
                        f"models:/NAME/VERSION)")
    if m.backbone == "dit" and not m.ref:
        from drivedit.models.checkpoint import resolve_model_source

        src = m.dit.source
        if not src.startswith("models:/") and not storage.is_remote(src):
            try:
                resolve_model_source(src)
            except (FileNotFoundError, ValueError) as e:
                problems.append(f"model.dit.source: {e}")


def check(raw: dict, source: str = "(config)", eval_only: bool = False) -> Plan:
    """Validate a raw config and what it points at; raise ConfigError with every problem."""
    problems: list[str] = []
    try:
        job = DetectJob.model_validate(_absolute(raw))
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e)) from None
    reports: dict = {}
    categories = job.data.categories
    if eval_only:
        if not job.model.ref:
            problems.append("--eval-only needs model.ref: a run's detector folder or models:/NAME/VERSION")
        elif not job.model.ref.startswith("models:/"):
            try:  # the detector's categories, not the config's, are what gets scored
                categories = json.loads(storage.read_bytes(storage.join(job.model.ref, "detector.json")))["categories"]
            except (FileNotFoundError, OSError, ValueError, KeyError) as e:
                problems.append(f"model.ref: {job.model.ref} is not a saved detector (no readable detector.json: {e})")
    else:
        _check_sources(job, problems)
        if not job.data.train:
            problems.append("data.train is empty: list at least one BDD100K-format folder ({uri, weight})")
        for i, src in enumerate(job.data.train):
            r = read_folder(src.uri, job, categories, f"data.train[{i}]", problems, src.labels_file)
            if r is not None:
                reports[src.uri] = r
        if job.data.train and reports and len(reports) == len(job.data.train):
            if sum(r["frames"] for r in reports.values()) == 0:
                problems.append("the training set is empty: data.train's label files list no frames")
            elif sum(r["boxes"] for r in reports.values()) == 0:
                problems.append(f"the training set holds no box of data.categories {categories}; check the "
                                f"categories and data.category_map against the labels")
    if not job.data.val:
        problems.append("data.val is not set: give a held-out BDD100K-format folder to score on")
    elif not eval_only or not job.model.ref or not job.model.ref.startswith("models:/"):
        # with a registered detector its categories are known only after download: checked when scoring
        r = read_folder(job.data.val, job, categories, "data.val", problems)
        if r is not None:
            reports[job.data.val] = r
            if r["boxes"] == 0:
                problems.append(f"data.val ({job.data.val}) holds no box of the categories {categories}: "
                                f"nothing to score; use a labelled held-out folder")
    run_dir = storage.join(job.run.storage_path, job.run.name)
    latest = None
    if not eval_only:
        try:
            latest = latest_checkpoint(run_dir)
        except (OSError, ValueError) as e:
            problems.append(f"run.storage_path: cannot read {run_dir}: {e}")
        if latest is not None:
            old = latest.get("model", {})
            new = job.model.model_dump(mode="json")
            changed = [f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in STRUCTURAL_MODEL_FIELDS
                       if old.get(k) != new.get(k)]
            if latest.get("categories") != categories:
                changed.append(f"data.categories: {latest.get('categories')} -> {categories}")
            if latest.get("image_size") != job.data.image_size:
                changed.append(f"data.image_size: {latest.get('image_size')} -> {job.data.image_size}")
            if changed:
                problems.append(f"the run being resumed ({latest['uri']}) was built differently: " + "; ".join(changed)
                                + "; keep them or choose a new run.name")
            if int(latest.get("step", 0)) > job.optim.total_steps:
                problems.append(f"the run being resumed is at step {latest['step']}, past optim.total_steps "
                                f"{job.optim.total_steps}; raise total_steps or choose a new run.name")
    if problems:
        raise ConfigError(source, problems)
    return Plan(job=job, run_dir=run_dir, latest=latest, reports=reports)
