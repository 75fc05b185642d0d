"""Build a detector from the job's model section, or rebuild a saved one from its `detector.json` spec.

The spec is plain JSON and says everything the module's shape depends on, so a saved detector loads
anywhere without the DiT, bundle or weights file it was built from: for the DiT backbone it carries
the DiT's architecture, the codec (and the VAE's config), the timestep's signal level and the
scenario -> DiT label map.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from drivedit import storage
from drivedit.detect.models import (IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_FILE, build_head, load_state_checked,
                                    load_torchvision_weights, read_spec, read_weights_file, resnet_fpn)


def new_spec(model: dict, categories: list[str], image_size: int, eval_section: dict) -> dict:
    """The spec of a fresh detector (model: DetectorSection as JSON)."""
    return {"arch": model["arch"], "backbone": model["backbone"], "fpn_channels": int(model["fpn_channels"]),
            "categories": list(categories),
            "image_size": int(image_size), "max_detections": int(eval_section["max_detections"]),
            "score_threshold": float(eval_section["score_threshold"])}


def _dit_parts(dit_section: dict, device="cpu"):
    """(DiT, codec, spec["dit"]) for the backbone from the DiT reference in the config."""
    from drivedit.generate.model_ref import load_sampling_model

    sm = load_sampling_model(dit_section["source"], class_names=dit_section.get("class_names"),
                             codec=dit_section.get("codec"), device=device)
    codec = sm.load_codec(device)
    t = int(dit_section["timestep"])
    alpha_bar = float(np.cumprod(1.0 - np.asarray(sm.betas, np.float64))[t])
    labels = dict(zip(sm.scenarios, sm.class_ids)) if dit_section.get("scenario_label", True) else {}
    vae = getattr(codec, "vae", None)
    info = {"source": dit_section["source"], "version": sm.version, "config": sm.model.config.to_dict(),
            "codec": {"kind": codec.kind, "source": sm.codec_source, "scale_factor": codec.scale_factor,
                      "vae_config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
                      if vae is not None else None},
            "timestep": t, "alpha_bar": alpha_bar, "feature_blocks": list(dit_section["feature_blocks"]),
            "train_from_block": dit_section.get("train_from_block"),
            "scenario_labels": labels,
            "null_label": int(sm.model.y_embedder.null_label)}
    return sm.model, codec, info


def _dit_from_spec(info: dict):
    """A DiT and codec of the spec's shapes (weights come from the saved state dict)."""
    from drivedit.models.codec import AutoencoderKLCodec, PixelCodec
    from drivedit.models.dit import DiTConfig, build_dit

    dit = build_dit(DiTConfig(**info["config"]))
    c = info["codec"]
    if c["kind"] == "pixel":
        codec = PixelCodec(info["config"]["in_channels"])
    else:
        from diffusers import AutoencoderKL

        codec = AutoencoderKLCodec(AutoencoderKL.from_config(c["vae_config"]), c["source"] or "(saved detector)",
                                   c["scale_factor"])
    return dit, codec


def assemble(spec: dict, dit: nn.Module | None = None, codec=None) -> nn.Module:
    """The detector module a spec describes (random weights unless `dit`/`codec` are given)."""
    from drivedit.detect.dit_backbone import DiTFeatureBackbone

    if spec["backbone"] == "dit":
        info = spec["dit"]
        if dit is None:
            dit, codec = _dit_from_spec(info)
        backbone = DiTFeatureBackbone(dit, codec, info["alpha_bar"], info["timestep"], info["feature_blocks"],
                                      info["train_from_block"], spec["fpn_channels"], spec["image_size"],
                                      info["null_label"])
        mean, std = [0.5] * 3, [0.5] * 3  # the DiT's codec takes images in [-1, 1]
    else:
        backbone, mean, std = resnet_fpn(spec["backbone"], spec["fpn_channels"]), IMAGENET_MEAN, IMAGENET_STD
    return build_head(spec["arch"], backbone, len(spec["categories"]), spec["image_size"], mean, std,
                      spec["max_detections"], spec["score_threshold"])


def build_detector(job) -> tuple[nn.Module, dict, dict]:
    """(detector, spec, load report) for a DetectJob: fresh, from `model.weights`, or from `model.ref`."""
    m = job.model
    if m.ref:
        from drivedit.tracking import resolve_tracking_uri

        detector, spec = load_detector(m.ref, resolve_tracking_uri(job.tracking.tracking_uri, job.run.storage_path))
        return detector, spec, {"from": m.ref}
    spec = new_spec(m.model_dump(mode="json"), job.data.categories, job.data.image_size,
                    job.eval.model_dump(mode="json"))
    report: dict = {}
    if m.backbone == "dit":
        dit, codec, spec["dit"] = _dit_parts(m.dit.model_dump(mode="json"))
        detector = assemble(spec, dit, codec)
    else:
        detector = assemble(spec)
    if m.weights:
        report = load_torchvision_weights(detector, read_weights_file(m.weights), m.weights)
    return detector, spec, report


def load_detector(ref: str, tracking_uri: str | None = None) -> tuple[nn.Module, dict]:
    """A saved detector from a directory (local or s3://) or a registered `models:/NAME/VERSION`."""
    with tempfile.TemporaryDirectory(prefix="drivedit-detector-") as tmp:
        if ref.startswith("models:/"):
            from drivedit.tracking import download_registered

            local = download_registered(ref, "detector.json", "a drivedit detector", Path(tmp), tracking_uri)
        elif storage.is_remote(ref):
            local = Path(tmp)
            storage.download_dir(ref, str(local))
        else:
            local = Path(ref)
        spec = read_spec(local)
        detector = assemble(spec)
        load_state_checked(detector, read_weights_file(local / WEIGHTS_FILE), f"{ref}/{WEIGHTS_FILE}")
    return detector.eval(), spec


def dit_labels(spec: dict, scenarios: list[str]) -> torch.Tensor | None:
    """DiT labels of a batch's scenarios (the null label where the DiT does not know one); None for other
    backbones."""
    if spec["backbone"] != "dit":
        return None
    info = spec["dit"]
    known = info["scenario_labels"]
    return torch.tensor([known.get(s, info["null_label"]) for s in scenarios], dtype=torch.long)  # (N,)


def run_detector(detector: nn.Module, spec: dict, images: torch.Tensor, scenarios: list[str],
                 targets: list[dict] | None = None):
    """Losses (training, with targets) or detections (eval) for images (N, 3, S, S) in [0, 1]."""
    inner = detector.module if hasattr(detector, "module") else detector  # DDP
    if spec["backbone"] == "dit":
        inner.backbone.set_labels(dit_labels(spec, scenarios))
    return detector(list(images), targets) if targets is not None else detector(list(images))


def frozen_names(detector: nn.Module) -> list[str]:
    """Parameters and buffers that never change: what DDP leaves alone."""
    inner = detector.module if hasattr(detector, "module") else detector
    names = [n for n, p in inner.named_parameters() if not p.requires_grad]
    return names + [n for n, _ in inner.named_buffers() if not n.endswith(("running_mean", "running_var",
                                                                            "num_batches_tracked"))]
