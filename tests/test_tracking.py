"""drivedit.tracking on the embedded SQLite store: params without secrets, one run across restarts,
registered bundles and their download; on the session's tracking server: no credential in any param, tag,
file or printed line. (The fine-tuning job's tracking-server + S3 path runs in test_finetune.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from drivedit import tracking


def test_config_params_flatten_and_drop_secrets():
    cfg = {"optim": {"lr": 1e-4, "adam_betas": [0.9, 0.99]},
           "tracking": {"tracking_uri": "http://alice:hunter2@mlflow:5000", "api_key": "sk-123"},
           "storage": {"aws_secret_access_key": "abc", "password": "pw", "name": "run"}}
    params = tracking.config_params(cfg)
    assert params["optim.lr"] == "0.0001"
    assert params["optim.adam_betas"] == "[0.9, 0.99]"
    assert params["tracking.tracking_uri"] == "http://alice:***@mlflow:5000"
    assert params["storage.name"] == "run"
    for secret in ("tracking.api_key", "storage.aws_secret_access_key", "storage.password"):
        assert secret not in params
    assert not any("hunter2" in v or "sk-123" in v or v == "abc" for v in params.values())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for the module: creating an MLflow SQLite database takes seconds."""
    root = tmp_path_factory.mktemp("store")
    return root, tracking.resolve_tracking_uri(None, str(root / "runs"))


def test_run_survives_restart_and_registers_bundle(store, tmp_path):
    root, uri = store
    storage_dir = str(root / "runs")
    run_dir = f"{storage_dir}/job-a"
    assert uri == f"sqlite:///{(root / 'runs' / 'mlflow.db').resolve()}"

    run = tracking.start_run(uri, "exp", "job-a", storage_dir=run_dir, params={"optim.lr": "0.001", "a.b": "1"})
    assert not run.resumed
    stored = json.loads((root / "runs" / "job-a" / tracking.RUN_ID_FILE).read_text())
    assert stored["run_id"] == run.run_id and stored["tracking_uri"] == uri
    run.log_metrics({"loss": 1.0}, step=1)
    run.end("FAILED")

    # a restart (or a rerun with the same name) logs into the same run, even with a changed param
    again = tracking.start_run(uri, "exp", "job-a", storage_dir=run_dir, params={"optim.lr": "0.002", "c": "3"})
    assert again.resumed and again.run_id == run.run_id
    again.log_metrics({"loss": 0.5}, step=2)
    data = again.client.get_run(run.run_id).data
    assert data.params["optim.lr"] == "0.001" and data.params["c"] == "3"
    assert "optim.lr=0.002" in data.tags["drivedit.changed_params"]
    history = again.client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert again.client.get_run(run.run_id).info.status == "RUNNING"

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text('{"method": "driveditfit"}')
    (bundle / "adapter.safetensors").write_bytes(b"\x00" * 64)
    again.log_artifacts(bundle, "bundle")
    assert set(again.list_artifacts("bundle")) == {"bundle/bundle.json", "bundle/adapter.safetensors"}
    # artifacts of the embedded store live beside the database, not in the working directory
    assert again.artifact_uri().startswith((root / "runs" / "mlartifacts").as_uri())
    first = again.register("bundle", "drive-model")
    second = again.register("bundle", "drive-model")
    assert (first, second) == ("models:/drive-model/1", "models:/drive-model/2")
    again.end()
    assert again.client.get_run(run.run_id).info.status == "FINISHED"
    # only one run was ever created
    assert len(again.client.search_runs([run.experiment_id], "attributes.run_name = 'job-a'")) == 1

    local = tracking.download_registered_bundle("models:/drive-model/2", tmp_path / "dl", tracking_uri=uri)
    assert (local / "bundle.json").read_text() == '{"method": "driveditfit"}'
    assert (local / "adapter.safetensors").read_bytes() == b"\x00" * 64
    latest = tracking.download_registered_bundle("models:/drive-model/latest", tracking_uri=uri)
    assert (latest / "bundle.json").is_file()

    with pytest.raises(ValueError, match=r"registered versions of drive-model: \[1, 2\]"):
        tracking.download_registered_bundle("models:/drive-model/7", tracking_uri=uri)
    with pytest.raises(ValueError, match="no model named 'nope' is registered"):
        tracking.download_registered_bundle("models:/nope/1", tracking_uri=uri)
    with pytest.raises(ValueError, match="models:/NAME/VERSION"):
        tracking.download_registered_bundle("runs:/abc/bundle", tracking_uri=uri)


def test_run_dir_with_other_tracking_uri_is_refused(store, tmp_path):
    root, uri = store
    run_dir = str(root / "runs" / "job-b")
    tracking.start_run(uri, "exp", "job-b", storage_dir=run_dir)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(ValueError, match="rerun with the same tracking.tracking_uri or a new run.name"):
        tracking.start_run(other, "exp", "job", storage_dir=run_dir)


def test_embedded_store_needs_local_storage():
    with pytest.raises(ValueError, match="set tracking.tracking_uri to an MLflow server"):
        tracking.resolve_tracking_uri(None, "s3://bucket/runs")


SECRETS = ("hunter2", "sig123", "pw456", "tok789", "tok000", "pw111")


@pytest.fixture(scope="module")
def server_with_password(mlflow_server):
    """The session's tracking server (a REST store: MLflow prints "View run at" lines for it), reached through
    a URI carrying a user and password (the server has no auth and ignores them)."""
    return mlflow_server.ready().replace("http://", "http://alice:hunter2@")


def test_no_credential_in_files_params_tags_or_printed_lines(server_with_password, tmp_path, capsys):
    uri = server_with_password
    run_dir = str(tmp_path / "run")
    params = tracking.config_params({"data": {"inputs": ["s3://b/a?X-Amz-Signature=sig123", "http://bob:pw456@h/x"]},
                                     "tracking": {"tracking_uri": uri}})
    run = tracking.start_run(uri, "exp-pw", "r", storage_dir=run_dir, params=params,
                             tags={"drivedit.output": "http://carol:tok789@h/out"})
    run.set_tags({"drivedit.run_dir": "https://h/x?token=tok000", "drivedit.model_ref": uri})
    run.log_params({"extra": "http://dave:pw111@h"})
    run.log_dict({"output": "http://dave:pw111@h/o"}, "summary.json")
    run.end()
    printed = capsys.readouterr().out
    assert "View run" in printed and "alice:***@" in printed  # MLflow's line, redacted

    data = run.client.get_run(run.run_id).data
    values = list(data.params.values()) + list(data.tags.values())
    assert data.params["data.inputs"] == '["s3://b/a?X-Amz-Signature=***", "http://bob:***@h/x"]'
    assert data.tags["drivedit.model_ref"].startswith("http://alice:***@127.0.0.1")
    summary = json.loads((Path(run.client.download_artifacts(run.run_id, "summary.json", str(tmp_path)))).read_text())
    files = [p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file()]
    for text in values + files + [printed, json.dumps(summary)]:
        assert not any(s in text for s in SECRETS), text
    # the stored (redacted) tracking URI still reopens the run
    again = tracking.start_run(uri, "exp-pw", "r", storage_dir=run_dir)
    assert again.resumed and again.run_id == run.run_id
    again.end()
