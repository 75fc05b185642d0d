"""The replica's sampling engine without Ray: grouping by settings, seeds, PNGs; and the app's options."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from drivedit.config.serve import ServeApp
from drivedit.serve.engine import SampleEngine, SampleJob, count_images
from drivedit.serve.loading import load_served_model
from serve_helpers import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "tiny.safetensors")


@pytest.fixture(scope="module")
def served(ckpt):
    cfg = ServeApp.model_validate({"model": {"ref": str(ckpt), "class_names": {"snowy": 4, "night": 5},
                                             "device": "cpu"}})
    return load_served_model(cfg)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_loaded_model_keeps_the_configured_class_ids(served):
    assert served.scenarios == ["snowy", "night"]
    assert served.label_of == {"snowy": 4, "night": 5}  # ids from the mapping, not positions
    assert served.image_size == 16 and served.device == torch.device("cpu")


def test_an_image_does_not_depend_on_what_shares_its_batch(served, monkeypatch):
    """Requests answered together are grouped by settings, but every image is drawn on its own (batch shape 1),
    so a request's bytes are those it gets alone, whatever its neighbours."""
    calls = []
    real = served.engine.sampler.sample

    def spy(labels, seeds, settings, uncond_labels=None):
        calls.append((labels.tolist(), list(seeds), settings.sampler, settings.steps))
        return real(labels, seeds, settings, uncond_labels=uncond_labels)

    monkeypatch.setattr(served.engine.sampler, "sample", spy)
    jobs = [SampleJob(label=4, seeds=(7,), sampler="ddim", steps=2, guidance=3.0),
            SampleJob(label=5, seeds=(1, 2, 3), sampler="ddim", steps=2, guidance=3.0),
            SampleJob(label=4, seeds=(7,), sampler="ddpm", steps=2, guidance=3.0)]
    assert count_images(jobs) == 5
    results = served.engine.run(jobs)
    assert sorted(calls) == sorted([([4], [7], "ddim", 2), ([5], [1], "ddim", 2), ([5], [2], "ddim", 2),
                                    ([5], [3], "ddim", 2), ([4], [7], "ddpm", 2)])
    assert [(r.batch_images, r.batch_requests, r.seeds) for r in results] == [
        (4, 2, [7]), (4, 2, [1, 2, 3]), (1, 1, [7])]
    assert [len(r.pngs) for r in results] == [1, 3, 1]
    assert not np.array_equal(pixels(results[0].pngs[0]), pixels(results[2].pngs[0]))  # ddim != ddpm
    assert results[1].pngs == served.engine.run([jobs[1]])[0].pngs


def test_sixteen_requests_answered_together_get_their_solo_bytes():
    """The shipped tiny model on two threads: drawn as one (16, ...) batch, 6 of these 16 images differed from
    their solo bytes by a level in a pixel (a batched matmul rounds by its shape). Drawn each on its own, none."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        served = load_served_model(ServeApp.model_validate({"model": {
            "ref": "builtin:tiny-dit", "class_names": [f"class{i}" for i in range(14)], "device": "cpu"}}))
        jobs = [SampleJob(label=i % 14, seeds=(i,), sampler="ddim", steps=4, guidance=3.0) for i in range(16)]
        together = [r.pngs for r in served.engine.run(jobs)]
        alone = [served.engine.run([job])[0].pngs for job in jobs]
    finally:
        torch.set_num_threads(threads)
    assert sum(a != b for a, b in zip(alone, together)) == 0
    assert len({p[0] for p in alone}) == 16  # sixteen different images, not one


def test_engine_refuses_superclass_guidance_without_a_mapping(served):
    with pytest.raises(ValueError, match="superclass"):
        SampleEngine(served.engine.sampler.model, served.engine.codec, guidance_kind="superclass")
    with pytest.raises(ValueError, match="guide_channels"):
        SampleEngine(served.engine.sampler.model, served.engine.codec, guide_channels=9)


def test_registry_bundle_with_superclass_guidance():
    """A fine-tuned bundle from the MLflow registry, and a tiered bundle guided by its superclasses."""
    from test_generate_models import tiny_models

    models = tiny_models()
    reg = load_served_model(ServeApp.model_validate({"model": {
        "ref": models.registered, "tracking_uri": models.tracking_uri, "device": "cpu"}}))
    assert reg.version == models.registered and reg.scenarios[-1] == "night" and reg.image_size == 8
    tiered = load_served_model(ServeApp.model_validate({
        "model": {"ref": str(models.tiered_bundle), "device": "cpu"}, "sampler": {"guidance_kind": "superclass"}}))
    job = SampleJob(label=tiered.label_of["snowy"], seeds=(3,), sampler="ddim", steps=3, guidance=4.0)
    guided = tiered.engine.run([job])[0].pngs[0]
    unguided = tiered.engine.run([SampleJob(**{**job.__dict__, "guidance": 1.0})])[0].pngs[0]
    assert pixels(guided).shape == (8, 8, 3) and not np.array_equal(pixels(guided), pixels(unguided))
    # a tiered table has no null class: cfg guidance is refused when the replica loads, not per request
    with pytest.raises(ValueError, match="guidance_kind: superclass"):
        SampleEngine(tiered.engine.sampler.model, tiered.engine.codec)


def test_the_servers_guidance_interval_reaches_every_request(ckpt, served):
    cfg = ServeApp.model_validate({"model": {"ref": str(ckpt), "class_names": {"snowy": 4, "night": 5},
                                             "device": "cpu"}, "sampler": {"guidance_interval": [1.0, 20.0]}})
    limited = load_served_model(cfg)
    job = SampleJob(label=4, seeds=(7,), sampler="ddpm", steps=6, guidance=3.0)
    assert limited.engine.settings(job).guidance_interval == (1.0, 20.0)
    assert served.engine.settings(job).guidance_interval is None
    # DDPM-6 guides t = 599 and 400 only (sigma 6.1, 2.0): another image than guidance at every step
    assert not np.array_equal(pixels(limited.engine.run([job])[0].pngs[0]), pixels(served.engine.run([job])[0].pngs[0]))
    with pytest.raises(ValueError, match="sampler.guidance_interval"):
        ServeApp.model_validate({"model": {"ref": "x"}, "sampler": {"guidance_interval": [3.0, 1.0]}})


def test_build_app_takes_its_options_from_the_config():
    from drivedit.serve.app import build_app, resolve_gpus

    cfg = ServeApp.model_validate({"model": {"ref": "x"}, "deployment": {
        "name": "D", "min_replicas": 0, "max_replicas": 3, "max_ongoing_requests": 12, "max_queued_requests": 5,
        "gpus_per_replica": 1, "cpus_per_replica": 2, "target_ongoing_requests": 4}})
    dep = build_app(cfg)._bound_deployment  # the Deployment behind the Application
    assert (dep.name, dep.max_ongoing_requests, dep.max_queued_requests) == ("D", 12, 5)
    assert dep.ray_actor_options["num_gpus"] == 1 and dep.ray_actor_options["num_cpus"] == 2
    auto = dep._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.initial_replicas, auto.target_ongoing_requests) == (0, 3, 1, 4)
    assert resolve_gpus(0.5) == 0.5
    assert resolve_gpus("auto") == (1.0 if torch.cuda.is_available() else 0.0)  # no Ray here: asks torch


class _ReplicaWithoutRay:
    """What create_http_app needs of a replica (cfg, served, sample, new_seed), answering on this thread."""

    def __init__(self, cfg, served):
        self.cfg, self.served = cfg, served

    async def sample(self, job):
        return self.served.engine.run([job])[0]

    def new_seed(self) -> int:
        return 0


@pytest.fixture(scope="module")
def http_client(served, tmp_path_factory):
    from fastapi.testclient import TestClient

    from drivedit.serve.http import create_http_app

    cfg = ServeApp.model_validate({"model": {"ref": "x"}, "sampler": {"default_steps": 2}})
    with TestClient(create_http_app(_ReplicaWithoutRay(cfg, served))) as client:
        yield client


def test_the_model_path_is_not_exposed(ckpt, http_client):
    """Callers see the model's name and digest, never the operator's path to it."""
    r = http_client.post("/v1/samples", json={"scenario": "snowy", "seed": 1})
    assert r.status_code == 200, r.text
    version = r.headers["x-model-version"]
    assert version.startswith("checkpoint:tiny.safetensors@") and len(version.rsplit("@", 1)[1]) == 12
    health, schema = http_client.get("/healthz").json(), http_client.get("/openapi.json").text
    assert health["model_version"] == version and version in schema
    for text in (version, json.dumps(health), schema, json.dumps(dict(r.headers))):
        assert str(ckpt.parent) not in text


def test_duplicate_json_keys_are_refused_naming_the_key(http_client):
    r = http_client.post("/v1/samples", content=b'{"scenario": "snowy", "seed": 1, "seed": 2}',
                         headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert [d["field"] for d in r.json()["detail"]] == ["seed"] and "more than once" in r.json()["message"]
    nested_ok = http_client.post("/v1/samples", json={"scenario": "snowy", "seed": 1})
    assert nested_ok.status_code == 200
