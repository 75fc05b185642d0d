"""An evaluation's numbers as MLflow metrics of the run they judge.

By default `drivedit eval` logs into the run that generated the fake folder (a generated dataset
keeps its run in `mlflow_run.json`), so a model version's FID sits beside the dataset it was
measured on; `--mlflow-run` names another run (a run id, or a run directory holding
`mlflow_run.json`, e.g. a fine-tuning run's). Metric names:

    eval.<metric>             overall: fid, kid, kid_std, precision, recall, condition_accuracy,
                              num_real, num_fake, classifier_heldout_accuracy
    eval.<scenario>.<metric>  the same per scenario (fid, kid, kid_std, precision, recall,
                              condition_accuracy, num_real, num_fake)

    eval.layout_fidelity.{fidelity,ap50_generated,ap50_real}, eval.layout_fidelity.<scenario>.fidelity,
    eval.layout_fidelity.size_<small|medium|large>.fidelity,
    eval.layout_fidelity.all_boxes.fidelity, eval.layout_fidelity.all_boxes.size_<size>.fidelity
                                                              when layout fidelity was asked for
    eval.label_survival.{survival,survival_all_boxes,ap50_transferred,ap50_original}  when label survival was asked for

A metric the evaluation could not compute (too few images) is not logged. The whole result is
logged as `eval/result-<step>.json` too.
"""
from __future__ import annotations

import math

import os

from drivedit import storage
from drivedit.tracking import RUN_ID_FILE, TrackedRun, absolute_tracking_uri, stored_run

PREFIX = "eval"
_PER_SET = ("fid", "kid", "kid_std", "precision", "recall", "condition_accuracy", "num_real", "num_fake",
            "layout_agreement", "layout_fd")
_SCENE = ("layout_agreement", "mean_map_corr", "std_map_corr", "layout_fd")


def eval_metrics(result: dict) -> dict[str, float]:
    """The metric name -> value of an `evaluate_folders` result (None values left out)."""
    out: dict[str, float] = {}
    sets = [(PREFIX, result["overall"])] + [(f"{PREFIX}.{name}", m) for name, m in result["per_scenario"].items()]
    for prefix, metrics in sets:
        for key in _PER_SET:
            if metrics.get(key) is not None:
                out[f"{prefix}.{key}"] = float(metrics[key])
    for key in _SCENE:  # the classifier-free scene check (eval/scene_check.py)
        if (result.get("scene") or {}).get(key) is not None:
            out[f"{PREFIX}.scene.{key}"] = float(result["scene"][key])
    clf = result.get("classifier") or {}
    if clf.get("heldout_accuracy") is not None:
        out[f"{PREFIX}.classifier_heldout_accuracy"] = float(clf["heldout_accuracy"])
    for key, value in (result.get("label_survival") or {}).items():  # a condition transfer's, when asked
        if key in ("ap50_transferred", "ap50_original", "survival", "survival_all_boxes") and math.isfinite(value):
            out[f"{PREFIX}.label_survival.{key}"] = float(value)
    if result.get("layout_fidelity"):
        from drivedit.eval.fidelity import fidelity_metrics

        out.update(fidelity_metrics(result["layout_fidelity"], f"{PREFIX}.layout_fidelity"))
    return out


def target_run(fake_dir: str, run: str | None, tracking_uri: str | None) -> TrackedRun | None:
    """The run to log into: `run` (an id or a run directory) or the fake folder's own; None when neither."""
    if run is None:
        stored = stored_run(str(fake_dir))
        if stored is None:
            return None
    elif storage.exists(storage.join(run, RUN_ID_FILE)):
        stored = stored_run(run)
    else:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(f"--mlflow-run {run}: give --tracking-uri (or set MLFLOW_TRACKING_URI) to say which "
                             f"MLflow store holds the run, or pass a run directory holding {RUN_ID_FILE}")
        stored = {"run_id": run, "tracking_uri": uri, "experiment_id": ""}
    uri = absolute_tracking_uri(tracking_uri or stored["tracking_uri"])
    tracked = TrackedRun(uri, stored["run_id"], stored.get("experiment_id", ""))
    from mlflow.exceptions import MlflowException

    try:
        info = tracked.client.get_run(tracked.run_id).info
    except MlflowException as err:
        raise ValueError(f"MLflow run {tracked.run_id} not found in {uri} ({err.message.splitlines()[0]}); "
                         "check --mlflow-run / --tracking-uri, or pass --no-mlflow") from None
    if info.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow run {tracked.run_id} is deleted; restore it, name another with --mlflow-run, "
                         "or pass --no-mlflow")
    return tracked


def log_result(run: TrackedRun, result: dict, step: int = 0) -> dict[str, float]:
    """Log the result's metrics at `step` and the whole result as JSON; returns what was logged."""
    metrics = eval_metrics(result)
    run.log_metrics(metrics, step=step)
    run.set_tags({"drivedit.eval.real": result["real"]["dir"], "drivedit.eval.fake": result["fake"]["dir"],
                  "drivedit.eval.features": result["features"]["extractor"]})
    run.log_dict(result, f"{PREFIX}/result-{step}.json")
    return metrics
