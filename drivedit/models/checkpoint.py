"""Load a DiT from any of the formats people actually have, and write them back.

Sources `load_dit` accepts:
  (a) an official bare state dict `.pt` (DiT-XL-2-256x256.pt),
  (b) a DiT `train.py` checkpoint dict {"model", "ema", "opt", "args"} (the EMA weights are used),
  (c) a diffusers `DiTTransformer2DModel` / legacy `Transformer2DModel` directory (or a pipeline
      directory with a `transformer/` subfolder),
  (d) a `.safetensors` file; ours carry the DiTConfig as JSON in the header metadata,
  and `builtin:<name>` for the models shipped in `drivedit/assets/`.

Pickles are read with `weights_only=True`; the only class allowed besides tensors and plain
containers is `argparse.Namespace` (train.py's `args`). The architecture is inferred from tensor
shapes (metadata fills what shapes cannot tell: heads, the rope grid). Imports torch, numpy,
safetensors, diffusers (through diffusers_format) and storage.py (atomic writes) only.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .diffusers_format import (DiffusersFormatError, config_fields_from_diffusers, diffusers_config,
                               diffusers_to_official, official_to_diffusers)
from ..storage import atomic_local_dir, atomic_local_file
from .dit import DIT_SIZES, DiT, DiTConfig
from .posenc import ROTARY_POSENCS, sincos_2d_pos_embed

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_PREFIX = "builtin:"
METADATA_KEY = "drivedit.dit_config"
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_LIST_LIMIT = 30


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the DiT architecture it is loaded into."""

    def __init__(self, source: str, missing=(), unexpected=(), conflicts=(), config_problems=()):
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        self.conflicts, self.config_problems = list(conflicts), list(config_problems)
        parts = []
        if self.config_problems:
            parts.append("config mismatch: " + "; ".join(self.config_problems))
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape conflicts", self.conflicts)):
            if items:
                shown = ", ".join(items[:_LIST_LIMIT])
                more = f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
                parts.append(f"{name}: {shown}{more}")
        super().__init__(f"checkpoint {source} does not fit the DiT it is loaded into; " + " | ".join(parts))


# ----------------------------------------------------------------------------- sources


def builtin_models() -> dict[str, Path]:
    """name -> file of every model shipped in drivedit/assets/."""
    if not ASSETS_DIR.is_dir():
        return {}
    return {p.name.split(".")[0]: p for p in sorted(ASSETS_DIR.iterdir())
            if p.suffix in (".safetensors", ".pt", ".pth") or (p / "config.json").is_file()}


def resolve_model_source(ref: str | Path) -> Path:
    """`builtin:<name>` -> the shipped file; anything else is a path that must exist."""
    text = str(ref)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        available = builtin_models()
        if name not in available:
            names = ", ".join(f"builtin:{n}" for n in available) or "none are shipped in this install"
            raise ValueError(f"unknown built-in model {text!r}; available: {names}")
        return available[name]
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {text!r} does not exist; give a checkpoint file (.pt, "
                                f".safetensors), a diffusers directory, or builtin:<name>")
    return path


# ----------------------------------------------------------------------------- reading


def _torch_load_safely(path: Path, map_location) -> object:
    try:
        # argparse.Namespace is what train.py checkpoints carry in "args"; nothing else is allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"refusing to load {path}: it holds a Python object other than tensors and plain containers "
            f"({first}). drivedit never unpickles arbitrary objects; re-save the weights as a bare state dict "
            f"(torch.save(model.state_dict(), path)) or as .safetensors") from None
    except RuntimeError as e:
        raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from None


def _state_from_pickle(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The weight dict inside a loaded pickle: a bare state dict, or train.py's dict (its EMA)."""
    hints: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        if isinstance(obj.get("args"), argparse.Namespace):
            hints = {k: v for k, v in vars(obj["args"]).items() if k in ("model", "image_size", "num_classes")}
        obj = obj["ema"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "opt" in obj:
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or a DiT train.py checkpoint")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a state dict: entries {', '.join(map(str, bad[:5]))} are not tensors")
    state = dict(obj)
    # DDP / torch.compile wrappers prefix every key
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, hints


def _diffusers_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    raise ValueError(f"{path} is a directory without config.json (or transformer/config.json); "
                     f"a diffusers DiTTransformer2DModel directory is expected")


def _read_diffusers_weights(d: Path) -> dict[str, torch.Tensor]:
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_weight_file(d / shard))
            return state
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (d / name).is_file():
            return _read_weight_file(d / name)
    found = ", ".join(sorted(p.name for p in d.iterdir())) or "nothing"
    raise ValueError(f"{d} has no diffusion_pytorch_model.safetensors or .bin (found: {found})")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state, _ = _state_from_pickle(_torch_load_safely(path, "cpu"), path)
    return state


def read_checkpoint(source: str | Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(official-keyed state dict, hints) of any supported source; hints hold DiTConfig fields
    the file states (safetensors metadata, diffusers config.json, train.py args)."""
    path = resolve_model_source(source)
    if path.is_dir():
        d = _diffusers_dir(path)
        try:
            hints = config_fields_from_diffusers(json.loads((d / "config.json").read_text()), str(d))
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / 'config.json'} is not valid JSON: {e}") from None
        state = diffusers_to_official(_read_diffusers_weights(d))
        # diffusers rebuilds the fixed sin-cos table instead of storing it; so do we
        grid = hints["input_size"] // hints["patch_size"]
        state["pos_embed"] = torch.from_numpy(sincos_2d_pos_embed(hints["hidden_size"], grid)).float().unsqueeze(0)
        return {k: v.to(map_location) for k, v in state.items()}, hints
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if str(map_location) == "meta":  # shapes only: read the header, not the data
                state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        try:
            hints = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: the {METADATA_KEY} metadata is not valid JSON: {e}") from None
        if str(map_location) != "meta":
            state = {k: v.to(map_location) for k, v in load_file(str(path)).items()}
        return state, hints
    state, hints = _state_from_pickle(_torch_load_safely(path, map_location), path)
    return state, _hints_from_train_args(hints)


def _hints_from_train_args(args: dict) -> dict:
    """train.py's args name the registry model and image size; keep what they determine for sure."""
    hints: dict = {}
    name = str(args.get("model", ""))
    size = name.split("/")[0]
    if size in DIT_SIZES:
        hints["num_heads"] = DIT_SIZES[size][2]
    return hints


# ----------------------------------------------------------------------------- config inference


def infer_config(shapes: dict[str, tuple[int, ...]], hints: dict | None = None) -> DiTConfig:
    """The DiTConfig of an official-keyed state dict, from its tensor shapes plus stated hints."""
    hints = dict(hints or {})
    unknown = set(hints) - {f.name for f in fields(DiTConfig)}
    if unknown:
        raise ValueError(f"checkpoint metadata names unknown DiT config fields: {', '.join(sorted(unknown))}")
    if "x_embedder.proj.weight" not in shapes:
        some = ", ".join(sorted(shapes)[:6]) or "no tensors"
        raise CheckpointMismatchError("(state dict)", missing=["x_embedder.proj.weight"],
                                      config_problems=[f"not an official-keyed DiT state dict (keys: {some} ...)"])
    hidden, in_ch, patch, _ = shapes["x_embedder.proj.weight"]
    block_ids = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    fc1 = shapes.get("blocks.0.mlp.fc1.weight")
    table = shapes.get("y_embedder.embedding_table.weight")
    final = shapes.get("final_layer.linear.weight")
    fields_: dict = {"hidden_size": hidden, "in_channels": in_ch, "patch_size": patch,
                     "depth": max(block_ids) + 1 if block_ids else 0}
    if fc1 is not None:
        fields_["mlp_ratio"] = fc1[0] / hidden
    if final is not None:
        out_ch = final[0] // (patch * patch)
        if out_ch not in (in_ch, 2 * in_ch):
            raise ValueError(f"final_layer.linear predicts {out_ch} channels for {in_ch} input channels; "
                             f"a DiT predicts either eps ({in_ch}) or eps and variance ({2 * in_ch})")
        fields_["learn_sigma"] = out_ch == 2 * in_ch
    if table is not None:
        # the official table carries one extra "null" row for classifier-free guidance
        null_row = hints.get("class_dropout_prob", 0.1) > 0
        fields_["num_classes"] = table[0] - int(null_row)
    if "pos_embed" in shapes:
        tokens = shapes["pos_embed"][1]
        grid = int(round(tokens ** 0.5))
        fields_["posenc"], fields_["input_size"] = "abs", grid * patch
    else:
        # rope and gta hold the same tensors: only metadata or the caller's config can tell them apart
        fields_["posenc"] = "rope"
    heads = next((h for d, w, h in DIT_SIZES.values() if (d, w) == (fields_["depth"], hidden)), None)
    if heads is not None:
        fields_["num_heads"] = heads
    fields_.update(hints)  # what the file states wins: a stated depth makes a missing last block show up
    if "input_size" not in fields_:
        raise ValueError("cannot infer the latent size or the position encoding: the checkpoint has no pos_embed "
                         "(a rope or gta model: their tensors are the same) and no metadata; pass "
                         "config=DiTConfig(...) with the input_size and posenc it was trained with, or save it "
                         "as .safetensors, which records both")
    if "num_heads" not in fields_:
        if hidden % 64:
            raise ValueError(f"cannot infer the number of heads for hidden size {hidden} (not a registry size, "
                             f"no metadata); pass config=DiTConfig(...)")
        fields_["num_heads"] = hidden // 64
    cfg = DiTConfig(**fields_)
    cfg.validate()
    return cfg


_SHAPE_FIELDS = ("depth", "hidden_size", "patch_size", "in_channels", "learn_sigma", "num_classes",
                 "input_size", "mlp_ratio", "posenc")


def _config_problems(wanted: DiTConfig, found: DiTConfig) -> list[str]:
    return [f"{name} is {getattr(wanted, name)!r} in the given config but {getattr(found, name)!r} in the checkpoint"
            for name in _SHAPE_FIELDS if getattr(wanted, name) != getattr(found, name)]


def read_dit_config(source: str | Path) -> DiTConfig:
    """The architecture of a checkpoint without building the model."""
    state, hints = read_checkpoint(source, map_location="meta")
    return infer_config({k: tuple(v.shape) for k, v in state.items()}, hints)


# ----------------------------------------------------------------------------- loading


def _check_fits(model: DiT, state: dict[str, torch.Tensor], source: str, config_problems=()) -> None:
    """CheckpointMismatchError listing every missing, unexpected and wrongly shaped tensor of `state` for `model`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    conflicts = [f"{k} checkpoint {got[k]} vs model {expected[k]}" for k in sorted(expected.keys() & got.keys())
                 if got[k] != expected[k]]
    missing, unexpected = expected.keys() - got.keys(), got.keys() - expected.keys()
    if missing or unexpected or conflicts or config_problems:
        raise CheckpointMismatchError(source, missing, unexpected, conflicts, config_problems)


def check_dit_checkpoint(source: str | Path) -> DiTConfig:
    """The architecture of a checkpoint, after checking that its tensors fit it exactly (what `load_dit` would
    refuse is refused here, with every key and shape listed), without reading the weights: a preflight check."""
    state, hints = read_checkpoint(source, map_location="meta")
    config = infer_config({k: tuple(v.shape) for k, v in state.items()}, hints)
    with torch.device("meta"):
        model = DiT(config)
    _check_fits(model, state, str(source))
    return config


def build_from_state(state: dict[str, torch.Tensor], config: DiTConfig, source: str = "(state dict)",
                     map_location="cpu", config_problems=()) -> DiT:
    """A DiT holding exactly `state` (strict): built on the meta device, weights assigned, not initialised."""
    with torch.device("meta"):
        model = DiT(config)
    _check_fits(model, state, source, config_problems)
    # float32 master weights whatever the file stored (fp16 exports exist); samplers autocast on GPU
    state = {k: (v.float() if v.is_floating_point() else v).to(map_location) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.posenc in ROTARY_POSENCS:
        model.set_rotary_tables(map_location)  # non-persistent: in no checkpoint, recomputed on the target device
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors left unmaterialised: {left}"
    return model.eval()


def load_dit(source: str | Path, *, config: DiTConfig | None = None, map_location="cpu") -> DiT:
    """Load a DiT from any supported source (see the module doc). `config`, when given, must match."""
    state, hints = read_checkpoint(source, map_location="cpu")
    if config is not None:
        # what tensors cannot tell (heads, whether the table has a null row) comes from the config
        # unless the file states it; a rope checkpoint without metadata also takes its grid from it
        hints.setdefault("num_heads", config.num_heads)
        hints.setdefault("class_dropout_prob", config.class_dropout_prob)
        if "pos_embed" not in state and "input_size" not in hints:
            hints.update(posenc=config.posenc, input_size=config.input_size)
    found = infer_config({k: tuple(v.shape) for k, v in state.items()}, hints)
    problems = _config_problems(config, found) if config is not None else []
    return build_from_state(state, config or found, str(source), map_location, problems)


# ----------------------------------------------------------------------------- writing


def _plain_state(model: DiT) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def export_official(model: DiT, path: str | Path) -> Path:
    """Bare state dict with the official keys (loads into facebookresearch/DiT's `DiT_models`)."""
    path = Path(path)
    with atomic_local_file(path) as tmp:
        torch.save(_plain_state(model), tmp)
    return path


def export_safetensors(model: DiT, path: str | Path) -> Path:
    """safetensors with the DiTConfig in the header, so loading needs no guessing."""
    path = Path(path)
    with atomic_local_file(path) as tmp:
        save_file(_plain_state(model), str(tmp),
                  metadata={"format": "pt", METADATA_KEY: json.dumps(model.config.to_dict())})
    return path


def diffusers_transformer(model: DiT, state: dict[str, torch.Tensor] | None = None, cfg: DiTConfig | None = None):
    """Our DiT as a `DiTTransformer2DModel` in memory (on the CPU, its own copy of the weights), by the
    key mapping `export_diffusers` saves. `state` / `cfg` (official keys) replace the model's own, e.g. the
    DiTPipeline export's relaid label table."""
    from diffusers import DiTTransformer2DModel

    cfg = cfg or model.config
    state = official_to_diffusers(_plain_state(model) if state is None else state, cfg.depth)
    with torch.device("meta"):
        transformer = DiTTransformer2DModel(**diffusers_config(cfg))
    try:
        transformer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise DiffusersFormatError(f"the model's tensors do not map onto DiTTransformer2DModel: {e}") from None
    # the sin-cos pos_embed buffer is not persistent: rebuild it for the (meta-built) module
    grid = cfg.input_size // cfg.patch_size
    table = torch.from_numpy(sincos_2d_pos_embed(cfg.hidden_size, grid)).float().unsqueeze(0)
    transformer.pos_embed.register_buffer("pos_embed", table, persistent=False)
    return transformer.eval()


def export_diffusers(model: DiT, directory: str | Path) -> Path:
    """A directory `DiTTransformer2DModel.from_pretrained` loads: a faithful key mapping.

    The loaded diffusers model differs numerically from ours in two documented places
    (timestep frequency shift, norm3 eps; see diffusers_format.patch_for_parity).
    """
    directory = Path(directory)
    transformer = diffusers_transformer(model)
    with atomic_local_dir(directory) as tmp:
        transformer.save_pretrained(tmp, safe_serialization=True)
    return directory
