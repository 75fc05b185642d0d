"""Diffusion Transformer with the official facebookresearch/DiT state-dict names.

Built from timm's PatchEmbed / Attention / Mlp exactly as the official `models.py`, so an
official checkpoint loads with a strict `load_state_dict`. Additions that leave the official
keys alone: a size registry with tiny sizes for tests and the demo, optional 2-D rotary
position encodings without `pos_embed` (`posenc="rope"` on q and k; `posenc="gta"`, Geometric
Transform Attention, on q, k and v with the inverse on the output), a single-batch guided forward,
and activation checkpointing.

The position encodings live in posenc.py. Imports torch and timm only: no Ray, no MLflow, no pydantic.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch.utils.checkpoint import checkpoint

from .posenc import POSENCS, ROTARY_POSENCS, RopeAttention, rope_2d_tables, sincos_2d_pos_embed


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT. `input_size` is the side of the latent grid (image_size // codec factor)."""

    depth: int = 28
    hidden_size: int = 1152
    patch_size: int = 2
    num_heads: int = 16
    mlp_ratio: float = 4.0
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    # "abs" (official sin-cos pos_embed) | "rope" (2-D rotary on q, k) | "gta" (the same rotation on
    # q, k, v and its transpose on the attention output; arXiv 2310.10375)
    posenc: str = "abs"

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.posenc not in POSENCS:
            problems.append(f"posenc must be one of {', '.join(map(repr, POSENCS))}, got {self.posenc!r}")
        if self.posenc in ROTARY_POSENCS and (self.hidden_size // self.num_heads) % 4:
            problems.append(f"posenc {self.posenc!r} needs a head dim divisible by 4 (two axes, cos/sin pairs); "
                            f"hidden_size {self.hidden_size} / num_heads {self.num_heads} is not")
        if self.hidden_size % 4:
            problems.append("hidden_size must be divisible by 4 for the 2-D sin-cos position table")
        if problems:
            raise ValueError("invalid DiT config: " + "; ".join(problems))


# name -> (depth, hidden_size, num_heads); the patch size comes from the "/p" suffix.
# S/B/L/XL are the paper's; N (nano) and T (tiny) exist for tests and the CPU demo.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
    "DiT-T": (6, 96, 4),
    "DiT-N": (2, 64, 4),
}
PATCH_SIZES = (2, 4, 8)
DIT_MODELS: tuple[str, ...] = tuple(f"{size}/{p}" for size in DIT_SIZES for p in PATCH_SIZES)


def dit_config(name: str, input_size: int = 32, **overrides) -> DiTConfig:
    """Registry lookup: `dit_config("DiT-XL/2", input_size=32)` is the official 256 px model."""
    if name not in DIT_MODELS:
        raise ValueError(f"unknown DiT model {name!r}; choose one of: {', '.join(DIT_MODELS)}")
    size, patch = name.split("/")
    depth, hidden, heads = DIT_SIZES[size]
    cfg = DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch), input_size=input_size)
    cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg


def model_name(cfg: DiTConfig) -> str | None:
    """The registry name of a config's (depth, width, heads, patch), or None for a custom shape."""
    for size, (depth, hidden, heads) in DIT_SIZES.items():
        if (depth, hidden, heads) == (cfg.depth, cfg.hidden_size, cfg.num_heads) and cfg.patch_size in PATCH_SIZES:
            return f"{size}/{cfg.patch_size}"
    return None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (N, T, D); shift, scale: (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------- embedders


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """Official DiT sinusoid: [cos, sin], frequencies exp(-ln(max_period) * k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class table with one extra "null" row (index num_classes) for classifier-free guidance.

    Label dropout replaces a label by `drop_target(labels)`; the default target is the null row.
    Subclasses (scenario tables, FineDiffusion's tiered table) keep this interface.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def null_label(self) -> int:
        return self.num_classes

    def drop_target(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.null_label)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.drop_target(labels), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


# ----------------------------------------------------------------------------- blocks


class DiTBlock(nn.Module):
    """adaLN-Zero block. `gamma_*` hooks are identity unless a method (DiffFit) installs scales."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, posenc: str = "abs"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        rope = posenc in ROTARY_POSENCS
        if rope:
            self.attn = RopeAttention(hidden_size, num_heads=num_heads, qkv_bias=True, v_transform=posenc == "gta")
        else:
            self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.attn.fused_attn = True  # always F.scaled_dot_product_attention (timm falls back to softmax(QK^T) when
        # TIMM_FUSED_ATTN=0 or when exportable), so CUDA picks the flash / memory-efficient kernel
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        approx_gelu = lambda: nn.GELU(approximate="tanh")  # noqa: E731 (official definition)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim, act_layer=approx_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.uses_rope = rope

    def branch_scales(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Per-channel scales of the attention and MLP residual branches (DiffFit's gamma)."""
        return getattr(self, "gamma_attn", 1.0), getattr(self, "gamma_mlp", 1.0)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None) -> torch.Tensor:
        # x: (N, T, D); c: (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        g_attn, g_mlp = self.branch_scales()
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (N, T, D)
        h = self.attn(h, rope=rope) if self.uses_rope else self.attn(h)  # (N, T, D)
        x = x + g_attn * gate_msa.unsqueeze(1) * h
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x + g_mlp * gate_mlp.unsqueeze(1) * h


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


# ----------------------------------------------------------------------------- model


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        D = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, D, bias=True)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        if config.posenc in ROTARY_POSENCS:
            self.set_rotary_tables()
        else:
            # A frozen Parameter, not a buffer, exactly as the official model: it is in the state
            # dict, the released checkpoints and the official parameter count.
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(D, config.num_heads, mlp_ratio=config.mlp_ratio, posenc=config.posenc)
             for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self.initialize_weights()

    def set_rotary_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rope / gta rotation tables: non-persistent, so in no checkpoint, and fixed by the grid."""
        cfg = self.config
        cos, sin = rope_2d_tables(cfg.hidden_size // cfg.num_heads, cfg.input_size // cfg.patch_size)
        self.register_buffer("rope_cos", cos.to(device) if device is not None else cos, persistent=False)  # (T, hd)
        self.register_buffer("rope_sin", sin.to(device) if device is not None else sin, persistent=False)

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.config.posenc == "abs" and not self.pos_embed.is_meta:
            grid = int(self.x_embedder.num_patches**0.5)
            table = sincos_2d_pos_embed(self.pos_embed.shape[-1], grid)
            self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the model outputs zeros.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, T, p*p*C) -> (N, C, H, W)
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def condition(self, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """c = t_emb + y_emb, the vector every adaLN reads. (N,) ints -> (N, D)."""
        return self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
                layout: torch.Tensor | None = None, layout_keep: torch.Tensor | None = None):
        # x: (N, C, H, W) latents; t: (N,) timesteps; y: (N,) labels
        # layout: (N, K_in, H, W) for a model with a layout branch (models/control.py); layout_keep: (N,)
        # bool, False = this item ignores its layout (default: all kept, or dropped at random in training)
        x = self.x_embedder(x)  # (N, T, D)
        rope = None
        if self.config.posenc == "abs":
            x = x + self.pos_embed
        else:
            rope = (self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype))
        c = self.condition(t, y, force_drop_ids)  # (N, D)
        signal = None
        if layout is not None:
            branch = getattr(self, "layout_branch", None)
            if branch is None:
                raise ValueError("a layout was given but this DiT has no layout branch; fine-tune one "
                                 "(layout.kind controlnet or light) or leave the layout out")
            branch.grad_checkpointing = self.grad_checkpointing
            signal = branch(x, c, layout, rope, self.training, layout_keep)
            if signal.tokens is not None:
                x = x + signal.tokens  # (N, T, D)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)  # (N, T, D)
            if signal is not None:
                x = signal.after_block(i, x)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_guided(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        y_uncond: torch.Tensor,
        scale: float,
        guide_channels: int | None = None,
    ) -> torch.Tensor:
        """Guided prediction with the conditional and unconditional halves in one batch.

        x: (N, C, H, W); y: (N,) the requested labels; y_uncond: (N,) the null label for
        classifier-free guidance, or each label's superclass for FineDiffusion's superclass
        guidance. eps = uncond + scale * (cond - uncond) on the first `guide_channels` channels
        (default: all latent channels, as DiTPipeline; the official sample.py guides 3).
        The learned-variance channels are taken from the conditional half.
        """
        n = x.shape[0]
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_uncond]))  # (2N, C_out, H, W)
        cond, uncond = out[:n], out[n:]
        k = self.in_channels if guide_channels is None else guide_channels
        eps = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])  # (N, k, H, W)
        return torch.cat([eps, cond[:, k:]], dim=1)  # (N, C_out, H, W)


def build_dit(config: DiTConfig, device: torch.device | str | None = None) -> DiT:
    """Build a DiT; `device="meta"` builds it without allocating weights (for counting)."""
    with torch.device(device or "cpu"):
        return DiT(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(config: DiTConfig) -> int:
    """Multiply-accumulates of one forward at batch 1, counted analytically.

    The paper's "Gflops" are these MACs: DiT-XL/2 at 256 px gives 118.6 G.
    torch.utils.flop_counter reports 2x this figure.
    """
    T, D, p = config.num_tokens, config.hidden_size, config.patch_size
    freq = 256
    patch = T * p * p * config.in_channels * D
    t_mlp = freq * D + D * D
    final = D * 2 * D + T * D * p * p * config.out_channels
    return patch + t_mlp + config.depth * block_macs(config) + final


def block_macs(config: DiTConfig) -> int:
    """MACs of one DiTBlock at batch 1: qkv, attention scores and values, proj, MLP, adaLN."""
    T, D = config.num_tokens, config.hidden_size
    return T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * int(D * config.mlp_ratio) + D * 6 * D
