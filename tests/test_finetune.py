"""The fine-tuning job on the shared local Ray, as a cluster runs it: two CPU workers (gloo), checkpoints on
S3 (the loopback moto server), MLflow as a real `mlflow server` (SQLite backend, artifacts proxied to S3).

One run goes through everything a user can live through: a worker is killed mid-run (max_failures 1:
Ray Train restarts it from the last checkpoint on its own), then the job is stopped; rerunning it with
the same name continues to the configured step count, in the same MLflow run, and registers the bundle.
"""
from __future__ import annotations

import pytest
import torch

from drivedit import storage, tracking
from drivedit.config.base import validate_config
from drivedit.config.finetune import FinetuneJob
from finetune_support import SCENARIOS, job_dict, write_base_model, write_shards

TOTAL = 16


@pytest.fixture(scope="module")
def finished_run(s3_server, mlflow_server, ray_session, tmp_path_factory):
    """Run 1: rank 1 killed after step 6 (restarted by Ray), stopped after step 10. Run 2: the rerun."""
    import boto3

    root = tmp_path_factory.mktemp("finetune")
    base = write_base_model(root / "base.safetensors")
    shards = write_shards(root / "shards")
    bucket = "finetune-runs"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    storage_path = f"s3://{bucket}/runs"
    tracking_uri = mlflow_server.url
    raw = job_dict(shards, base, storage_path, "cluster-run",
                   data={"materialize": True},
                   optim={"total_steps": TOTAL, "lr": 2e-2},
                   run={"max_failures": 1},
                   tracking={"tracking_uri": tracking_uri, "registered_model": "drivedit-test"},
                   sampling={"every_steps": 8},
                   drill={"kill_rank_at_step": 6, "kill_rank": 1, "stop_at_step": 10})
    job = validate_config(FinetuneJob, raw)
    from drivedit.train.trainer import run_finetune

    mlflow_server.ready()
    with pytest.raises(RuntimeError, match=r"rerun with the same run.name and storage to resume from step 8"):
        run_finetune(job)
    summary = run_finetune(job)  # the same config: drills already fired, the run resumes at step 8
    return {"summary": summary, "job": job, "base": base, "root": root, "tracking_uri": tracking_uri,
            "artifact_bucket": mlflow_server.bucket, "bucket": bucket}


def test_resumed_run_finishes_in_one_mlflow_run(finished_run):
    s, job = finished_run["summary"], finished_run["job"]
    assert s["step"] == TOTAL and s["scenarios"] == SCENARIOS and s["model_uri"] == "models:/drivedit-test/1"
    run_dir = s["run_dir"]
    # both drills fired, once each
    assert storage.exists(storage.join(run_dir, "drills", "kill-6"))
    assert storage.exists(storage.join(run_dir, "drills", "stop-10"))
    # checkpoints on S3: only the newest two are kept
    names = {u.split("/")[-2] for u in storage.list_files(run_dir, suffixes=["meta.json"]) if "/step_" in u}
    assert names == {"step_00000012", "step_00000016"}
    for f in ("trainable.safetensors", "ema.safetensors", "state.pt", "bundle/bundle.json"):
        assert storage.exists(storage.join(run_dir, "step_00000016", f)), f
    for f in ("bundle/bundle.json", "bundle/adapter.safetensors", "result.json", "samples/step_00000008.png",
              "samples/step_00000016.png", "method/report.json", "mlflow_run.json"):
        assert storage.exists(storage.join(run_dir, f)), f

    client = tracking.TrackedRun(finished_run["tracking_uri"], s["mlflow_run_id"], "0").client
    runs = client.search_runs([client.get_experiment_by_name("test-finetune").experiment_id],
                              "attributes.run_name = 'cluster-run'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["method.name"] == "driveditfit"
    assert run.data.params["run.storage_path"] == job.run.storage_path
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [m.step for m in history]
    assert max(steps) == TOTAL
    # steps 5-6 ran before the kill and again after Ray's restart from step 4, steps 9-10 before the stop and
    # again in the rerun that resumed from step 8: one run holds all of it, each logged step once
    assert sorted(steps) == list(range(2, TOTAL + 1, 2)), steps
    by_step = {m.step: m.value for m in history}
    assert by_step[TOTAL] < 0.9 * by_step[2], by_step  # the loss falls
    for name in ("lr", "images_per_s", "peak_mem_gib", "grad_norm"):
        assert client.get_metric_history(run.info.run_id, name)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "bundle")}
    assert artifacts == {"bundle/adapter.safetensors", "bundle/bundle.json"}
    samples = {f.path for f in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_00000008.png", "samples/step_00000016.png"} <= samples
    # and MLflow images under one key at their steps (the UI's step slider), through the server onto S3
    logged = tracking.TrackedRun(finished_run["tracking_uri"], run.info.run_id, "0").logged_images("samples")
    assert {8, 16} <= set(logged)
    assert {f.path for f in client.list_artifacts(run.info.run_id, "method")} == {"method/report.json"}
    # the artifacts live on S3 behind the tracking server
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=finished_run["artifact_bucket"])["Contents"]]
    assert any(k.endswith("bundle/adapter.safetensors") for k in keys)


def test_registered_bundle_equals_last_checkpoint(finished_run, tmp_path):
    """merge(base, bundle) == the adapted model holding the last checkpoint's EMA tensors."""
    from drivedit.models.adapter_spec import AdapterSpec, apply_spec
    from drivedit.models.bundle import load_bundle, merge
    from drivedit.models.checkpoint import load_dit
    from drivedit.train import state as st

    s = finished_run["summary"]
    local = tracking.download_registered_bundle(s["model_uri"], tmp_path / "bundle",
                                                tracking_uri=finished_run["tracking_uri"])
    bundle = load_bundle(local)
    assert bundle.info.extra["weights"] == "ema" and bundle.info.extra["step"] == TOTAL
    assert bundle.scenarios == SCENARIOS and bundle.info.method["name"] == "driveditfit"
    assert bundle.info.schedule["kind"] == "linear" and len(bundle.betas) == 1000
    merged = merge(load_dit(finished_run["base"]), bundle)
    assert merged.config.num_classes == len(SCENARIOS)

    ckpt = tmp_path / "ckpt"
    storage.download_dir(s["checkpoint_uri"], str(ckpt))
    state = st.load_state(ckpt)
    assert state.step == TOTAL and state.meta["scenarios"] == SCENARIOS
    adapted = apply_spec(load_dit(finished_run["base"]), AdapterSpec.from_dict(state.meta["spec"]))
    values = {**state.trainable, **state.ema}  # EMA of the trainable tensors, the table from the adapter file
    params = dict(adapted.named_parameters())
    with torch.no_grad():
        for name, v in values.items():
            params[name].copy_(v)
    adapted.eval()
    torch.manual_seed(0)
    x, t = torch.randn(6, 3, 16, 16), torch.tensor([0, 10, 100, 400, 700, 999])
    y = torch.tensor([0, 1, 2, 0, 1, len(SCENARIOS)])  # the null row too
    with torch.no_grad():
        assert torch.allclose(merged(x, t, y), adapted(x, t, y), atol=1e-5)
        # and the EMA is not the raw weights: the bundle follows the configured choice
        raw = apply_spec(load_dit(finished_run["base"]), AdapterSpec.from_dict(state.meta["spec"]))
        rp = dict(raw.named_parameters())
        for name, v in state.trainable.items():
            rp[name].copy_(v)
        assert not torch.allclose(merged(x, t, y), raw.eval()(x, t, y), atol=1e-5)


def test_rerun_of_finished_job_returns_its_record(finished_run):
    from drivedit.train.trainer import run_finetune

    again = run_finetune(finished_run["job"])
    assert again["already_complete"] and again["model_uri"] == finished_run["summary"]["model_uri"]
