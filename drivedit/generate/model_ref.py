"""Turn a model reference into a ready-to-sample model with its scenario vocabulary.

A reference is one of:
- `models:/NAME/VERSION` (or `/latest`, `@alias`): a fine-tuned bundle in the MLflow registry;
- a bundle directory or URI (local or s3://; it holds bundle.json and adapter.safetensors);
- a DiT checkpoint: official .pt, train.py dict, .safetensors, diffusers directory (local or
  s3://), or `builtin:NAME`. A checkpoint has no vocabulary, so `class_names` names its class ids.

Used by the generation job's actors and by the serve replicas, so it imports no Ray.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from drivedit import storage
from drivedit.models.checkpoint import load_dit, resolve_model_source
from drivedit.models.codec import codec_id as format_codec_id
from drivedit.models.codec import load_codec, parse_codec_id, read_vae_config, vae_geometry
from drivedit.models.diffusion import linear_betas
from drivedit.models.dit import DiT

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
TINY_DIT, TINY_VAE = "builtin:tiny-dit", "builtin:tiny-vae"
# the shipped tiny DiT's 14 source classes (configs/pretrain/tiny.yaml): its vocabulary when none is given
TINY_DIT_CLASSES = ["car", "truck", "traffic light", "tree", "house", "sun", "cloud", "umbrella", "raincoat", "snowman",
                    "snowplow", "moon", "streetlamp", "owl"]
BUNDLE_FILE = "bundle.json"


@dataclass
class SamplingModel:
    """A merged, eval-mode DiT (with its layout branch, when the bundle has one) plus everything a sampler and a dataset writer need to know about it."""

    model: DiT
    scenarios: list[str]  # vocabulary, in the order its names were given
    class_ids: list[int]  # class id of each scenario (a bundle's are 0..S-1)
    betas: np.ndarray  # (T,) float64 noise schedule to sample with
    codec_kind: str
    codec_source: str | None
    codec_scale: float | None
    image_size: int  # native resolution: latent grid x codec factor
    version: str  # human-readable: models:/NAME/VERSION, bundle:<dir>, checkpoint:<file>
    digest: str  # sha256 of the model's files: two runs with equal digests sample the same model
    superclass_of: Callable[[torch.Tensor], torch.Tensor] | None = None
    ref: str = ""
    codec_dtype: str = "float32"
    trained_image_size: int | None = None  # the image size a bundle's shards were encoded at (None: unknown)
    _label: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._label = dict(zip(self.scenarios, self.class_ids))

    def label_of(self, scenario: str) -> int:
        try:
            return self._label[scenario]
        except KeyError:
            raise ValueError(f"unknown scenario {scenario!r}; {self.version} knows: {', '.join(self.scenarios)}") from None

    def labels(self, scenarios: list[str], device=None) -> torch.Tensor:
        return torch.tensor([self.label_of(s) for s in scenarios], dtype=torch.long, device=device)  # (N,)

    @property
    def codec_info(self) -> dict:
        return {"kind": self.codec_kind, "source": self.codec_source, "scale_factor": self.codec_scale,
                "dtype": self.codec_dtype}

    @property
    def codec_id(self) -> str:
        return format_codec_id(self.codec_kind, self.codec_source)

    def load_codec(self, device="cpu"):
        return load_codec(self.codec_kind, self.codec_source, self.codec_scale, self.codec_dtype).to(device)


# ----------------------------------------------------------------------------- codec facts


def _codec_section(codec) -> dict | None:
    """A CodecConfig, a plain dict or None -> a plain dict."""
    if codec is None:
        return None
    if hasattr(codec, "model_dump"):
        return codec.model_dump()
    return dict(codec)


def codec_geometry(kind: str, source: str | None) -> tuple[int, int]:
    """(latent channels, spatial factor) of a codec, read from its config without loading weights."""
    if kind == "pixel":
        return 3, 1
    try:
        return vae_geometry(read_vae_config(source))
    except (ValueError, KeyError) as e:
        raise ValueError(f"model.codec: {e}") from None


def _default_codec(in_channels: int, ref: str = "") -> dict:
    if in_channels == 3:
        return {"kind": "pixel", "source": None, "scale_factor": None, "dtype": "float32"}
    # the shipped tiny DiT samples the shipped tiny VAE's latents; other 4-channel DiTs sd-vae-ft-ema's
    source = TINY_VAE if str(ref).startswith(TINY_DIT) else DEFAULT_VAE
    return {"kind": "autoencoder_kl", "source": source, "scale_factor": None, "dtype": "float32"}


# ----------------------------------------------------------------------------- references


def _local_copy(uri: str, workdir: Path) -> Path:
    """A remote file or directory copied into `workdir`; a local one is returned as it is."""
    if not storage.is_remote(uri):
        return Path(uri)
    workdir.mkdir(parents=True, exist_ok=True)
    if storage.is_dir(uri):
        dst = workdir / "model"
        storage.download_dir(uri, str(dst))
        return dst
    if not storage.exists(uri):
        raise FileNotFoundError(f"model reference {uri} does not exist")
    dst = workdir / uri.rstrip("/").rsplit("/", 1)[-1]
    dst.write_bytes(storage.read_bytes(uri))
    return dst


def _is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / BUNDLE_FILE).is_file()


def load_sampling_model(ref: str, *, class_names: list[str] | dict[str, int] | None = None, codec=None,
                        tracking_uri: str | None = None, device="cpu") -> SamplingModel:
    """Load `ref` (see the module doc) onto `device`, in eval mode, with its vocabulary.

    `codec` (a CodecConfig or dict) overrides the bundle's or the default codec, e.g. to point at a
    local copy of the VAE. Raises ValueError naming the reference for anything unusable.
    """
    codec_override = _codec_section(codec)
    with tempfile.TemporaryDirectory(prefix="drivedit-model-") as tmp:
        if ref.startswith("models:/"):
            from drivedit.tracking import download_registered_bundle

            if class_names is not None:
                raise ValueError(f"{ref} is a registered adapter bundle, which carries its own scenario vocabulary; "
                                 f"remove model.class_names")

            path = download_registered_bundle(ref, Path(tmp) / "bundle", tracking_uri=tracking_uri)
            sm = _from_bundle(path, version=ref, device=device, workdir=Path(tmp))
        else:
            path = _local_copy(ref, Path(tmp)) if storage.is_remote(ref) else resolve_model_source(ref)
            if _is_bundle(path):
                if class_names is not None:
                    raise ValueError(f"{ref} is an adapter bundle, which carries its own scenario vocabulary; "
                                     f"remove model.class_names")
                sm = _from_bundle(path, version=f"bundle:{ref}", device=device, workdir=Path(tmp))
            else:
                sm = _from_checkpoint(path, ref, class_names, device)
    if codec_override is not None:
        sm.codec_kind, sm.codec_source = codec_override["kind"], codec_override.get("source")
        sm.codec_scale, sm.codec_dtype = codec_override.get("scale_factor"), codec_override.get("dtype") or "float32"
    _check_codec(sm)
    sm.ref = ref
    return sm


def _check_codec(sm: SamplingModel) -> None:
    channels, factor = codec_geometry(sm.codec_kind, sm.codec_source)
    if channels != sm.model.in_channels:
        raise ValueError(f"{sm.version} samples {sm.model.in_channels}-channel latents but the codec "
                         f"{sm.codec_id} has {channels}; set model.codec to the codec the model was trained with")
    size = sm.model.config.input_size
    if sm.trained_image_size and size * factor != sm.trained_image_size:
        raise ValueError(f"{sm.version} was trained on {sm.trained_image_size} px images as {size}x{size} latents "
                         f"(factor {sm.trained_image_size // size}) but the codec {sm.codec_id} has factor {factor}; "
                         f"set model.codec to the codec the model was trained with")
    sm.image_size = size * factor


def _from_checkpoint(path: Path, ref: str, class_names, device) -> SamplingModel:
    if class_names is None and ref == TINY_DIT:
        class_names = TINY_DIT_CLASSES
    if class_names is None:
        raise ValueError(f"{ref} is a plain DiT checkpoint without a scenario vocabulary; set model.class_names "
                         f"to name its class ids (a list for ids 0..n-1, or a mapping such as {{snowplow: 803}})")
    model = load_dit(path, map_location="cpu").to(device).eval().requires_grad_(False)
    num_classes = model.config.num_classes
    pairs = list(enumerate(class_names)) if isinstance(class_names, list) else \
        [(i, n) for n, i in class_names.items()]
    bad = [f"{n}={i}" for i, n in pairs if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"model.class_names: class ids {', '.join(bad)} are outside the checkpoint's "
                         f"{num_classes} classes (0..{num_classes - 1})")
    digest = storage.sha256_path(path)
    superclass_of = getattr(model.y_embedder, "superclass_of", None)
    return SamplingModel(model=model, scenarios=[n for _, n in pairs], class_ids=[i for i, _ in pairs],
                         betas=linear_betas(), image_size=0, version=f"checkpoint:{ref}", digest=digest,
                         superclass_of=superclass_of, **_codec_fields(_default_codec(model.in_channels, ref)))


def _section_from_codec_id(recorded_id: str) -> dict:
    """A bundle's recorded codec id -> a codec section."""
    kind, source = parse_codec_id(recorded_id)
    return {"kind": kind, "source": source, "scale_factor": None, "dtype": "float32"}


def _codec_fields(section: dict) -> dict:
    return {"codec_kind": section["kind"], "codec_source": section.get("source"),
            "codec_scale": section.get("scale_factor"), "codec_dtype": section.get("dtype") or "float32"}


def _from_bundle(path: Path, version: str, device, workdir: Path) -> SamplingModel:
    from drivedit.models.bundle import load_bundle, merge

    bundle = load_bundle(path)
    if storage.is_remote(bundle.info.base):
        # the fine-tuning job read its base from object storage; so do we (load_base checks the sha256)
        bundle.info.base = str(_local_copy(bundle.info.base, workdir / "base"))
    model = merge(None, bundle, keep_layout=True).to(device).eval().requires_grad_(False)
    superclass_of = getattr(model.y_embedder, "superclass_of", None)
    scenarios = list(bundle.scenarios)
    trained = bundle.info.extra.get("image_size")
    return SamplingModel(model=model, scenarios=scenarios, class_ids=list(range(len(scenarios))),
                         betas=bundle.betas, image_size=0, version=version, digest=storage.sha256_path(path),
                         superclass_of=superclass_of, trained_image_size=int(trained) if trained else None,
                         **_codec_fields(_section_from_codec_id(bundle.codec)))
