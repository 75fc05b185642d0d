"""A fine-tuned model as a diffusers `DiTPipeline` directory (`drivedit export --diffusers-pipeline DIR`).

`DiTPipeline` samples with a fixed recipe: it contrasts every label with class id 1000 for
classifier-free guidance whatever the label table's size, decodes with
`vae.decode(latents / vae.config.scaling_factor)`, and gives the scheduler only the eps channels.
So the directory holds
- `transformer/`: the merged DiT with a 1001-row label table: row i < S is scenario i, row 1000 is
  the model's null row, and rows S..999 are copies of the null row (an id the vocabulary does not
  name samples unconditionally instead of reading an untrained row);
- `vae/`: the AutoencoderKL the model was trained with, its scaling factor the one training used;
- `scheduler/`: DDIM (eta 0) on the model's betas, configured as drivedit's sampler configures it
  (generate/sampler.py), so the pipeline and `drivedit generate --sampler ddim` take the same steps;
- `model_index.json` with `id2label` = the scenario vocabulary: `pipe.get_label_ids(["rainy"])`.

What remains different is diffusers' transformer forward itself (timestep frequencies /127 instead
of /128, feed-forward norm eps 1e-5 instead of 1e-6; models/diffusers_format.py): images agree
closely, not bit for bit. A pixel-space model and a FineDiffusion (tiered, superclass-guided) model
cannot be a DiTPipeline, and the error says why.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

PIPELINE_NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional class id
TABLE_KEY = "y_embedder.embedding_table.weight"


class PipelineExportError(ValueError):
    """A model that cannot be written as a DiTPipeline; the message says why and what to do instead."""


def pipeline_label_table(table: torch.Tensor, num_scenarios: int, null_row: int) -> torch.Tensor:
    """(S + 1, D) table with its null row at `null_row` -> (1001, D): scenarios first, null at 1000."""
    if num_scenarios > PIPELINE_NULL_CLASS:
        raise PipelineExportError(f"{num_scenarios} scenarios do not fit below DiTPipeline's null class id "
                                  f"{PIPELINE_NULL_CLASS}")
    null = table[null_row]  # (D,)
    out = null.expand(PIPELINE_NULL_CLASS + 1, -1).clone()  # (1001, D)
    out[:num_scenarios] = table[:num_scenarios]
    return out


def pipeline_problems(model, codec_id: str, scenarios: list[str]) -> list[str]:
    """Why `model` cannot be a DiTPipeline (empty when it can)."""
    problems = []
    if not codec_id.startswith("autoencoder_kl:"):
        problems.append(f"the model samples in {codec_id!r} space, but DiTPipeline always decodes its samples "
                        "with an AutoencoderKL (vae.decode(latents / scaling_factor)); a pixel-space model has no "
                        "VAE to decode with. Export it with --diffusers (the transformer alone) or --safetensors, "
                        "and sample it with drivedit generate / serve")
    if getattr(model.y_embedder, "superclass_of", None) is not None:
        problems.append("the model is a FineDiffusion (tiered) model that guides each label with its superclass "
                        "row and has no null row; DiTPipeline always guides with the null class 1000. Sample it "
                        "with drivedit generate (sampler.guidance_kind: superclass)")
    commas = [s for s in scenarios if "," in s]
    if commas:
        problems.append(f"scenario names {commas} contain commas, which DiTPipeline's id2label splits into "
                        "several labels; rename them")
    return problems


def write_dit_pipeline(model, directory: str | Path, *, scenarios: list[str], betas: np.ndarray,
                       codec_id: str) -> Path:
    """Write `model` (a merged DiT, num_classes = len(scenarios), null row last) as a DiTPipeline directory."""
    from diffusers import DiTPipeline

    from drivedit.generate.sampler import SamplerSettings, build_scheduler
    from drivedit.models.checkpoint import diffusers_transformer
    from drivedit.models.codec import load_codec
    from drivedit.models.diffusion import linear_betas
    from drivedit.storage import atomic_local_dir

    problems = pipeline_problems(model, codec_id, scenarios)
    if problems:
        raise PipelineExportError("cannot write a DiTPipeline: " + "; ".join(problems))
    cfg = model.config
    if cfg.num_classes != len(scenarios):
        raise PipelineExportError(f"the model has {cfg.num_classes} classes for {len(scenarios)} scenario names")
    state = {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in model.state_dict().items()}
    state[TABLE_KEY] = pipeline_label_table(state[TABLE_KEY], len(scenarios), model.y_embedder.null_label)
    transformer = diffusers_transformer(model, state, dataclasses.replace(cfg, num_classes=PIPELINE_NULL_CLASS))

    kind, _, source = codec_id.partition(":")
    codec = load_codec(kind, source)
    vae = codec.vae
    if codec.latent_channels != cfg.in_channels:
        raise PipelineExportError(f"the VAE {source} has {codec.latent_channels} latent channels; the model samples "
                                  f"{cfg.in_channels}")
    if float(vae.config.scaling_factor) != codec.scale_factor:
        vae.register_to_config(scaling_factor=codec.scale_factor)

    betas = np.asarray(betas, dtype=np.float64)
    default = len(betas) == 1000 and np.array_equal(betas, linear_betas())
    scheduler = build_scheduler(SamplerSettings(sampler="ddim"), None if default else betas, cfg.learn_sigma)
    id2label = {str(i): name for i, name in enumerate(scenarios)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # DiTPipeline reads it back from model_index.json

    with atomic_local_dir(directory) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        if index.get("id2label") != id2label:
            raise RuntimeError("diffusers did not write id2label into model_index.json; this drivedit does not "
                               "support the installed diffusers version's pipeline format")
    return Path(directory)
