"""The detection job on the shared local Ray: a run stopped after step 3, its rerun's worker killed after step 5,
resumes to the same step count in the same MLflow run; the detector is registered, its scores and figures logged, its saved predictions
rescore to the job's mAP with pycocotools' defaults, and --eval-only on the registered version reproduces
the job's validation scores."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from detect_support import job_dict, write_scenes


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect-job")
    return write_scenes(root / "train", 24, seed=0), write_scenes(root / "val", 8, seed=1), root


def test_stopped_run_resumes_registers_and_eval_only_reproduces(folders, ray_session):
    from mlflow import MlflowClient
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from drivedit import tracking
    from drivedit.config.base import ConfigError
    from drivedit.config.detect import DetectJob
    from drivedit.detect.job import main, run_detect
    from drivedit.train.preflight import latest_checkpoint

    train, val, root = folders
    cfg = job_dict(train, val, root / "runs", "resume", drill={"stop_at_step": 3})
    job = DetectJob.model_validate(cfg)
    with pytest.raises(RuntimeError, match="resume from step 3"):
        run_detect(job)
    run_dir = root / "runs" / "resume"
    assert latest_checkpoint(str(run_dir))["step"] == 3
    run_id = tracking.stored_run(str(run_dir))["run_id"]

    # a resumed run must be built the same way
    with pytest.raises(ConfigError, match="built differently"):
        run_detect(DetectJob.model_validate({**cfg, "model": {**cfg["model"], "arch": "fcos"}}))

    # the rerun's only worker is killed (SIGKILL) after step 5: Ray Train restarts it from the step-3 checkpoint
    rerun = DetectJob.model_validate({**cfg, "drill": {"kill_rank_at_step": 5, "kill_rank": 0},
                                      "run": {**cfg["run"], "max_failures": 1}})
    summary = run_detect(rerun)
    assert summary["step"] == 6 and summary["mlflow_run_id"] == run_id
    assert (run_dir / "drills" / "kill-5").is_file() and (run_dir / "drills" / "stop-3").is_file()
    # boxes of the scenes' other categories are dropped and counted per folder (the job is cars only)
    dropped = summary["label_reports"][str(train)]["unknown_categories"]
    assert set(dropped) <= {"truck", "bus", "pedestrian", "traffic light", "traffic sign"} and sum(dropped.values()) > 0
    assert summary["model_uri"] == "models:/drivedit-detect-resume/1"
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    # step 3 was not trained twice; steps 4-5, trained before the kill and again after it, logged nothing
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3, 6]
    logged = {f.path for f in client.list_artifacts(run_id, "scores")}
    assert {"scores/per_scenario.csv", "scores/pr_curve.png", "scores/predictions.json"} <= logged
    assert client.get_run(run_id).data.metrics["val/AP50"] == pytest.approx(summary["val"]["AP50"])

    scores = Path(summary["scores_uri"])
    coco = COCO(str(scores / "gt.json"))
    preds = json.loads((scores / "predictions.json").read_text())
    ev = COCOeval(coco, coco.loadRes(preds), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(summary["val"]["mAP"], abs=1e-9)
    assert ev.stats[1] == pytest.approx(summary["val"]["AP50"], abs=1e-9)

    assert main(["--eval-only", "--model.ref", summary["model_uri"], "--data.val", str(val),
                 "--run.storage_path", str(root / "runs"), "--run.name", "resume"]) == 0
    again = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    assert again["mAP"] == pytest.approx(summary["val"]["mAP"], abs=1e-9)
    assert again["per_scenario"].keys() == json.loads((scores / "metrics.json").read_text())["per_scenario"].keys()
