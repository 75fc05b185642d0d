"""Detector modules: the DiT-feature backbone's pyramid and labels, and a saved detector that reloads to the
same detections without its sources (and names what is missing from a damaged file)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detect_support import write_tiny_dit, write_tiny_vae

SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]


@pytest.fixture(scope="module")
def dit_detector(tmp_path_factory):
    from drivedit.config.detect import DetectJob
    from drivedit.detect.detector import build_detector

    root = tmp_path_factory.mktemp("detect-models")
    vae, dit = write_tiny_vae(root / "vae"), write_tiny_dit(root / "dit.safetensors")
    job = DetectJob.model_validate({"model": {"arch": "fcos", "backbone": "dit", "fpn_channels": 32, "dit": {
        "source": str(dit), "class_names": SCENARIOS, "codec": {"kind": "autoencoder_kl", "source": str(vae)},
        "timestep": 100, "feature_blocks": [0, 1], "train_from_block": None}}, "data": {"categories": ["car"]}})
    torch.manual_seed(0)
    detector, spec, _ = build_detector(job)
    return detector.eval(), spec, root


def test_dit_backbone_gives_five_levels_at_strides_4_to_64(dit_detector):
    detector, spec, _ = dit_detector
    backbone = detector.backbone
    assert backbone.feature_blocks == [0, 1] and all(not p.requires_grad for p in backbone.dit.parameters())
    feats = backbone(torch.rand(2, 3, 128, 128) * 2 - 1)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "0": (2, 32, 32, 32), "1": (2, 32, 16, 16), "2": (2, 32, 8, 8), "3": (2, 32, 4, 4), "pool": (2, 32, 2, 2)}
    linear = np.linspace(1e-4, 0.02, 1000)  # DiT's linear schedule
    assert spec["dit"]["alpha_bar"] == pytest.approx(np.prod(1 - linear[:101]))


def test_scenarios_become_dit_labels_and_unknown_ones_the_null_label(dit_detector):
    from drivedit.detect.detector import dit_labels

    _, spec, _ = dit_detector
    assert dit_labels(spec, ["night", "clear", "other"]).tolist() == [5, 0, spec["dit"]["null_label"]]
    assert spec["dit"]["null_label"] == 6


def test_saved_detector_reloads_to_the_same_detections(dit_detector, tmp_path):
    from safetensors.torch import load_file, save_file

    from drivedit.detect.detector import load_detector, run_detector
    from drivedit.detect.models import WEIGHTS_FILE, save_detector

    detector, spec, _ = dit_detector
    save_detector(tmp_path / "det", detector, spec)
    again, spec2 = load_detector(str(tmp_path / "det"))
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        a = run_detector(detector, spec, x, ["night", "other"])
        b = run_detector(again, spec2, x, ["night", "other"])
    assert len(a[0]["boxes"]) > 0
    for da, db in zip(a, b):
        assert torch.equal(da["boxes"], db["boxes"]) and torch.equal(da["scores"], db["scores"])
    state = load_file(str(tmp_path / "det" / WEIGHTS_FILE))
    del state["head.classification_head.cls_logits.weight"]
    save_file(state, str(tmp_path / "det" / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="missing .*cls_logits.weight"):
        load_detector(str(tmp_path / "det"))
