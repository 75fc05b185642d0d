"""Fine-tuning configs and preflight (no Ray): shipped configs validate, bad configs list every problem,
and the pieces of training state (lr, seeds, EMA, checkpoints) behave."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from drivedit.config.base import ConfigError, load_config
from drivedit.config.finetune import FinetuneJob
from drivedit.train import preflight
from drivedit.train import state as st
from finetune_support import SCENARIOS, job_dict, write_base_model, write_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftcfg")
    return write_base_model(root / "base.safetensors"), write_shards(root / "shards", rows_per_shard=12, num_shards=1)


@pytest.mark.parametrize("path", ["configs/demo/finetune.yaml", "configs/bdd100k/driveditfit-xl2.yaml"])
def test_shipped_configs_validate(path):
    job = load_config(FinetuneJob, REPO / path)
    assert job.optim.global_batch_size % (job.scaling.num_workers * job.optim.grad_accum_steps) == 0
    if "bdd100k" in path:  # the published DriveDiTFit recipe
        assert (job.model.name, job.optim.lr, job.optim.weight_decay, job.method.rank) == ("DiT-XL/2", 1e-5, 1e-2, 4)
        assert job.scaling.num_workers == 8 and job.scaling.use_gpu and job.optim.precision == "bf16"
        assert job.method.resolve().schedule == "progressive" and job.method.lambda_obj == 2.0
    else:
        # DDP over two one-thread workers: as fast as one two-thread worker alone, twice as fast on shared cores
        assert (job.scaling.num_workers, job.scaling.cpus_per_worker, job.scaling.use_gpu) == (2, 1, False)
        assert job.ray.num_cpus >= job.scaling.num_workers * job.scaling.cpus_per_worker + 1  # + Ray Data's reads
        assert job.tracking.registered_model == "drivedit-demo"


def test_bad_config_lists_every_problem(material, tmp_path):
    base, shards = material
    raw = job_dict(tmp_path / "no-shards", base, str(tmp_path / "runs"), "bad", model={"name": "DiT-T/2"},
                   method={"name": "magic"}, optim={"global_batch_size": 9})
    with pytest.raises(ConfigError) as err:
        preflight.check(raw, "bad.yaml")
    text = str(err.value)
    assert "4 problems" in text, text
    assert "method.name: Input should be 'full', 'bitfit'" in text  # unknown method, with the choices
    assert "not divisible by scaling.num_workers x optim.grad_accum_steps" in text
    assert "data.shards: no latent shards" in text  # missing shards
    assert "not the configured model.name DiT-T/2" in text and "depth 6 (configured) vs 2 (checkpoint)" in text


def test_base_with_missing_keys_and_wrong_shapes_is_refused_up_front(material, tmp_path):
    """What the workers would refuse after Ray Train started is refused by preflight, every key and shape listed
    (together with the other problems of the config)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, shards = material
    with safe_open(str(base), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(base))
    del state["blocks.1.mlp.fc2.bias"], state["final_layer.linear.bias"]
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:-3]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata=metadata)
    raw = job_dict(shards, broken, str(tmp_path / "runs"), "broken", method={"name": "magic"})
    with pytest.raises(ConfigError) as err:
        preflight.check(raw, "broken.yaml")
    text = str(err.value)
    assert "2 problems" in text and "method.name" in text, text
    assert f"model.source: checkpoint {broken}" in text
    assert "missing: blocks.1.mlp.fc2.bias, final_layer.linear.bias" in text
    assert "blocks.0.attn.qkv.weight checkpoint (" in text and "vs model (" in text


def test_unreachable_and_malformed_s3_uris_are_config_errors(material, tmp_path, monkeypatch):
    """botocore's own errors (no endpoint, a bucket name S3 refuses) are config errors naming the field, with the
    other problems, instead of tracebacks."""
    from drivedit import storage

    base, shards = material
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setattr(storage, "_S3_CACHE", {})
    raw = job_dict("s3://Bad!Bucket/shards", base, "s3://unreachable-bucket/runs", "s3", method={"name": "magic"},
                   tracking={"tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(ConfigError) as err:
        preflight.check(raw, "s3.yaml")
    text = str(err.value)
    assert "3 problems" in text and "method.name" in text, text
    assert "data.shards: cannot " in text and "s3://Bad!Bucket/shards" in text and "ParamValidationError" in text
    assert "run.storage_path: cannot read s3://unreachable-bucket/runs/s3" in text and "EndpointConnectionError" in text


def test_resume_with_other_vocabulary_and_rank_refused(material, tmp_path):
    base, shards = material
    storage = tmp_path / "runs"
    ckpt = storage / "res" / st.checkpoint_dir_name(4)
    ckpt.mkdir(parents=True)
    old = job_dict(shards, base, str(storage), "res")
    meta = {"step": 4, "scenarios": ["clear", "rainy", "snowy"], "method": FinetuneJob.model_validate(old).method
            .model_dump(mode="json"), "model": {"source": str(base)}}
    (ckpt / st.META_FILE).write_text(json.dumps(meta))
    raw = job_dict(shards, base, str(storage), "res", method={"rank": 0}, optim={"global_batch_size": 7},
                   drill={"stop_at_step": 2})
    with pytest.raises(ConfigError) as err:
        preflight.check(raw)
    problems = err.value.problems
    assert any("method.rank must be >= 1, got 0" in p for p in problems)
    assert any("scenario vocabulary" in p and str(SCENARIOS) in p and "rainy" in p for p in problems)
    assert any("not divisible" in p for p in problems)
    assert any("drill.stop_at_step (2) comes before the first checkpoint" in p for p in problems)
    assert len(problems) == 4, problems
    # the same run with a valid config resumes (preflight finds the checkpoint), unless the method changes
    with pytest.raises(ConfigError, match="the method differs from the run being resumed"):
        meta["scenarios"] = SCENARIOS
        (ckpt / st.META_FILE).write_text(json.dumps(meta))
        preflight.check(job_dict(shards, base, str(storage), "res", method={"rank": 3}))
    plan = preflight.check(job_dict(shards, base, str(storage), "res"))
    assert plan.latest["step"] == 4 and plan.base_config.depth == 2


def test_cross_field_checks():
    raw = {"data": {"shards": "x"}, "optim": {"total_steps": 10, "global_batch_size": 8, "precision": "bf16",
                                              "warmup_steps": 10},
           "model": {"compile": True}, "run": {"storage_path": "s3://b/runs", "name": "a b"},
           "drill": {"kill_rank_at_step": 3, "kill_rank": 5}}
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneJob, data=raw)
    text = str(err.value)
    for needle in ("warmup_steps (10) must be below total_steps", "must be letters, digits"):
        assert needle in text, text
    raw["optim"].pop("warmup_steps")
    raw["run"]["name"] = "ok"
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneJob, data=raw)
    text = str(err.value)
    for needle in ("model.compile needs GPU workers", "bf16 needs GPU workers", "set tracking.tracking_uri",
                   "drill.kill_rank 5 does not exist", "comes before the first checkpoint"):
        assert needle in text, text


def test_lr_schedule_seeds_and_ema():
    # linear warmup to the peak, then cosine to the floor
    f = [st.lr_factor(s, 4, 14, "cosine", 0.1) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert f[13] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert st.lr_factor(100, 0, 14, "constant", 0.0) == 1.0
    seeds = {st.step_seed(0, r, s, m) for r in range(4) for s in range(50) for m in range(2)}
    assert len(seeds) == 400 and st.step_seed(3, 1, 7) == st.step_seed(3, 1, 7)

    p = {"w": torch.nn.Parameter(torch.zeros(3))}
    ema = st.EMA(p, decay=0.9)
    with torch.no_grad():
        p["w"].fill_(1.0)
    ema.update(p)
    ema.update(p)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 1 - 0.9**2))
    raw = ema.swap_into(p)
    assert torch.allclose(p["w"], ema.shadow["w"])
    st.EMA.restore(p, raw)
    assert torch.equal(p["w"], torch.ones(3))


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = st.build_scheduler(opt, 2, 10, "cosine", 0.0)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    state = st.TrainState(7, dict(model.named_parameters()), {k: v * 2 for k, v in model.named_parameters()},
                          opt.state_dict(), sched.state_dict(), {"epoch": 1, "batches_in_epoch": 3},
                          {"scenarios": ["a"]})
    st.save_state(tmp_path / "c", state)
    back = st.load_state(tmp_path / "c")
    assert back.step == 7 and back.data == {"epoch": 1, "batches_in_epoch": 3}
    assert back.meta["scenarios"] == ["a"] and back.meta["step"] == 7
    assert torch.equal(back.ema["weight"], model.weight.detach() * 2)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(back.optimizer)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    (tmp_path / "c" / st.EMA_FILE).unlink()
    with pytest.raises(ValueError, match="incomplete.*ema.safetensors"):
        st.load_state(tmp_path / "c")


def test_relative_paths_become_absolute_for_the_workers(material, tmp_path, monkeypatch):
    # Ray Train runs each worker in its run directory, so the driver must hand it absolute paths
    base, shards = material
    monkeypatch.chdir(shards.parent)
    plan = preflight.check(job_dict(Path(shards.name), Path(base.name), "runs", "rel"))
    assert plan.job.data.shards == str(shards)
    assert plan.job.run.storage_path == str(shards.parent / "runs")
    assert plan.base_path == base and plan.base_path.is_absolute()
    assert plan.run_dir == str(shards.parent / "runs" / "rel")
