"""Serve with a layout: the HTTP app (FastAPI, no Ray Serve) over a replica's engine loading a tiny bundle with
a layout branch. A request with a layout returns labels equal to it; bad layouts get 422 naming the field."""
from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from drivedit.config.serve import ServeApp
from drivedit.serve.http import create_http_app
from drivedit.serve.loading import load_served_model
from layout_support import write_layout_bundle
from serve_helpers import IMAGE_SIZE, SCENARIOS, write_tiny_checkpoint

CATS = ["car", "pedestrian"]


class Replica:
    """What create_http_app needs of a DiTSamplerDeployment replica, without Ray."""

    def __init__(self, cfg: ServeApp):
        self.cfg, self.served = cfg, load_served_model(cfg)

    async def sample(self, job):
        return self.served.engine.run([job])[0]

    def new_seed(self) -> int:
        return 11


def _client(ref: str, **model) -> TestClient:
    cfg = ServeApp.model_validate({"model": {"ref": ref, "device": "cpu", **model},
                                   "sampler": {"default_steps": 2, "max_images": 2},
                                   "deployment": {"gpus_per_replica": 0}})
    return TestClient(create_http_app(Replica(cfg)))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-layout")
    base = write_tiny_checkpoint(root / "base.safetensors")
    bundle = write_layout_bundle(base, root / "bundle", SCENARIOS, CATS, depth=1)
    return _client(str(bundle)), _client(str(base), class_names=SCENARIOS)


LAYOUT = {"width": IMAGE_SIZE, "height": IMAGE_SIZE,
          "boxes": [{"category": "car", "x1": 2, "y1": 3.5, "x2": 9, "y2": 12},
                    {"category": "pedestrian", "x1": 10, "y1": 0, "x2": 16, "y2": 16}]}


def test_layout_request_returns_images_with_labels_equal_to_the_layout(client):
    with_branch, _ = client
    assert with_branch.get("/healthz").json()["box_categories"] == CATS
    r = with_branch.post("/v1/samples", json={"scenario": "rainy", "num_images": 2, "seed": 5, "layout": LAYOUT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(lab["category"], lab["box2d"]) for lab in body["labels"]] == \
        [(b["category"], {k: float(b[k]) for k in ("x1", "y1", "x2", "y2")}) for b in LAYOUT["boxes"]]
    assert [im["seed"] for im in body["images"]] == [5, 6]
    imgs = [Image.open(io.BytesIO(base64.b64decode(im["png_base64"]))) for im in body["images"]]
    assert all(im.size == (IMAGE_SIZE, IMAGE_SIZE) for im in imgs)
    # the layout is followed: the same seed without it draws another image; a layout at half size scales
    plain = with_branch.post("/v1/samples", json={"scenario": "rainy", "seed": 5})
    assert plain.headers["content-type"] == "image/png" and plain.content != base64.b64decode(
        body["images"][0]["png_base64"])
    half = {**LAYOUT, "width": 8, "height": 8, "boxes": [{"category": "car", "x1": 1, "y1": 2, "x2": 4, "y2": 8}]}
    r = with_branch.post("/v1/samples", json={"scenario": "rainy", "seed": 5, "layout": half})
    assert r.json()["labels"] == [{"category": "car", "box2d": {"x1": 2.0, "y1": 4.0, "x2": 8.0, "y2": 16.0}}]
    # a box under one token of the served model (patch 2 on a 16 x 16 grid of a 16 px image: 2 px) comes back as an
    # ignore region; the other boxes as before
    tiny = {**LAYOUT, "boxes": [{"category": "car", "x1": 0, "y1": 0, "x2": 1.5, "y2": 1.5}, LAYOUT["boxes"][0]]}
    labels = with_branch.post("/v1/samples", json={"scenario": "rainy", "seed": 5, "layout": tiny}).json()["labels"]
    assert labels[0]["box2d"] == {"x1": 0.0, "y1": 0.0, "x2": 1.5, "y2": 1.5} and labels[0]["attributes"]["ignore"] is True
    assert "attributes" not in labels[1]


@pytest.mark.parametrize("box,loc,text", [
    ({"category": "tram", "x1": 0, "y1": 0, "x2": 4, "y2": 4}, ["layout", "boxes", 0, "category"], "use one of: car"),
    ({"category": "car", "x1": 0, "y1": 0, "x2": 17, "y2": 4}, ["layout", "boxes", 0, "x2"], "x2 <= width (16)"),
    ({"category": "car", "x1": 5, "y1": 4, "x2": 5, "y2": 9}, ["layout", "boxes", 0, "x2"], "x1 < x2"),
    ({"category": "car", "x1": 1, "y1": -1, "x2": 5, "y2": 9}, ["layout", "boxes", 0, "y1"], "0 <= y1"),
])
def test_bad_layouts_get_422_naming_the_field(client, box, loc, text):
    with_branch, _ = client
    r = with_branch.post("/v1/samples", json={"scenario": "rainy", "layout": {**LAYOUT, "boxes": [box]}})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["field"] == "layout" and detail[0]["loc"] == ["body", *loc] and text in detail[0]["msg"]


def test_layout_for_a_model_without_a_branch_and_malformed_layouts_get_422(client):
    with_branch, plain = client
    r = plain.post("/v1/samples", json={"scenario": "rainy", "layout": LAYOUT})
    assert r.status_code == 422 and "no layout branch" in r.json()["message"]
    r = with_branch.post("/v1/samples", json={"scenario": "rainy", "layout": {"width": 16, "boxes": []}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["body", "layout", "height"]


def test_a_branch_that_reads_segmentation_is_served_boxes_with_ignore_elsewhere(tmp_path):
    from drivedit.data.bdd100k import SEGMENTATION_CLASSES

    base = write_tiny_checkpoint(tmp_path / "base.safetensors")
    bundle = write_layout_bundle(base, tmp_path / "bundle", SCENARIOS, CATS, depth=1,
                                 segmentation_classes=SEGMENTATION_CLASSES)
    r = _client(str(bundle)).post("/v1/samples", json={"scenario": "rainy", "num_images": 2, "seed": 5,
                                                       "layout": LAYOUT})
    assert r.status_code == 200, r.text
    assert [lab["category"] for lab in r.json()["labels"]] == ["car", "pedestrian"]
