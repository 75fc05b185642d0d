"""The sampling endpoint over real HTTP on 127.0.0.1, on the session's local Ray.

A tiny random DiT-N/2 on 16x16 pixel latents (written by the test as a safetensors checkpoint with
six scenario classes) is served with small bounds so each request costs milliseconds.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from drivedit import storage
from drivedit.config.serve import ServeApp
from serve_helpers import IMAGE_SIZE, SCENARIOS, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 60  # num_images x steps
SAMPLER = {"default_steps": 4, "min_steps": 1, "max_steps": 40, "max_images": 4, "max_image_steps": BUDGET,
           "min_guidance": 1.0, "max_guidance": 8.0, "default_guidance": 3.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(ray_session, tmp_path_factory):
    from ray import serve

    from drivedit.serve.app import build_app

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.safetensors")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeApp.model_validate({
        "model": {"ref": str(ckpt), "class_names": SCENARIOS, "device": "cpu"},
        "sampler": SAMPLER,
        "batching": {"enabled": True, "max_batch_size": 16, "batch_wait_timeout_s": 0.25},
        "deployment": {"max_ongoing_requests": 32, "max_queued_requests": 64, "cpus_per_replica": 0.5,
                       "gpus_per_replica": 0},
        "http": {"max_body_bytes": 512},
    })
    serve.run(build_app(cfg), name="test-serve", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    yield {"base": base, "ckpt": ckpt, "cfg": cfg}
    serve.shutdown()


def post(base: str, body, **kw) -> httpx.Response:
    # like `curl -d`: a form content type although the body is JSON
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = kw.pop("headers", {"content-type": "application/x-www-form-urlencoded"})
    return httpx.post(f"{base}/v1/samples", content=data, headers=headers, timeout=60, **kw)


def png_array(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def test_one_image_is_a_png_of_the_configured_size(endpoint):
    r = post(endpoint["base"], {"scenario": "snowy", "seed": 7})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "7"
    assert r.headers["x-model-version"].startswith("checkpoint:")
    assert int(r.headers["x-batch-size"]) >= 1
    pixels = png_array(r.content)
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.std() > 0


def test_same_seed_same_bytes_and_seeds_matter(endpoint):
    a = post(endpoint["base"], {"scenario": "rainy", "seed": 11, "steps": 3, "sampler": "ddpm"})
    b = post(endpoint["base"], {"scenario": "rainy", "seed": 11, "steps": 3, "sampler": "ddpm"})
    c = post(endpoint["base"], {"scenario": "rainy", "seed": 12, "steps": 3, "sampler": "ddpm"})
    d = post(endpoint["base"], {"scenario": "night", "seed": 11, "steps": 3, "sampler": "ddpm"})
    assert a.status_code == b.status_code == c.status_code == d.status_code == 200
    assert a.content == b.content
    assert a.content != c.content and a.content != d.content


def test_no_seed_gets_a_random_one_that_reproduces(endpoint):
    r = post(endpoint["base"], {"scenario": "clear"})
    seed = int(r.headers["x-seed"])
    again = post(endpoint["base"], {"scenario": "clear", "seed": seed})
    assert again.content == r.content


def test_several_images_come_as_json_with_per_image_seeds(endpoint):
    r = post(endpoint["base"], {"scenario": "night", "num_images": 3, "seed": 5, "guidance": 2.5})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["model_version"] == r.headers["x-model-version"]
    assert (body["scenario"], body["steps"], body["guidance"], body["sampler"]) == ("night", 4, 2.5, "ddim")
    assert (body["width"], body["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert [im["seed"] for im in body["images"]] == [5, 6, 7]
    arrays = [png_array(base64.b64decode(im["png_base64"])) for im in body["images"]]
    assert all(a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])
    # image i is the image a one-image request with seed + i gets, byte for byte
    single = post(endpoint["base"], {"scenario": "night", "seed": 6, "guidance": 2.5}).content
    assert base64.b64decode(body["images"][1]["png_base64"]) == single


BAD = [
    ({"scenario": "foggy"}, 422, "scenario"),
    ({"scenario": "snowy", "num_images": 0}, 422, "num_images"),
    ({"scenario": "snowy", "num_images": 5}, 422, "num_images"),
    ({"scenario": "snowy", "steps": 0}, 422, "steps"),
    ({"scenario": "snowy", "steps": 41}, 422, "steps"),
    ({"scenario": "snowy", "guidance": 8.5}, 422, "guidance"),
    ({"scenario": "snowy", "guidance": "high"}, 422, "guidance"),
    ({"scenario": "snowy", "steps": "4"}, 422, "steps"),
    ({"scenario": "snowy", "num_images": 1.5}, 422, "num_images"),
    ({"scenario": "snowy", "seed": -3}, 422, "seed"),
    ({"scenario": "snowy", "sampler": "euler"}, 422, "sampler"),
    ({"scenario": "snowy", "model": "models:/someone-elses/1"}, 422, "model"),
    ({"steps": 4}, 422, "scenario"),
    ('{"scenario": "snowy", ', 422, "body"),
    ("", 422, "body"),
    ("[1, 2]", 422, "body"),
    ({"scenario": "snowy", "pad": "x" * 600}, 413, "body"),
]


@pytest.mark.parametrize("body, status, field", BAD, ids=[f"{s}-{f}-{i}" for i, (_, s, f) in enumerate(BAD)])
def test_bad_input_names_the_field(endpoint, body, status, field):
    r = post(endpoint["base"], body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["detail"][0]["field"] == field, err
    assert err["message"].startswith(f"{field}:"), err


def test_over_budget_states_the_limit(endpoint):
    r = post(endpoint["base"], {"scenario": "snowy", "num_images": 4, "steps": 20})  # 80 > 60
    assert r.status_code == 422
    item = r.json()["detail"][0]
    assert item["type"] == "compute_budget" and item["field"] == "num_images"
    assert "4 x 20 = 80" in item["msg"] and str(BUDGET) in item["msg"]


def test_oversized_chunked_body_is_refused(endpoint):
    def chunks():
        for _ in range(20):
            yield b"x" * 100

    r = httpx.post(f"{endpoint['base']}/v1/samples", content=chunks(), timeout=60)  # no content-length
    assert r.status_code == 413, r.text
    assert "512" in r.json()["message"]


def test_replica_keeps_serving_after_bad_input(endpoint):
    for body, _, _ in BAD[:5]:
        post(endpoint["base"], body)
    assert httpx.get(f"{endpoint['base']}/healthz", timeout=30).status_code == 200
    assert post(endpoint["base"], {"scenario": "overcast", "seed": 1}).status_code == 200


def test_healthz_and_scenarios(endpoint):
    h = httpx.get(f"{endpoint['base']}/healthz", timeout=30).json()
    assert h["status"] == "ok" and h["device"] == "cpu"
    # the model's file name and sha256 prefix, never the operator's path (issue 20)
    digest = storage.sha256_path(endpoint["ckpt"])[:12]
    assert h["model_version"] == f"checkpoint:{Path(endpoint['ckpt']).name}@{digest}"
    assert str(Path(endpoint["ckpt"]).parent) not in json.dumps(h)
    assert (h["image_size"], h["num_scenarios"]) == (IMAGE_SIZE, len(SCENARIOS))
    s = httpx.get(f"{endpoint['base']}/v1/scenarios", timeout=30).json()
    assert s == {"scenarios": SCENARIOS, "model_version": h["model_version"]}


def test_openapi_documents_every_field_with_bounds(endpoint):
    doc = httpx.get(f"{endpoint['base']}/openapi.json", timeout=30).json()
    op = doc["paths"]["/v1/samples"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    p = schema["properties"]
    assert set(p) == {"scenario", "num_images", "steps", "guidance", "sampler", "seed", "layout"}
    assert all(p[k].get("description") for k in p)
    assert p["scenario"]["enum"] == SCENARIOS
    assert (p["num_images"]["minimum"], p["num_images"]["maximum"]) == (1, 4)
    assert (p["steps"]["minimum"], p["steps"]["maximum"]) == (1, 40)
    assert (p["guidance"]["minimum"], p["guidance"]["maximum"]) == (1.0, 8.0)
    assert str(BUDGET) in p["num_images"]["description"]
    assert {"200", "413", "422", "503"} <= set(op["responses"])
    assert "image/png" in op["responses"]["200"]["content"]
    assert "SamplesResponse" in doc["components"]["schemas"]


async def _fire(base: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        return await asyncio.gather(*[client.post(f"{base}/v1/samples", json=b) for b in bodies])


def test_32_concurrent_requests_are_batched_and_get_their_solo_bytes(endpoint):
    """8 copies of one request among 24 others, all at once: every copy gets the bytes the request gets alone,
    and so does every other request (batching never changes or mixes up an answer)."""
    same = {"scenario": "night", "seed": 7, "steps": 4}
    bodies = [same if i % 4 == 0 else {"scenario": SCENARIOS[i % 6], "seed": 100 + i, "steps": 4} for i in range(32)]
    responses = asyncio.run(_fire(endpoint["base"], bodies))
    assert [r.status_code for r in responses] == [200] * 32
    sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= endpoint["cfg"].batching.max_batch_size
    assert [r.headers["x-seed"] for r in responses] == [str(b["seed"]) for b in bodies]
    for i in (0, 1, 2, 5, 31):
        alone = post(endpoint["base"], bodies[i])
        assert alone.content == responses[i].content, i
    assert len({r.content for r, b in zip(responses, bodies) if b is same}) == 1


def test_overload_answers_503_and_recovers(endpoint):
    """A deployment holding 2 requests with 2 more queued at the proxy refuses the rest at once."""
    from ray import serve

    from drivedit.serve.app import build_app

    cfg = endpoint["cfg"].model_copy(deep=True)
    cfg.batching.enabled = False
    cfg.deployment.name = "TinyDeployment"
    cfg.deployment.max_ongoing_requests = 2
    cfg.deployment.max_queued_requests = 2
    serve.run(build_app(cfg), name="overload", route_prefix="/small")
    try:
        base = endpoint["base"] + "/small"
        bodies = [{"scenario": "snowy", "seed": i, "steps": 12} for i in range(16)]
        codes = [r.status_code for r in asyncio.run(_fire(base, bodies))]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
        # the replica survived: it answers as soon as the burst is over
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        assert post(base, {"scenario": "snowy", "seed": 1}).status_code == 200
    finally:
        serve.delete("overload")


def test_app_from_the_shipped_serve_config_file_starts(endpoint):
    """What `serve deploy configs/serve/serve_config.yaml` builds: its import_path called with its args,
    serving a registered model version (`models:/NAME/VERSION` + tracking URI) as the demo does."""
    import importlib

    from ray import serve
    from test_generate_models import tiny_models

    models = tiny_models()  # a bundle registered in an SQLite MLflow registry as models:/tiny-drive/1
    doc = yaml.safe_load((ROOT / "configs/serve/serve_config.yaml").read_text())
    app_doc = doc["applications"][0]
    module, attr = app_doc["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    args = dict(app_doc["args"])
    args["config"] = str(ROOT / args["config"])
    # the demo's registry does not exist in a test: point the same kind of ref at the test registry
    args["model"] = {"ref": models.registered, "tracking_uri": models.tracking_uri, "device": "cpu"}
    args["deployment"] = {**args.get("deployment", {}), "cpus_per_replica": 0.5}
    serve.run(builder(args), name="from-serve-config", route_prefix="/cfg")
    try:
        base = endpoint["base"] + "/cfg"
        health = httpx.get(f"{base}/healthz", timeout=30).json()
        assert health["model_version"] == models.registered and health["image_size"] == 8
        r = post(base, {"scenario": "snowy", "seed": 7, "steps": 4})
        assert r.status_code == 200 and png_array(r.content).shape == (8, 8, 3)
        assert r.headers["x-model-version"] == models.registered
    finally:
        serve.delete("from-serve-config")
