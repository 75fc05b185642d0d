"""`drivedit eval` logs its numbers into MLflow (unit: no Ray; SQLite store): by default into the run that
generated the fake folder, or into `--mlflow-run`; the values read back from the store are the result's,
per scenario; and a progress bar shows feature extraction."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from mlflow import MlflowClient
from test_eval_folders import _as_generated

from drivedit import tracking
from drivedit.config.common import DEFAULT_SCENARIOS
from drivedit.data.scenes import write_scenes_dataset
from drivedit.eval.cli import main as eval_main
from drivedit.data.bdd100k import load_label_file
from drivedit.eval.classifier import ScenarioCNN, ScenarioClassifier
from drivedit.eval.folders import vocabulary_for
from drivedit.eval.mlflow_log import eval_metrics


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmlflow")
    write_scenes_dataset(str(root / "real"), 48, size=32, seed=0)
    write_scenes_dataset(str(root / "scenes1"), 36, size=32, seed=1)
    _as_generated(root / "scenes1", root / "fake")
    # an untrained classifier: these tests are about logging, not about its accuracy (test_eval_folders is)
    torch.manual_seed(0)
    ScenarioClassifier(model=ScenarioCNN(len(DEFAULT_SCENARIOS), 8).eval(), vocabulary=list(DEFAULT_SCENARIOS),
                       image_size=32, width=8, heldout_accuracy=0.5, num_heldout=10, num_train=40).save(root / "clf")
    return root


def _eval(folders, *extra) -> tuple[int, str, str, dict]:
    out, err = io.StringIO(), io.StringIO()
    result_path = folders / f"result-{len(extra)}.json"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = eval_main(["--real", str(folders / "real"), "--fake", str(folders / "fake"), "--classifier",
                        str(folders / "clf"), "--kid-subsets", "5", "--json", str(result_path), *extra])
    result = json.loads(result_path.read_text()) if rc == 0 else {}
    return rc, out.getvalue(), err.getvalue(), result


def _logged(uri: str, run_id: str) -> dict[str, tuple[float, int]]:
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    return {k: (v, client.get_metric_history(run_id, k)[-1].step) for k, v in metrics.items() if k.startswith("eval.")}


def test_eval_logs_into_the_run_that_generated_the_fake_folder(folders, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gen = tracking.start_run(uri, "generate", "generate-x", storage_dir=str(folders / "fake"))
    try:
        rc, printed, err, result = _eval(folders)
    finally:
        (folders / "fake" / tracking.RUN_ID_FILE).unlink()
    assert rc == 0 and f"to MLflow run {gen.run_id}" in printed
    # the progress bar of both feature passes, counted in images
    n_real, n_fake = result["real"]["num_images"], result["fake"]["num_images"]
    assert "real features: 100%" in err and f"{n_real}/{n_real}" in err
    assert "generated features: 100%" in err and f"{n_fake}/{n_fake}" in err

    logged = _logged(uri, gen.run_id)
    overall = result["overall"]
    for key in ("fid", "kid", "precision", "recall", "condition_accuracy"):
        assert logged[f"eval.{key}"] == (pytest.approx(overall[key]), 0)
    assert set(result["per_scenario"]) == set(DEFAULT_SCENARIOS)
    for name, m in result["per_scenario"].items():
        for key in ("fid", "kid", "precision", "recall", "condition_accuracy", "num_fake"):
            if m[key] is not None:
                assert logged[f"eval.{name}.{key}"][0] == pytest.approx(m[key]), (name, key)
            else:
                assert f"eval.{name}.{key}" not in logged  # too few images: not logged as a number
    assert set(logged) == set(eval_metrics(result))
    # the classifier-free scene check (eval/scene_check.py) goes to the run as well
    assert logged["eval.scene.layout_agreement"][0] == pytest.approx(result["scene"]["layout_agreement"])
    assert logged["eval.scene.layout_fd"][0] == pytest.approx(result["scene"]["layout_fd"])
    kept, _ = vocabulary_for(DEFAULT_SCENARIOS).split(load_label_file(str(folders / "fake" / "labels.json")))
    assert logged["eval.rainy.num_fake"][0] == sum(sid == DEFAULT_SCENARIOS.index("rainy") for _, sid in kept) > 0
    client = MlflowClient(uri)
    run = client.get_run(gen.run_id)
    assert run.data.tags["drivedit.eval.fake"] == str(folders / "fake")
    assert {f.path for f in client.list_artifacts(gen.run_id, "eval")} == {"eval/result-0.json"}


def test_mlflow_run_by_id_or_directory_and_bad_runs(folders, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    by_id = tracking.start_run(uri, "finetune", "ft")
    rc, printed, _, result = _eval(folders, "--mlflow-run", by_id.run_id, "--tracking-uri", uri, "--step", "400")
    assert rc == 0
    logged = _logged(uri, by_id.run_id)
    assert logged["eval.fid"] == (pytest.approx(result["overall"]["fid"]), 400)

    run_dir = tmp_path / "run"
    by_dir = tracking.start_run(uri, "finetune", "ft2", storage_dir=str(run_dir))
    assert _eval(folders, "--mlflow-run", str(run_dir))[0] == 0
    assert _logged(uri, by_dir.run_id)["eval.recall"][0] == pytest.approx(result["overall"]["recall"])

    rc, _, err, _ = _eval(folders, "--mlflow-run", "0123456789abcdef", "--tracking-uri", uri)
    assert rc == 2 and "MLflow run 0123456789abcdef not found" in err
    rc, _, err, _ = _eval(folders, "--mlflow-run", "0123456789abcdef")
    assert rc == 2 and "--tracking-uri" in err


def test_layout_fidelity_is_reported_and_logged(folders, tmp_path):
    from test_eval_fidelity import LARGE, SMALL, _write

    _write(tmp_path / "real", [("r0.png", "clear", [SMALL, LARGE])], found={(0, 0), (0, 1)})
    _write(tmp_path / "gen", [("g0.png", "clear", [LARGE]), ("g1.png", "night", [LARGE])], found={(0, 0)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gen = tracking.start_run(uri, "generate", "generate-x", storage_dir=str(folders / "fake"))
    try:
        rc, printed, _, result = _eval(folders, "--generated-scores", str(tmp_path / "gen"),
                                       "--real-scores", str(tmp_path / "real"))
    finally:
        (folders / "fake" / tracking.RUN_ID_FILE).unlink()
    assert rc == 0
    lf = result["layout_fidelity"]
    assert lf["fidelity"] == pytest.approx(51 / 101, abs=1e-6)  # 1 of the 2 generated boxes found
    assert f"layout fidelity: AP50 {lf['ap50_generated']:.3f} on 2 generated frames / 1.000 on 1 real frames" in printed
    logged = _logged(uri, gen.run_id)
    assert logged["eval.layout_fidelity.fidelity"] == (pytest.approx(lf["fidelity"]), 0)
    assert logged["eval.layout_fidelity.night.fidelity"][0] == 0.0
    assert logged["eval.layout_fidelity.clear.fidelity"][0] == pytest.approx(1.0)
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as err:
        eval_main(["--real", str(folders / "real"), "--fake", str(folders / "fake"),
                   "--generated-scores", str(tmp_path / "gen")])
    assert stop.value.code == 2 and "needs both --generated-scores and --real-scores" in err.getvalue()
