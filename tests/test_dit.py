"""The DiT core: official state-dict layout, adaLN-Zero init, rope position encoding, guided forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drivedit.models.dit import build_dit, count_parameters, dit_config

# DiT-XL/2 at 256 px as printed from facebookresearch/DiT's models.py (reference/dit.md §1):
# 292 tensors, written out here rather than derived from our model.
D = 1152
OFFICIAL_TOP = {
    "pos_embed": (1, 256, D),
    "x_embedder.proj.weight": (D, 4, 2, 2),
    "x_embedder.proj.bias": (D,),
    "t_embedder.mlp.0.weight": (D, 256),
    "t_embedder.mlp.0.bias": (D,),
    "t_embedder.mlp.2.weight": (D, D),
    "t_embedder.mlp.2.bias": (D,),
    "y_embedder.embedding_table.weight": (1001, D),
    "final_layer.linear.weight": (32, D),
    "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (2304, D),
    "final_layer.adaLN_modulation.1.bias": (2304,),
}
OFFICIAL_BLOCK = {
    "attn.qkv.weight": (3456, D),
    "attn.qkv.bias": (3456,),
    "attn.proj.weight": (D, D),
    "attn.proj.bias": (D,),
    "mlp.fc1.weight": (4608, D),
    "mlp.fc1.bias": (4608,),
    "mlp.fc2.weight": (D, 4608),
    "mlp.fc2.bias": (D,),
    "adaLN_modulation.1.weight": (6912, D),
    "adaLN_modulation.1.bias": (6912,),
}


def official_xl2_shapes() -> dict[str, tuple[int, ...]]:
    shapes = dict(OFFICIAL_TOP)
    for i in range(28):
        shapes.update({f"blocks.{i}.{k}": v for k, v in OFFICIAL_BLOCK.items()})
    return shapes


def test_xl2_state_dict_matches_official_keys_and_shapes():
    model = build_dit(dit_config("DiT-XL/2", input_size=32), device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_xl2_shapes()
    assert len(expected) == 292
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert count_parameters(model) == 675_129_632
    assert not model.pos_embed.requires_grad  # a frozen Parameter, as the official model


def test_output_is_zero_at_init_and_blocks_are_identity():
    model = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=10)).eval()
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 10])
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8)
    assert torch.count_nonzero(out) == 0
    tokens = torch.randn(2, 16, 64)
    c = model.condition(t, y)
    assert torch.equal(model.blocks[0](tokens, c), tokens)  # gates are zero: the residual passes through
    # but the model is not trivially zero everywhere: the embedders are initialised
    assert model.t_embedder.mlp[0].weight.std() > 0.01 and model.y_embedder.embedding_table.weight.std() > 0.01


def _randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_rope_forward_and_relative_attention(monkeypatch):
    cfg = dit_config("DiT-N/2", input_size=8, num_classes=10, posenc="rope")
    model = _randomize(build_dit(cfg)).eval()
    assert "pos_embed" not in model.state_dict()
    # a spatially constant input: every token is the same before the position encoding
    x = torch.ones(1, 4, 8, 8) * 0.3
    t, y = torch.tensor([500]), torch.tensor([2])

    captured = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        captured.append((q.detach().clone(), k.detach().clone()))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = model(x, t, y)
    assert out.shape == (1, 8, 8, 8) and torch.isfinite(out).all()
    assert len(captured) == cfg.depth

    q, k = captured[0]  # block 0: (1, H, T, hd); identical token contents
    logits = q[0] @ k[0].transpose(-1, -2)  # (H, T, T)
    grid = cfg.input_size // cfg.patch_size

    def idx(r, c):
        return r * grid + c

    # without a position encoding every logit would be equal; rope makes them position dependent
    assert logits.std(dim=(-2, -1)).min() > 1e-3  # per head, across positions
    # ... and dependent only on the offset between query and key positions
    for (r1, c1, r2, c2) in [(0, 0, 1, 2), (1, 2, 0, 0), (2, 1, 1, 0)]:  # +1 stays on the 4x4 grid
        for dr, dc in [(1, 0), (0, 1), (1, 1)]:
            a = logits[:, idx(r1, c1), idx(r2, c2)]
            b = logits[:, idx(r1 + dr, c1 + dc), idx(r2 + dr, c2 + dc)]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rope_breaks_token_permutation_equivariance():
    """With no position encoding a DiT commutes with token permutations; rope must break that."""
    cfg = dit_config("DiT-N/2", input_size=8, num_classes=10, posenc="rope")
    model = _randomize(build_dit(cfg), seed=1).eval()
    x = torch.randn(1, 4, 8, 8)
    t, y = torch.tensor([250]), torch.tensor([4])

    def mirror_patches(z):
        # reverse the order of patch columns, keeping the pixels inside each patch as they are
        n, c, h, w = z.shape
        z = z.reshape(n, c, h, w // 2, 2)  # (N, C, H, W/p, p)
        return torch.flip(z, dims=[3]).reshape(n, c, h, w)

    with torch.no_grad():
        moved = (mirror_patches(model(x, t, y)) - model(mirror_patches(x), t, y)).abs().max()
        # the same model with the rotation switched off is exactly equivariant: the check is sensitive
        model.rope_cos.fill_(1.0)
        model.rope_sin.fill_(0.0)
        still = (mirror_patches(model(x, t, y)) - model(mirror_patches(x), t, y)).abs().max()
    assert still < 1e-5
    assert moved > 1e-3


def test_forward_guided_matches_two_separate_passes():
    model = _randomize(build_dit(dit_config("DiT-N/2", input_size=8, num_classes=10))).eval()
    x = torch.randn(3, 4, 8, 8)
    t, y = torch.tensor([10, 400, 990]), torch.tensor([0, 5, 9])
    null = torch.full_like(y, 10)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        guided = model.forward_guided(x, t, y, null, 4.0)
        one = model.forward_guided(x, t, y, null, 1.0)
        three = model.forward_guided(x, t, y, null, 4.0, guide_channels=3)
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:])  # learned variance from the conditional half
    torch.testing.assert_close(one, cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(three[:, 3:], cond[:, 3:])  # the official sample.py's 3-channel quirk
    assert not torch.allclose(three[:, :3], cond[:, :3])


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-L/8"])
def test_registry_sizes_build_on_meta(name):
    cfg = dit_config(name, input_size=32)
    model = build_dit(cfg, device="meta")
    assert len(model.blocks) == cfg.depth
    assert model.final_layer.linear.out_features == cfg.patch_size**2 * 8
