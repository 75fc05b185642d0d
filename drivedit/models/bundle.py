"""Adapter bundles: what fine-tuning produces, and how it becomes a model again.

A bundle is a local directory (jobs upload / download it) holding
- `adapter.safetensors`: only the tensors the method trained, plus the scenario table;
- `bundle.json`: the base model reference and its sha256, the base DiTConfig, the method (its
  config and AdapterSpec, the selected modules), the layout branch's kind and settings (`layout`, also in
  the spec; null without a branch), the scenario vocabulary (and superclasses), the
  betas to sample with, the codec id, and free-form `extra` (step, metrics).

`apply_bundle(base, bundle)` rebuilds the adapted, unmerged model; `merge(base, bundle)` folds it
into a plain DiT with the official keys whose label table is the scenario table (num_classes = S).
Imports torch, safetensors and numpy (and storage.py for atomic writes and sha256; no Ray).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from drivedit.models.adapter_spec import AdapterSpec, apply_spec, fold, saved_names, trainable_names
from drivedit.models.dit import DiT, DiTConfig
from drivedit.storage import atomic_local_dir, sha256_path

FORMAT = "drivedit.adapter_bundle"
VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
INFO_FILE = "bundle.json"


@dataclass
class BundleInfo:
    """What `bundle.json` records besides the tensors."""

    base: str  # the base model reference: a path, builtin:<name>, or the URI the job loaded
    base_sha256: str | None
    model_config: dict  # the base DiTConfig as a dict
    spec: AdapterSpec
    scenarios: list[str]
    betas: list[float]  # the noise schedule to sample with (the last progressive stage)
    codec: str  # "pixel" or "autoencoder_kl:<source>"
    method: dict = field(default_factory=dict)  # the resolved method config section
    selected_modules: list[str] = field(default_factory=list)
    superclasses: list[str] | None = None  # finediffusion: names of the superclass ids in spec.superclass_of
    schedule: dict | None = None  # how the betas were made (ProgressiveSchedule.describe())
    extra: dict = field(default_factory=dict)

    def to_json(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {"format": FORMAT, "version": VERSION, "base": {"uri": self.base, "sha256": self.base_sha256},
                "model_config": self.model_config, "method": self.method, "spec": self.spec.to_dict(),
                "selected_modules": list(self.selected_modules), "scenarios": list(self.scenarios),
                "superclasses": self.superclasses, "betas": [float(b) for b in self.betas],
                "schedule": self.schedule, "codec": self.codec, "extra": self.extra,
                "layout": self.spec.layout,  # also inside spec; here so a reader sees the branch at a glance
                "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())}}


@dataclass
class Bundle:
    info: BundleInfo
    tensors: dict[str, torch.Tensor]
    path: Path | None = None

    # the fields readers use most, at top level
    @property
    def scenarios(self) -> list[str]:
        return self.info.scenarios

    @property
    def betas(self) -> np.ndarray:
        return np.asarray(self.info.betas, dtype=np.float64)

    @property
    def codec(self) -> str:
        return self.info.codec

    @property
    def spec(self) -> AdapterSpec:
        return self.info.spec

    @property
    def model_config(self) -> DiTConfig:
        return DiTConfig(**self.info.model_config)


def save_bundle(directory: str | Path, model: DiT, info: BundleInfo,
                tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the bundle of an adapted model: its trainable tensors + label table, and `info`.

    tensors: the values to store (e.g. EMA weights) under the model's parameter names; default: the
    model's own. Must cover exactly the spec's saved set.
    """
    names = saved_names(model, info.spec)
    params = dict(model.named_parameters())
    if tensors is None:
        tensors = {n: params[n] for n in names}
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(f"bundle tensors do not match the method's saved set: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
    bad = [n for n in names if tuple(tensors[n].shape) != tuple(params[n].shape)]
    if bad:
        raise ValueError(f"bundle tensors have the wrong shape: {bad[:5]}")
    if len(info.betas) < 2:
        raise ValueError("bundle betas must be the sampling schedule (at least 2 values)")
    out = {n: tensors[n].detach().to("cpu", torch.float32).contiguous() for n in names}
    target = Path(directory)
    with atomic_local_dir(target) as tmp:  # an existing bundle is swapped out, never half-overwritten
        save_file(out, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / INFO_FILE).write_text(json.dumps(info.to_json(out), indent=1))
    return target


def load_bundle(directory: str | Path) -> Bundle:
    """Read a bundle directory (local; download remote ones first)."""
    d = Path(directory)
    for f in (INFO_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d} is not an adapter bundle: {f} is missing")
    try:
        raw = json.loads((d / INFO_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / INFO_FILE} is not valid JSON: {e}") from None
    if raw.get("format") != FORMAT:
        raise ValueError(f"{d / INFO_FILE} is not a drivedit adapter bundle (format {raw.get('format')!r})")
    if raw.get("version", 0) > VERSION:
        raise ValueError(f"{d} is bundle format version {raw['version']}; this drivedit reads up to {VERSION}, "
                         "upgrade drivedit")
    tensors = load_file(str(d / WEIGHTS_FILE))
    listed = {k: tuple(v) for k, v in raw["tensors"].items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if listed != found:
        raise ValueError(f"{d}: {WEIGHTS_FILE} does not hold the tensors {INFO_FILE} lists; the bundle is corrupt")
    info = BundleInfo(base=raw["base"]["uri"], base_sha256=raw["base"].get("sha256"),
                      model_config=raw["model_config"], spec=AdapterSpec.from_dict(raw["spec"]),
                      scenarios=list(raw["scenarios"]), betas=list(raw["betas"]), codec=raw["codec"],
                      method=raw.get("method", {}), selected_modules=list(raw.get("selected_modules", [])),
                      superclasses=raw.get("superclasses"), schedule=raw.get("schedule"), extra=raw.get("extra", {}))
    if len(info.scenarios) != info.spec.num_scenarios:
        raise ValueError(f"{d}: {len(info.scenarios)} scenario names for a table of {info.spec.num_scenarios}")
    return Bundle(info=info, tensors=tensors, path=d)




def load_base(bundle: Bundle) -> DiT:
    """The bundle's base model from its local reference, checked against the recorded sha256."""
    from drivedit.models.checkpoint import load_dit, resolve_model_source

    try:
        path = resolve_model_source(bundle.info.base)
    except FileNotFoundError:
        raise FileNotFoundError(f"the bundle's base model {bundle.info.base!r} is not a local file here; "
                                "download it and pass it as the base model") from None
    if bundle.info.base_sha256 and sha256_path(path) != bundle.info.base_sha256:
        raise ValueError(f"the base model at {path} does not match the sha256 recorded in the bundle "
                         f"({bundle.info.base_sha256[:12]}...); it changed since fine-tuning")
    return load_dit(path, config=bundle.model_config)


def apply_bundle(base: DiT | None, bundle: Bundle) -> DiT:
    """The adapted (unmerged) model: the base with the bundle's adapters and tensors. `base` is consumed.

    base None loads the bundle's base reference. The trainable set is marked requires_grad, so
    training can continue from a bundle.
    """
    if base is None:
        base = load_base(bundle)
    want, have = bundle.info.model_config, base.config.to_dict()
    diff = [f"{k}: bundle {want.get(k)!r} vs base {have.get(k)!r}" for k in sorted(set(want) | set(have))
            if want.get(k) != have.get(k)]
    if diff:
        raise ValueError("the base model is not the one this bundle was trained on: " + "; ".join(diff))
    spec = bundle.spec
    model = apply_spec(base, spec)
    params = dict(model.named_parameters())
    names = saved_names(model, spec)
    missing = sorted(set(names) - set(bundle.tensors))
    unknown = sorted(set(bundle.tensors) - set(params))
    if missing or unknown:
        raise ValueError(f"bundle tensors do not fit its method on this base: missing {missing[:5]}, "
                         f"unknown {unknown[:5]}")
    with torch.no_grad():
        for name, t in bundle.tensors.items():
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"bundle tensor {name} has shape {tuple(t.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(t.to(params[name].dtype))
    wanted = set(trainable_names(model, spec))
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
    return model.eval()


def merge(base: DiT | None, bundle: Bundle, keep_layout: bool = False) -> DiT:
    """A plain DiT (official keys, num_classes = S) whose output equals the adapted model's.

    A bundle with a layout branch: `keep_layout` folds the method's adapters and keeps the branch beside
    them (`model.layout_branch`, for sampling); without it, folding raises (no plain DiT can hold a branch)."""
    adapted = apply_bundle(base, bundle)
    if not (keep_layout and bundle.spec.layout is not None):
        return fold(adapted, bundle.spec).eval().requires_grad_(False)
    from dataclasses import replace

    branch = adapted.layout_branch
    del adapted.layout_branch
    plain = fold(adapted, replace(bundle.spec, layout=None))
    plain.layout_branch = branch.to(next(plain.parameters()).device)
    return plain.eval().requires_grad_(False)
