"""A bitfit bundle with a light layout branch whose joins are moved off zero, on a given base checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from drivedit.models.adapter_spec import AdapterSpec, apply_spec
from drivedit.models.bundle import BundleInfo, save_bundle
from drivedit.models.checkpoint import load_dit
from drivedit.models.control import LayoutSpec
from drivedit.models.diffusion import linear_betas
from drivedit.storage import sha256_file


def write_layout_bundle(base: Path, out: Path, scenarios: list[str], categories: list[str], depth: int,
                        segmentation_classes: list[str] = ()) -> Path:
    spec = AdapterSpec(method="bitfit", num_scenarios=len(scenarios), train_biases=True,
                       layout=LayoutSpec("light", depth, categories, list(segmentation_classes)).to_dict())
    model = apply_spec(load_dit(base), spec)
    with torch.no_grad():  # a "trained" branch: an untrained one would not change the images
        for n, p in model.named_parameters():
            if n.startswith("layout_branch."):
                p.add_(0.1 * torch.randn_like(p))
    info = BundleInfo(base=str(base), base_sha256=sha256_file(base), model_config=model.config.to_dict(), spec=spec,
                      scenarios=scenarios, betas=linear_betas().tolist(), codec="pixel")
    return save_bundle(out, model, info)
