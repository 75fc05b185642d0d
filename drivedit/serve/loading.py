"""Loading the served model: one call from the operator's config to a ready `SampleEngine`.

The model reference is resolved by the same function the generate job uses
(`drivedit.generate.model_ref.load_sampling_model`: registry versions, bundles, official checkpoints),
so an endpoint and a batch job given the same ref draw the same images for the same seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from drivedit.config.serve import ServeApp
from drivedit.serve.engine import SampleEngine


@dataclass
class ServedModel:
    engine: SampleEngine
    scenarios: list[str]
    label_of: dict[str, int]  # scenario -> class id (a checkpoint's ids need not be 0..S-1)
    version: str
    device: torch.device
    image_size: int
    box_categories: list[str] = ()  # the layout branch's categories; empty: the model takes no layout
    token_side: float = 0.0  # one DiT token's side in output pixels: smaller layout boxes come back as ignore regions


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but this replica sees no GPU; give replicas a GPU "
                           "(deployment.gpus_per_replica: 1) or use device 'auto'")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    # an explicit index, so /healthz says which GPU (a replica sees only its own, as index 0)
    return torch.device("cuda", torch.cuda.current_device()) if setting == "cuda" else torch.device("cpu")


def public_version(version: str, digest: str) -> str:
    """What callers see of the served model (X-Model-Version, /healthz, /openapi.json): a registry version as it
    is; a bundle or checkpoint as its kind, file or directory name and the first 12 hex digits of its sha256.
    Never the operator's path or URI (which may name hosts, users or credentials)."""
    if version.startswith("models:/"):
        return version
    kind, _, ref = version.partition(":")
    name = ref.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "model"
    return f"{kind}:{name}@{digest[:12]}"


def load_served_model(cfg: ServeApp) -> ServedModel:
    from drivedit.generate.model_ref import load_sampling_model
    from drivedit.generate.undrawable import token_side

    device = pick_device(cfg.model.device)
    m = cfg.model
    sm = load_sampling_model(m.ref, class_names=m.class_names, codec=m.codec, tracking_uri=m.tracking_uri,
                             device=device)
    s = cfg.sampler
    engine = SampleEngine(sm.model, sm.load_codec(device), betas=sm.betas, device=str(device), dtype=m.dtype,
                          guidance_kind=s.guidance_kind, guide_channels=s.guide_channels,
                          guidance_interval=s.guidance_interval, superclass_of=sm.superclass_of)
    return ServedModel(engine=engine, scenarios=list(sm.scenarios),
                       label_of={name: sm.label_of(name) for name in sm.scenarios},
                       version=public_version(str(sm.version), sm.digest), device=device,
                       image_size=int(sm.image_size), box_categories=box_categories(sm.model),
                       token_side=token_side(int(sm.image_size), sm.model.config.input_size, sm.model.config.patch_size))


def box_categories(model) -> list[str]:
    branch = getattr(model, "layout_branch", None)
    return list(branch.spec.box_categories) if branch is not None else []
