"""GTA (Geometric Transform Attention, posenc "gta"): its definition checked against explicit rotation
matrices, shift equivariance of logits and outputs, reduction to RoPE without the value transform, bf16,
checkpoint / bundle / CLI round trips with the setting, and a few LoRA training steps."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from drivedit.config.method import MethodConfig
from drivedit.models.bundle import BundleInfo, apply_bundle, load_bundle, merge, save_bundle
from drivedit.models.checkpoint import export_diffusers, export_official, export_safetensors, load_dit, read_dit_config
from drivedit.models.diffusers_format import DiffusersFormatError
from drivedit.models.diffusion import GaussianDiffusion, linear_betas
from drivedit.models.dit import build_dit, dit_config
from drivedit.models.posenc import rope_2d_tables
from drivedit.train.method_adapters import apply_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run on one thread (conftest)


def random_dit(posenc: str = "gta", seed: int = 0):
    """DiT-N/2 on an 8x8 latent (a 4x4 token grid, head dim 16) with every trainable weight random."""
    model = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=10, posenc=posenc))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _inputs(n: int = 2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([10, 700, 300, 999][:n]), torch.tensor([1, 7, 3, 0][:n])


def rotation_matrices(head_dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """R(theta_n) as explicit (hd, hd) matrices, written from the definition rather than from apply_rope.

    Each head splits into a row half and a column half; in each, channel f pairs with channel f + hd/4
    and the pair turns by position * 10000^(-f / (hd/4)). rows, cols: (T,) -> (T, hd, hd), float64.
    """
    q = head_dim // 4
    out = torch.zeros(len(rows), head_dim, head_dim, dtype=torch.float64)
    for n, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        for axis, pos in ((0, r), (1, c)):
            for f in range(q):
                a, b = 2 * q * axis + f, 2 * q * axis + q + f
                ang = pos * 10000.0 ** (-f / q)
                out[n, a, a], out[n, a, b] = math.cos(ang), -math.sin(ang)
                out[n, b, a], out[n, b, b] = math.sin(ang), math.cos(ang)
    return out


def _grid_positions(grid: int):
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return rows.reshape(-1), cols.reshape(-1)


def test_gta_attention_is_the_definition():
    """o_i = R_i^T sum_j softmax_j((R_i q_i)^T (R_j k_j) / sqrt(d)) R_j v_j, per head, checked in float64."""
    model = random_dit("gta")
    attn = model.blocks[0].attn
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))  # (B, T, D)
    with torch.no_grad():
        got = attn(x, rope=(model.rope_cos, model.rope_sin))  # (1, T, D)
        q, k, v = attn.qkv(x).double().reshape(1, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)[:, 0]  # (H, T, hd) each
        R = rotation_matrices(16, *_grid_positions(4))  # (T, hd, hd)
        rq, rk, rv = (torch.einsum("tab,htb->hta", R, z) for z in (q, k, v))  # (H, T, hd)
        a = torch.softmax(rq @ rk.transpose(-1, -2) / 4.0, dim=-1)  # (H, T, T)
        o = torch.einsum("tba,htb->hta", R, a @ rv)  # R_i^T (sum_j a_ij R_j v_j): (H, T, hd)
        want = attn.proj(o.permute(1, 0, 2).reshape(1, 16, 64).float())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _tables_at(head_dim: int, rows: torch.Tensor, cols: torch.Tensor, size: int):
    """The rotation tables for tokens at arbitrary (row, col) positions on a grid of side `size`."""
    cos, sin = rope_2d_tables(head_dim, size)
    idx = rows * size + cols
    return cos[idx], sin[idx]


@pytest.mark.parametrize("posenc", ["gta", "rope"])
def test_logits_and_outputs_are_invariant_to_shifting_every_position(monkeypatch, posenc):
    """Moving all tokens by the same (dr, dc) changes no logit and no output of any block (only relative
    positions enter); a move that is not a common shift changes them, so the check can fail."""
    model = random_dit(posenc)
    x, t, y = _inputs()
    rows, cols = _grid_positions(4)
    captured = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):  # GTA must still run through the fused attention kernel
        captured.append((q @ k.transpose(-1, -2)).detach())
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def run(r, c):
        captured.clear()
        cos, sin = _tables_at(16, r, c, 12)
        with torch.no_grad():
            model.rope_cos.copy_(cos)
            model.rope_sin.copy_(sin)
            return model(x, t, y), list(captured)

    out0, logits0 = run(rows, cols)
    assert len(logits0) == model.config.depth
    for dr, dc in [(3, 0), (0, 5), (7, 2)]:
        out, logits = run(rows + dr, cols + dc)
        torch.testing.assert_close(out, out0, rtol=1e-4, atol=1e-5)
        for a, b in zip(logits, logits0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # stretching the grid (not a shift) moves relative positions: logits and outputs change
    out, logits = run(rows * 2, cols)
    assert (logits[0] - logits0[0]).abs().max() > 1e-2
    assert (out - out0).abs().max() > 1e-3


def test_gta_reduces_to_rope_without_the_value_transform():
    gta = random_dit("gta", seed=4)
    rope = random_dit("rope", seed=0)
    rope.load_state_dict(gta.state_dict(), strict=True)  # the same tensors: gta adds no parameters
    x, t, y = _inputs()
    with torch.no_grad():
        differs = (gta(x, t, y) - rope(x, t, y)).abs().max()
        for block in gta.blocks:
            block.attn.v_transform = False
        torch.testing.assert_close(gta(x, t, y), rope(x, t, y), rtol=0, atol=0)
    assert differs > 1e-3  # with the value transform on, gta is a different model


def test_gta_under_bf16_autocast_follows_float32():
    model = random_dit("gta")
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 output is {err:.3f} off the float32 one (relative to its largest value)"


def test_gta_checkpoints_keep_the_setting(tmp_path):
    model = random_dit("gta")
    x, t, y = _inputs()
    with torch.no_grad():
        want = model(x, t, y)
    path = export_safetensors(model, tmp_path / "gta.safetensors")
    assert read_dit_config(path).posenc == "gta"
    loaded = load_dit(path)
    assert loaded.config.posenc == "gta" and all(b.attn.v_transform for b in loaded.blocks)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), want, rtol=0, atol=0)
    # the official .pt cannot say rope from gta (same tensors, no metadata): loading needs the config
    export_official(model, tmp_path / "gta.pt")
    with pytest.raises(ValueError, match="rope or gta"):
        load_dit(tmp_path / "gta.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_dit(tmp_path / "gta.pt", config=model.config)(x, t, y), want, rtol=0, atol=0)
    with pytest.raises(DiffusersFormatError, match="posenc 'gta'"):
        export_diffusers(model, tmp_path / "diffusers")
    assert not (tmp_path / "diffusers").exists()


def test_new_model_cli_writes_a_gta_model(tmp_path, capsys):
    from drivedit.new_model import main

    assert main(["DiT-N/2", "--input-size", "8", "--num-classes", "3", "--posenc", "gta",
                 "--out", str(tmp_path / "init.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["posenc"] == "gta"
    model = load_dit(tmp_path / "init.safetensors")
    assert model.config.posenc == "gta" and "pos_embed" not in model.state_dict()


def test_lora_on_gta_trains_and_round_trips_through_a_bundle(tmp_path):
    """LoRA wraps attn.qkv / attn.proj, which GTA's attention calls: a few steps train it (finite loss,
    adapters moved, frozen weights kept), and the bundle rebuilds and merges into a gta model."""
    base = random_dit("gta")
    base_path = export_safetensors(base, tmp_path / "base.safetensors")
    r = apply_method(copy.deepcopy(base), MethodConfig(name="lora", rank=2, scenario_init="random"),
                     ["clear", "rainy", "night"])
    model = r.model.train()
    frozen_before = model.blocks[0].attn.qkv.weight.detach().clone()
    trainable_before = {n: p.detach().clone() for n, p in r.trainable.items()}
    opt = torch.optim.AdamW(r.param_groups(1e-2, 0.0))
    diffusion = GaussianDiffusion(linear_betas())
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        x0 = torch.randn(4, 4, 8, 8, generator=g)
        t, y = torch.randint(0, 1000, (4,), generator=g), torch.randint(0, 3, (4,), generator=g)
        loss = diffusion.training_losses(model, x0, t, {"y": y}, torch.randn(x0.shape, generator=g))["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert torch.equal(model.blocks[0].attn.qkv.weight, frozen_before)
    moved = [n for n, p in r.trainable.items() if not torch.equal(p, trainable_before[n])]
    assert any("attn.qkv" in n for n in moved) and any("attn.proj" in n for n in moved)

    model.eval()
    info = BundleInfo(base=str(base_path), base_sha256=None, model_config=base.config.to_dict(), spec=r.spec,
                      scenarios=r.scenarios, betas=linear_betas().tolist(), codec="pixel",
                      method=r.method.model_dump(mode="json"), selected_modules=r.selected_modules)
    bundle = load_bundle(save_bundle(tmp_path / "bundle", model, info))
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["model_config"]["posenc"] == "gta"
    x, t, _ = _inputs(3)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        want = model(x, t, y)
        rebuilt = apply_bundle(load_dit(base_path, config=bundle.model_config), bundle)
        torch.testing.assert_close(rebuilt(x, t, y), want, rtol=1e-5, atol=1e-6)
        merged = merge(load_dit(base_path), bundle)
        assert merged.config.posenc == "gta"
        torch.testing.assert_close(merged(x, t, y), want, rtol=1e-4, atol=1e-5)

    from drivedit.export import export_bundle

    with pytest.raises(DiffusersFormatError, match="posenc 'gta'"):
        export_bundle(str(tmp_path / "bundle"), official=str(tmp_path / "out" / "m.pt"),
                      diffusers=str(tmp_path / "out" / "diffusers"))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    out = export_bundle(str(tmp_path / "bundle"), official=str(tmp_path / "out" / "m.pt"),
                        safetensors=str(tmp_path / "out" / "m.safetensors"))
    assert out["posenc"] == "gta" and "posenc='gta'" in out["notes"][0]
    with torch.no_grad():
        torch.testing.assert_close(load_dit(tmp_path / "out" / "m.safetensors")(x, t, y), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit"])
def test_every_method_adapts_a_gta_model(name):
    """Each method's adapters sit around GTA's attention: gradients reach its trainable set, and the folded
    (merged) plain model keeps posenc gta and computes what the adapted one does."""
    from drivedit.models.adapter_spec import fold

    cfg = MethodConfig(name=name, scenario_init="random")
    if name == "finediffusion":
        cfg = cfg.model_copy(update={"superclasses": {"day": ["clear", "rainy"], "dark": ["night"]}})
    r = apply_method(random_dit("gta"), cfg, ["clear", "rainy", "night"])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move the adapters off their identity init, as training would
        for p in r.trainable.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x, t, _ = _inputs(3)
    y = torch.tensor([0, 1, 2])
    model = r.model.train()
    model(x, t, y).square().mean().backward()
    grads = [p.grad for p in r.trainable.values()]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    assert all(torch.isfinite(gr).all() for gr in grads if gr is not None)
    model.eval()
    merged = fold(model, r.spec)
    assert merged.config.posenc == "gta"
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-5)
