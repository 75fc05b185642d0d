"""Position encodings of the DiT: the official absolute sin-cos table, and 2-D rotations inside attention.

`abs` adds `sincos_2d_pos_embed` to the patch tokens (the official `pos_embed`). `rope` and `gta` have
no table: `RopeAttention` rotates each token's query and key channel pairs by its (row, col) position,
so logits depend on relative positions only; `gta` (Geometric Transform Attention, arXiv 2310.10375)
rotates the values too and rotates each query's output back, so outputs do as well.

Imports torch, numpy and timm only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

POSENCS = ("abs", "rope", "gta")
ROTARY_POSENCS = ("rope", "gta")  # no pos_embed: positions enter through rotations inside attention


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def sincos_2d_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Official table: meshgrid(w, h), so the first D/2 channels encode the column index."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)
    return emb  # (T, D)


def rope_2d_tables(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D rotary tables: the first half of each head rotates with the row, the second with the column."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (hd/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    ang_r = rows.reshape(-1, 1).double() * freqs  # (T, hd/4)
    ang_c = cols.reshape(-1, 1).double() * freqs  # (T, hd/4)
    ang = torch.cat([ang_r, ang_r, ang_c, ang_c], dim=-1)  # (T, hd), rotate-half layout per axis
    return ang.cos().float(), ang.sin().float()


def _rotate_half_axial(x: torch.Tensor) -> torch.Tensor:
    # x: (..., hd) seen as [row_a, row_b, col_a, col_b] quarters; rotate each axis's half pair.
    ra, rb, ca, cb = x.chunk(4, dim=-1)
    return torch.cat([-rb, ra, -cb, ca], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (N, H, T, hd); cos, sin: (T, hd). R(theta_n) on token n's pairs; (cos, -sin) applies R^T.
    return x * cos + _rotate_half_axial(x) * sin


class RopeAttention(Attention):
    """timm Attention (same `qkv` / `proj` keys) with the 2-D rotation R(theta_n) of token n's position.

    v_transform False is RoPE: q and k rotate, so logit(i, j) = q_i^T R(theta_j - theta_i) k_j.
    v_transform True is GTA (Geometric Transform Attention): v rotates too and the output of query i
    is rotated back by R(theta_i)^T, so o_i = sum_j a_ij R(theta_j - theta_i) v_j: the values are
    read in the query's own frame, and outputs as well as logits depend only on relative positions.
    Both run through the fused `scaled_dot_product_attention`; neither adds parameters.
    """

    def __init__(self, *args, v_transform: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.v_transform = v_transform

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        gta = rope is not None and self.v_transform
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, hd)
        if gta:
            v = apply_rope(v, cos, sin)  # (B, H, T, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        if gta:
            x = apply_rope(x, cos, -sin)  # R(theta_i)^T on query i's output: (B, H, T, hd)
        x = x.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(x))
