"""Everything about a fine-tuning job that can be checked before any Ray worker starts.

`check(raw)` validates the config and then reads what the config points at (the shards, the base
checkpoint, a run being resumed), collecting every problem; `ConfigError` lists them all at once.
Sections that are valid on their own are checked against the files even when another section is
not, so one run of the job reports a bad method name and missing shards together.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from drivedit import storage
from drivedit.config.base import ConfigError, format_validation_error
from drivedit.config.common import ScalingConfig, TrackingConfig
from drivedit.config.finetune import (DataSection, DrillSection, FinetuneJob, LayoutSection, ModelSection, OptimSection,
                                      RunSection, cross_field_problems)
from drivedit.config.method import MethodConfig
from drivedit.train import state as st

# method fields that decide which tensors exist: a resumed run must keep them
STRUCTURAL_METHOD_FIELDS = ("name", "rank", "lora_alpha", "select", "budget", "difffit_blocks", "superclasses")
_STEP_DIR = re.compile(rf"{st.CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class Plan:
    """What preflight resolved for the run."""

    job: FinetuneJob
    run_dir: str
    shards: object  # ShardMetadata
    base_path: Path
    base_ref: str
    base_config: object  # DiTConfig
    latest: dict | None  # meta.json of the newest checkpoint in run_dir, with "uri"


def run_dir_of(run: RunSection) -> str:
    return storage.join(run.storage_path, run.name)


def latest_checkpoint(run_dir: str) -> dict | None:
    """meta.json (plus its directory as "uri") of the newest complete-looking checkpoint under run_dir."""
    import json

    best = None
    for uri in storage.list_files(run_dir, suffixes=[st.META_FILE]):
        parent = uri.rsplit("/", 2)
        if len(parent) < 3:
            continue
        m = _STEP_DIR.match(parent[-2])
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), uri)
    if best is None:
        return None
    meta = json.loads(storage.read_bytes(best[1]))
    meta["uri"] = best[1].rsplit("/", 1)[0]
    return meta


def _section(model, raw: dict, key: str):
    try:
        return model.model_validate(raw.get(key, {}) if isinstance(raw, dict) else {})
    except ValidationError:
        return None


def _check_shards(data: DataSection, optim: OptimSection | None, problems: list[str]):
    from drivedit.data.shards import read_shard_metadata

    try:
        meta = read_shard_metadata(data.shards)
    except (FileNotFoundError, ValueError, OSError) as e:
        problems.append(f"data.shards: {e}")
        return None
    _check_shard_codec(meta, problems)
    if optim is not None and meta.num_rows < optim.global_batch_size:
        problems.append(f"data.shards: {meta.num_rows} rows cannot fill one step of optim.global_batch_size "
                        f"{optim.global_batch_size}; encode more frames or lower the batch size")
    if data.source_shards:
        try:
            src = read_shard_metadata(data.source_shards)
            if tuple(src.latent_shape) != tuple(meta.latent_shape):
                problems.append(f"data.source_shards latents {src.latent_shape} differ from data.shards' "
                                f"{meta.latent_shape}")
        except (FileNotFoundError, ValueError, OSError) as e:
            problems.append(f"data.source_shards: {e}")
    return meta


def _check_layout(layout: LayoutSection, shards, base_config, problems: list[str]) -> None:
    """A layout branch needs shards with a layout map (version 2, box categories), segmentation classes when it
    reads segmentation, and a depth the base has."""
    if layout.kind == "none":
        return
    if shards is not None:
        if not shards.box_categories:
            problems.append(f"layout.kind {layout.kind} needs shards with a layout map, but data.shards (format version "
                            f"{shards.version}) have no box categories; re-encode them with this drivedit "
                            "(drivedit encode) from a dataset with boxes, or set layout.kind: none")
        if layout.use_segmentation and not shards.segmentation_classes:
            problems.append("layout.use_segmentation needs shards with segmentation classes, but data.shards have "
                            "none; encode from a dataset with masks or set layout.use_segmentation: false")
    if base_config is not None:
        depth = layout.resolved_depth(base_config.depth)
        if depth > base_config.depth:
            problems.append(f"layout.depth {depth} exceeds the base model's {base_config.depth} blocks")


def _check_shard_codec(meta, problems: list[str]) -> None:
    """The VAE the shards were encoded with decodes the sample grids: where it is a built-in or a local
    directory, it must still hold weights and still have the shards' latent channels and factor."""
    kind, _, source = meta.codec_id.partition(":")
    if kind != "autoencoder_kl" or not (source.startswith("builtin:") or Path(source).is_dir()):
        return  # a hub id or s3:// VAE is resolved where the grids are drawn
    from drivedit.models.codec import read_vae_config, vae_geometry

    try:
        channels, factor = vae_geometry(read_vae_config(source))
    except (ValueError, KeyError) as e:
        problems.append(f"data.shards were encoded with {meta.codec_id}, which decodes the sample grids: {e}")
        return
    c, h, _ = meta.latent_shape
    shard_factor = meta.resolution // h
    if (channels, factor) != (c, shard_factor):
        problems.append(f"data.shards hold {c}-channel latents at factor {shard_factor} ({meta.resolution} px -> "
                        f"{h}x{h}) but their VAE {source} has {channels} latent channels at factor {factor}; "
                        f"re-encode the shards with this VAE or restore the one they were written with")


def _check_base(model: ModelSection, shards, problems: list[str]):
    from drivedit.models.checkpoint import BUILTIN_PREFIX, check_dit_checkpoint, resolve_model_source
    from drivedit.models.dit import dit_config, model_name

    try:
        path = resolve_model_source(model.source).absolute()  # workers run in another directory
        found = check_dit_checkpoint(path)  # missing keys and wrong shapes fail here, not in the workers
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        problems.append(f"model.source: {e}")
        return None, None
    ref = model.source if model.source.startswith(BUILTIN_PREFIX) else str(Path(path).resolve())
    if model.name is not None:
        try:
            want = dit_config(model.name, input_size=found.input_size)
        except ValueError as e:
            problems.append(f"model.name: {e}")
        else:
            diffs = [f"{k} {getattr(want, k)} (configured) vs {getattr(found, k)} (checkpoint)"
                     for k in ("depth", "hidden_size", "num_heads", "patch_size") if getattr(want, k) != getattr(found, k)]
            if diffs:
                problems.append(f"model.source {model.source} is a {model_name(found) or 'custom-size'} DiT, not the "
                                f"configured model.name {model.name}: " + "; ".join(diffs))
    if shards is not None:
        c, h, w = shards.latent_shape
        if (found.in_channels, found.input_size) != (c, h):
            problems.append(f"model.source takes {found.in_channels}x{found.input_size}x{found.input_size} latents but "
                            f"data.shards hold {c}x{h}x{w} ({shards.codec_id} at {shards.resolution} px); encode at "
                            f"the base model's resolution and codec")
    if model.class_names is not None and len(model.class_names) != found.num_classes:
        problems.append(f"model.class_names has {len(model.class_names)} names for a base with "
                        f"{found.num_classes} classes")
    return (path, ref), found


def _check_resume(latest: dict, method: MethodConfig | None, model: ModelSection | None, shards,
                  optim: OptimSection | None, problems: list[str]) -> None:
    where = latest["uri"]
    if shards is not None and list(latest.get("scenarios", [])) != list(shards.scenarios):
        problems.append(f"data.shards' scenario vocabulary {shards.scenarios} differs from the one of the run being "
                        f"resumed ({latest.get('scenarios')} in {where}); use the same shards or a new run.name")
    if method is not None:
        old = latest.get("method", {})
        new = method.model_dump(mode="json")
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in STRUCTURAL_METHOD_FIELDS if old.get(k) != new.get(k)]
        if changed:
            problems.append(f"the method differs from the run being resumed ({where}): " + "; ".join(changed)
                            + "; keep it or start a new run.name")
    if model is not None:
        old = latest.get("model", {})
        if old.get("source") != model.source:
            problems.append(f"model.source {model.source} differs from the run being resumed ({old.get('source')}); "
                            f"keep it or start a new run.name")
    if optim is not None and int(latest.get("step", 0)) > optim.total_steps:
        problems.append(f"the run being resumed is at step {latest['step']}, past optim.total_steps "
                        f"{optim.total_steps}; raise total_steps or start a new run.name")


# (section, field) of local paths that Ray workers read: they run in another working directory
_PATH_FIELDS = (("data", "shards"), ("data", "source_shards"), ("run", "storage_path"))


def _with_absolute_paths(raw: dict) -> dict:
    """A copy of raw with its relative local paths made absolute against the driver's directory."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for section, field in _PATH_FIELDS:
        sec = out.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(field), str) and sec[field]:
            out[section] = {**sec, field: storage.absolute(sec[field])}
    return out


def check(raw: dict, source: str = "(config)") -> Plan:
    """Validate a raw config dict and everything it points at; raise ConfigError with every problem."""
    problems: list[str] = []
    job = None
    raw = _with_absolute_paths(raw)
    try:
        job = FinetuneJob.model_validate(raw)
    except ValidationError as e:
        problems += format_validation_error(e)
    get = (lambda key, model: getattr(job, key)) if job is not None else (lambda key, model: _section(model, raw, key))
    data, optim = get("data", DataSection), get("optim", OptimSection)
    model, method, run = get("model", ModelSection), get("method", MethodConfig), get("run", RunSection)
    shards = _check_shards(data, optim, problems) if data is not None else None
    base, base_config = _check_base(model, shards, problems) if model is not None else (None, None)
    layout = get("layout", LayoutSection)
    if layout is not None:
        _check_layout(layout, shards, base_config, problems)
    latest = None
    if run is not None:
        try:
            latest = latest_checkpoint(run_dir_of(run))
        except (OSError, ValueError) as e:
            problems.append(f"run.storage_path: cannot read {run_dir_of(run)}: {e}")
        if latest is not None:
            _check_resume(latest, method, model, shards, optim, problems)
            if layout is not None and latest.get("layout", {"kind": "none"}) != layout.model_dump(mode="json") \
                    and not (layout.kind == "none" and "layout" not in latest):
                problems.append(f"the layout section differs from the run being resumed ({latest['uri']}): "
                                f"{latest.get('layout')} -> {layout.model_dump(mode='json')}; keep it or start a new "
                                "run.name")
    if job is None:  # the root validator did not run: check across the sections that are valid
        problems += cross_field_problems(model, optim, get("scaling", ScalingConfig), run,
                                         get("tracking", TrackingConfig), get("drill", DrillSection))
    if problems:
        raise ConfigError(source, problems)
    return Plan(job=job, run_dir=run_dir_of(job.run), shards=shards, base_path=base[0], base_ref=base[1],
                base_config=base_config, latest=latest)
