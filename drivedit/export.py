"""`drivedit export`: merge an adapter bundle into its base and write the full model.

The merged model is a plain DiT with the official keys (num_classes = the bundle's scenarios), so
it loads in facebookresearch/DiT, in `drivedit` as a base for another fine-tune, and (diffusers
format) with `DiTTransformer2DModel.from_pretrained`. `--diffusers-pipeline` writes a whole `DiTPipeline`
directory (transformer with the label table laid out for the pipeline, VAE, scheduler, scenario
names as id2label; see drivedit/pipeline_export.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from drivedit import storage


def export_bundle(bundle_ref: str, *, base: str | None = None, official: str | None = None,
                  safetensors: str | None = None, diffusers: str | None = None,
                  diffusers_pipeline: str | None = None, tracking_uri: str | None = None) -> dict:
    """Merge `bundle_ref` (a bundle directory, s3:// URI or models:/NAME/VERSION) and write the formats asked for."""
    from drivedit.models.bundle import load_bundle, merge
    from drivedit.models.checkpoint import export_diffusers, export_official, export_safetensors, load_dit
    from drivedit.models.diffusers_format import diffusers_config

    if not (official or safetensors or diffusers or diffusers_pipeline):
        raise ValueError("nothing to write: give at least one of --official, --safetensors, --diffusers, "
                         "--diffusers-pipeline")
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_bundle(bundle_ref, Path(tmp), tracking_uri)
        bundle = load_bundle(local)
        if bundle.spec.layout is not None:
            kind = bundle.spec.layout["kind"]
            raise ValueError(f"{bundle_ref} carries a {kind} layout branch; the official .pt, safetensors and "
                             "diffusers DiTTransformer2DModel formats hold a plain DiT only, so an export would "
                             "silently drop the layout conditioning. Use the bundle itself with drivedit generate "
                             "and serve (they load the branch)")
        base_model = load_dit(base, config=bundle.model_config) if base else None
        model = merge(base_model, bundle)
    if diffusers:
        diffusers_config(model.config)  # refuses what diffusers cannot hold (e.g. rope / gta) before writing anything
    written, notes = {}, []
    if diffusers_pipeline:
        from drivedit.pipeline_export import write_dit_pipeline

        # first: it is the one format a model can be refused for, and nothing is written before the refusal
        written["diffusers_pipeline"] = str(write_dit_pipeline(
            model, diffusers_pipeline, scenarios=bundle.scenarios, betas=bundle.betas, codec_id=bundle.codec))
    if official:
        written["official"] = str(export_official(model, official))
        if model.config.posenc != "abs":
            cfg = model.config
            notes.append(f"the official .pt has no field for posenc {cfg.posenc!r} and no pos_embed to read the grid "
                         f"from: load it with config posenc={cfg.posenc!r}, input_size={cfg.input_size} "
                         f"(drivedit: load_dit(path, config=...)), or use the .safetensors, which records both")
    if safetensors:
        written["safetensors"] = str(export_safetensors(model, safetensors))
    if diffusers:
        written["diffusers"] = str(export_diffusers(model, diffusers))
    return {"scenarios": bundle.scenarios, "num_classes": model.config.num_classes, "posenc": model.config.posenc,
            "written": written, "notes": notes}


def _local_bundle(ref: str, tmp: Path, tracking_uri: str | None) -> Path:
    if ref.startswith("models:/"):
        from drivedit.tracking import download_registered_bundle

        return download_registered_bundle(ref, tmp / "bundle", tracking_uri=tracking_uri)
    if storage.is_remote(ref):
        storage.download_dir(ref, str(tmp / "bundle"))
        return tmp / "bundle"
    return Path(ref)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="drivedit export", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="adapter bundle: a directory, an s3:// URI or models:/NAME/VERSION")
    p.add_argument("--base", help="base checkpoint to merge into (default: the bundle's recorded base)")
    p.add_argument("--official", help="write the merged model as an official DiT state dict (.pt)")
    p.add_argument("--safetensors", help="write the merged model as .safetensors (with its config)")
    p.add_argument("--diffusers", help="write the merged model as a diffusers DiTTransformer2DModel directory")
    p.add_argument("--diffusers-pipeline", metavar="DIR",
                   help="write a diffusers DiTPipeline directory (transformer, VAE, DDIM scheduler, scenario names "
                        "as id2label) that DiTPipeline.from_pretrained(DIR) loads; latent-space models only")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ references")
    args = p.parse_args(argv)
    try:
        out = export_bundle(args.bundle, base=args.base, official=args.official, safetensors=args.safetensors,
                            diffusers=args.diffusers, diffusers_pipeline=args.diffusers_pipeline,
                            tracking_uri=args.tracking_uri)
    except (ValueError, FileNotFoundError) as e:
        print(storage.redact(f"drivedit export: {e}"), file=sys.stderr)
        return 2
    print(storage.redact(json.dumps(out, indent=2)))
    return 0
