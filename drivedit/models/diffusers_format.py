"""Key mapping between the official DiT state dict and diffusers' `DiTTransformer2DModel`.

diffusers keeps a copy of the timestep and class embedders inside every block and splits the
fused `qkv` projection into `to_q / to_k / to_v`; otherwise the two layouts hold the same
tensors (reference/dit.md §2). The mapping here is exact in both directions.

Two numeric differences remain in diffusers' forward, not in the weights: its timestep
sinusoid uses `downscale_freq_shift=1` (frequencies /127 instead of DiT's /128) and its
feed-forward pre-norm (`norm3`) uses eps 1e-5 instead of 1e-6. `patch_for_parity` sets both
to the official values on a loaded diffusers model; after it the outputs are identical.

Imports torch and diffusers only.
"""
from __future__ import annotations

import re

import torch

# diffusers block-level keys -> official block-level keys (everything but qkv and the embedders)
_BLOCK_MAP = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_TOP_MAP = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_EMB_MAP = {
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


class DiffusersFormatError(ValueError):
    """A diffusers directory or state dict that is not an official-architecture DiT."""


def official_to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official keys -> diffusers keys; `pos_embed` is dropped (diffusers rebuilds the same table)."""
    out: dict[str, torch.Tensor] = {}
    for dk, ok in _TOP_MAP.items():
        for suffix in ("weight", "bias"):
            out[f"{dk}.{suffix}"] = state[f"{ok}.{suffix}"]
    for i in range(depth):
        for dk, ok in _BLOCK_MAP.items():
            for suffix in ("weight", "bias"):
                out[f"transformer_blocks.{i}.{dk}.{suffix}"] = state[f"blocks.{i}.{ok}.{suffix}"]
        for suffix in ("weight", "bias"):
            # qkv rows are [q; k; v], heads contiguous inside each: a plain 3-way split
            q, k, v = state[f"blocks.{i}.attn.qkv.{suffix}"].chunk(3, dim=0)
            out[f"transformer_blocks.{i}.attn1.to_q.{suffix}"] = q
            out[f"transformer_blocks.{i}.attn1.to_k.{suffix}"] = k
            out[f"transformer_blocks.{i}.attn1.to_v.{suffix}"] = v
        # diffusers keeps one copy of the embedders per block; the final layer reads block 0's
        for dk, ok in _EMB_MAP.items():
            suffixes = ("weight",) if dk.endswith("embedding_table") else ("weight", "bias")
            for suffix in suffixes:
                # real copies: diffusers saves each block's tensors separately
                out[f"transformer_blocks.{i}.{dk}.{suffix}"] = state[f"{ok}.{suffix}"].clone()
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys -> official keys, taking block 0's embedder copies.

    Raises DiffusersFormatError when a key has no official counterpart or when a block's embedder
    copy differs from block 0's (the official architecture shares one embedder, so such a model
    cannot be represented faithfully). `pos_embed` is not included: the caller fills the fixed table.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    diverged: list[str] = []
    for key, tensor in state.items():
        top = next((ok for dk, ok in _TOP_MAP.items() if key.startswith(dk + ".")), None)
        if top is not None:
            out[top + key[key.rindex("."):]] = tensor
            continue
        m = _BLOCK_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        i, name, suffix = int(m.group(1)), m.group(2), m.group(3)
        if name in _BLOCK_MAP:
            out[f"blocks.{i}.{_BLOCK_MAP[name]}.{suffix}"] = tensor
        elif name in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            qkv.setdefault((i, suffix), {})[name[-1]] = tensor
        elif name in _EMB_MAP:
            official = f"{_EMB_MAP[name]}.{suffix}"
            if i == 0:
                out[official] = tensor
        else:
            unknown.append(key)
    for key, tensor in state.items():
        m = _BLOCK_KEY.match(key)
        if m and m.group(2) in _EMB_MAP and int(m.group(1)) > 0:
            ref = state.get(f"transformer_blocks.0.{m.group(2)}.{m.group(3)}")
            if ref is None or ref.shape != tensor.shape or not torch.equal(ref, tensor):
                diverged.append(key)
    if unknown:
        raise DiffusersFormatError(
            "diffusers state dict has keys with no official DiT counterpart (is it an ada_norm_zero DiT?): "
            + ", ".join(sorted(unknown)[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else ""))
    if diverged:
        raise DiffusersFormatError(
            "the per-block embedder copies differ from block 0's (" + ", ".join(sorted(diverged)[:6])
            + (" ..." if len(diverged) > 6 else "") + "); the official DiT shares one timestep and one class "
            "embedder, so this model cannot be converted without changing its outputs")
    for (i, suffix), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = ", ".join(f"transformer_blocks.{i}.attn1.to_{c}.{suffix}" for c in "qkv" if c not in parts)
            raise DiffusersFormatError(f"diffusers state dict is missing {missing}")
        out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def diffusers_config(cfg) -> dict:
    """The `DiTTransformer2DModel` config of a DiTConfig (raises for what diffusers cannot express)."""
    problems = []
    if cfg.posenc != "abs":
        problems.append(f"posenc {cfg.posenc!r} (diffusers' DiT has only the absolute sin-cos table)")
    if cfg.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio {cfg.mlp_ratio} (diffusers' DiT block has a fixed 4x feed-forward)")
    if cfg.class_dropout_prob <= 0:
        problems.append("no null class row (class_dropout_prob 0); diffusers' label table always has one")
    if problems:
        raise DiffusersFormatError("cannot export to diffusers: " + "; ".join(problems))
    return {
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "sample_size": cfg.input_size,
        "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": cfg.num_classes,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "attention_bias": True,
    }


def config_fields_from_diffusers(config: dict, source: str) -> dict:
    """DiTConfig fields from a diffusers `config.json` (DiTTransformer2DModel or legacy Transformer2DModel)."""
    problems = []
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        problems.append(f"norm_type is {config.get('norm_type')!r}, not 'ada_norm_zero'")
    if config.get("patch_size") is None:
        problems.append("patch_size is missing (not a patched image transformer)")
    if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        problems.append(f"activation_fn is {config.get('activation_fn')!r}, not 'gelu-approximate'")
    if config.get("norm_elementwise_affine", False):
        problems.append("norm_elementwise_affine is true (the official norms have no parameters)")
    if config.get("num_embeds_ada_norm") is None:
        problems.append("num_embeds_ada_norm (the number of classes) is missing")
    if problems:
        raise DiffusersFormatError(f"{source} is not an official-architecture DiT: " + "; ".join(problems))
    heads = int(config.get("num_attention_heads", 16))
    in_ch = int(config.get("in_channels", 4))
    out_ch = config.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise DiffusersFormatError(f"{source}: out_channels {out_ch} is neither in_channels nor twice it")
    sample = config.get("sample_size", 32)
    if isinstance(sample, (list, tuple)):
        if len(set(sample)) != 1:
            raise DiffusersFormatError(f"{source}: non-square sample_size {sample} is not supported")
        sample = sample[0]
    return {
        "depth": int(config.get("num_layers", 28)),
        "hidden_size": heads * int(config.get("attention_head_dim", 72)),
        "num_heads": heads,
        "patch_size": int(config["patch_size"]),
        "input_size": int(sample),
        "in_channels": in_ch,
        "learn_sigma": out_ch == 2 * in_ch,
        "num_classes": int(config["num_embeds_ada_norm"]),
        "class_dropout_prob": 0.1,
        "posenc": "abs",
    }


def patch_for_parity(transformer) -> None:
    """Make a diffusers DiTTransformer2DModel compute exactly what the official DiT computes.

    diffusers' timestep sinusoid divides its frequencies by (half - 1) (`downscale_freq_shift=1`)
    and its feed-forward pre-norm uses eps 1e-5; the official model uses half and 1e-6.
    """
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
