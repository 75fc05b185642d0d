"""ServeApp validation, the request schema built from it, and the Serve config file we ship (no Ray)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from drivedit.config.base import ConfigError, load_config
from drivedit.config.serve import ServeApp
from drivedit.serve.schemas import MAX_SEED, request_model

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(ServeApp, ROOT / "configs/demo/serve.yaml", ["--sampler.max_images", "4", "--http.port=9001"])
    assert cfg.sampler.max_images == 4 and cfg.http.port == 9001
    assert cfg.batching.max_batch_size >= cfg.sampler.max_images
    assert cfg.deployment.max_queued_requests >= 0  # bounded queue: never -1


def test_every_problem_is_listed_at_once():
    bad = {
        "model": {"ref": "x"},
        "sampler": {"min_steps": 10, "max_steps": 20, "default_steps": 50, "default_sampler": "ddpm",
                    "samplers": ["ddim"], "min_guidance": 5.0, "max_guidance": 2.0, "max_images": 8,
                    "max_image_steps": 30},
        "batching": {"enabled": True, "max_batch_size": 4},
        "deployment": {"max_ongoing_requests": 1, "min_replicas": 3, "max_replicas": 2},
    }
    with pytest.raises(ConfigError) as e:
        load_config(ServeApp, data=bad)
    text = str(e.value)
    for needle in ["default_steps (50) must lie in [min_steps, max_steps] = [10, 20]",
                   "default_sampler 'ddpm' is not in sampler.samplers",
                   "min_guidance (5.0) is above sampler.max_guidance (2.0)",
                   "max_batch_size (4) is below sampler.max_images (8)",
                   "max_ongoing_requests must be >= 2",
                   "min_replicas (3) is above deployment.max_replicas (2)"]:
        assert needle in text, (needle, text)


def test_field_errors_are_listed_together():
    bad = {"model": {"ref": "x", "device": "tpu"}, "sampler": {"max_images": 0}, "htp": {},
           "deployment": {"max_queued_requests": -1}}
    with pytest.raises(ConfigError) as e:
        load_config(ServeApp, data=bad)
    problems = e.value.problems
    assert len(problems) == 4, problems
    for prefix in ["model.device:", "sampler.max_images:", "htp: unknown field", "deployment.max_queued_requests:"]:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)


def test_model_ref_is_required():
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(ServeApp, data={})


def test_request_schema_carries_config_bounds_and_vocabulary():
    cfg = load_config(ServeApp, data={"model": {"ref": "x"}, "sampler": {
        "max_images": 6, "min_steps": 2, "max_steps": 90, "default_steps": 30, "min_guidance": 1.0,
        "max_guidance": 7.5, "samplers": ["ddim"], "max_image_steps": 200}})
    schema = request_model(cfg, SCENARIOS).model_json_schema()
    p = schema["properties"]
    assert p["scenario"]["enum"] == SCENARIOS and schema["required"] == ["scenario"]
    assert (p["num_images"]["minimum"], p["num_images"]["maximum"]) == (1, 6)
    assert (p["steps"]["minimum"], p["steps"]["maximum"], p["steps"]["default"]) == (2, 90, 30)
    assert (p["guidance"]["minimum"], p["guidance"]["maximum"]) == (1.0, 7.5)
    assert p["sampler"].get("enum", [p["sampler"].get("const")]) == ["ddim"]  # one choice: a const
    assert p["seed"]["anyOf"][0]["maximum"] == MAX_SEED
    assert "200" in p["num_images"]["description"]  # the compute budget is documented
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("body, field", [
    ({"scenario": "foggy"}, "scenario"),
    ({"scenario": "snowy", "num_images": 0}, "num_images"),
    ({"scenario": "snowy", "num_images": 9}, "num_images"),
    ({"scenario": "snowy", "steps": 251}, "steps"),
    ({"scenario": "snowy", "guidance": 0.5}, "guidance"),
    ({"scenario": "snowy", "num_images": "2"}, "num_images"),  # strict: a string is not an integer
    ({"scenario": "snowy", "num_images": True}, "num_images"),
    ({"scenario": "snowy", "seed": -1}, "seed"),
    ({"scenario": "snowy", "sampler": "euler"}, "sampler"),
    ({"scenario": "snowy", "model": "models:/other/1"}, "model"),  # the model is the operator's, never the caller's
])
def test_request_validation_names_the_field(body, field):
    model = request_model(load_config(ServeApp, data={"model": {"ref": "x"}}), SCENARIOS)
    with pytest.raises(Exception) as e:
        model.model_validate_json(json.dumps(body))
    assert [err["loc"][0] for err in e.value.errors()] == [field]


def test_integers_written_as_floats_are_accepted_as_the_schema_says():
    """JSON Schema's `integer` counts 2.0 as an integer: the published schema says integer, so 2.0 is taken
    (and means 2); a fraction, a string or a bool is still refused naming the field."""
    model = request_model(load_config(ServeApp, data={"model": {"ref": "x"}}), SCENARIOS)
    req = model.model_validate_json('{"scenario": "snowy", "num_images": 2.0, "steps": 4.0, "seed": 7.0}')
    assert (req.num_images, req.steps, req.seed) == (2, 4, 7)
    assert all(type(v) is int for v in (req.num_images, req.steps, req.seed))
    for body, field in [('{"scenario": "snowy", "steps": 2.5}', "steps"),
                        ('{"scenario": "snowy", "seed": 7.5}', "seed"),
                        ('{"scenario": "snowy", "seed": -1.0}', "seed"),
                        ('{"scenario": "snowy", "num_images": 1e300}', "num_images")]:
        with pytest.raises(Exception) as e:
            model.model_validate_json(body)
        assert [err["loc"][0] for err in e.value.errors()] == [field], body
    p = model.model_json_schema()["properties"]
    assert p["steps"]["type"] == "integer" and p["seed"]["anyOf"][0]["minimum"] == 0


def test_serve_config_file_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "configs/serve/serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "drivedit.serve.app:app_builder"
    from drivedit.serve.app import config_from_args

    cfg = config_from_args(app.args)  # the args resolve to a valid ServeApp (paths relative to the repo root)
    assert cfg.model.ref


def test_config_from_args_merges_sections_over_the_file(tmp_path):
    from drivedit.serve.app import config_from_args

    f = tmp_path / "serve.yaml"
    f.write_text(yaml.safe_dump({"model": {"ref": "a", "device": "cpu"}, "sampler": {"max_images": 2}}))
    cfg = config_from_args({"config": str(f), "model": {"ref": "b"}, "batching": {"max_batch_size": 3}})
    assert (cfg.model.ref, cfg.model.device, cfg.sampler.max_images, cfg.batching.max_batch_size) == ("b", "cpu", 2, 3)
    with pytest.raises(ConfigError, match="file not found"):
        config_from_args({"config": str(tmp_path / "missing.yaml")})


def test_cli_check_prints_the_resolved_config(capsys):
    from drivedit.cli import main

    assert main(["serve", "--config", str(ROOT / "configs/demo/serve.yaml"), "--check", "--http.port", "8123"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["http"]["port"] == 8123 and printed["model"]["ref"].startswith("models:/")


def test_cli_refuses_a_bad_config_listing_the_problems(tmp_path, capsys):
    from drivedit.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"ref": "x"}, "sampler": {"max_images": 0}, "http": {"port": 0}}))
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sampler.max_images" in err and "http.port" in err


def test_cli_help_lists_every_field(capsys):
    from drivedit.serve.app import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ["--model.ref", "--sampler.max_image_steps", "--batching.max_batch_size",
                 "--deployment.max_queued_requests", "--deployment.gpus_per_replica", "--http.max_body_bytes"]:
        assert flag in out, flag


def test_jobs_entry_point_runs_as_a_script():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "jobs/serve.py"), "--config",
                          str(ROOT / "configs/demo/serve.yaml"), "--check"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["app_name"] == "drivedit"


def test_cli_detach_needs_a_running_cluster(monkeypatch, capsys):
    from drivedit.serve.app import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["--config", str(ROOT / "configs/demo/serve.yaml"), "--detach"]) == 2
    assert "--detach needs a running Ray cluster" in capsys.readouterr().err


def test_relative_local_refs_become_absolute_before_replicas_see_them(tmp_path, monkeypatch):
    from drivedit.serve.app import absolute_local_refs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "vae").mkdir()
    cfg = load_config(ServeApp, data={"model": {"ref": "bundle", "tracking_uri": "sqlite:///runs/mlflow.db",
                                                "codec": {"kind": "autoencoder_kl", "source": "vae"}}})
    out = absolute_local_refs(cfg)
    assert out.model.ref == str(tmp_path / "bundle")
    assert out.model.tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert out.model.codec.source == str(tmp_path / "vae")
    assert cfg.model.ref == "bundle"  # the caller's config is left alone
    for ref in ("models:/m/1", "s3://b/bundle", "builtin:tiny-dit"):
        assert absolute_local_refs(cfg.model_copy(update={"model": cfg.model.model_copy(update={"ref": ref})})
                                   ).model.ref == ref


def test_cli_refuses_a_bad_model_before_starting_ray(tmp_path, monkeypatch, capsys):
    """A malicious pickle or a checkpoint that does not fit is refused by `drivedit serve` itself, with the
    loader's message, before Ray starts (not in a replica, as 'Deploying application drivedit failed')."""
    import datetime

    import ray
    import torch

    from drivedit.serve.app import main
    from serve_helpers import write_tiny_checkpoint

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a model that cannot be served")

    monkeypatch.setattr(ray, "init", no_ray)
    pickled = tmp_path / "evil.pt"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "payload": datetime.datetime(2020, 1, 1)}, pickled)
    from safetensors.torch import load_file, save_file

    good = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    state = load_file(str(good))
    del state["final_layer.linear.bias"]
    misfit = tmp_path / "misfit.safetensors"
    save_file(state, str(misfit))
    for ref, needle in [(pickled, "refusing to load"), (misfit, "missing: final_layer.linear.bias")]:
        cfg = tmp_path / "serve.yaml"
        cfg.write_text(yaml.safe_dump({"model": {"ref": str(ref), "class_names": SCENARIOS, "device": "cpu"}}))
        assert main(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"drivedit serve: model.ref {ref}: ") and needle in err, err


def test_cli_lists_field_errors_and_a_bad_model_together(tmp_path, capsys):
    from drivedit.serve.app import main

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"ref": str(tmp_path / "missing.safetensors"), "class_names": SCENARIOS},
                                   "http": {"port": 0}}))
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "http.port" in err and "model.ref" in err and "missing.safetensors" in err and "(2 problems)" in err, err
