"""The layout branch (models/control.py): zero-initialised joins, a planted layout learnt, costs counted."""
from __future__ import annotations

import pytest
import torch

from conftest import random_tiny_dit
from drivedit.models.adapter_spec import AdapterSpec, apply_spec, fold, trainable_names
from drivedit.models.control import LayoutSpec, attach_branch, branch_cost, layout_input
from drivedit.models.dit import dit_config

CATS = ["car", "pedestrian"]


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    layout = (torch.rand(n, 2, 8, 8, generator=g) > 0.7).float()
    return x, t, y, layout


@pytest.mark.parametrize("kind,depth", [("controlnet", 1), ("light", 2)])
def test_zero_init_branch_leaves_output_exactly_unchanged(kind, depth):
    base = random_tiny_dit()
    x, t, y, layout = _inputs()
    with torch.no_grad():
        ref = base(x, t, y)
    attach_branch(base, LayoutSpec(kind, depth, CATS))
    with torch.no_grad():
        out = base(x, t, y, layout=layout)
        no_layout = base(x, t, y)
    assert torch.equal(out, ref) and torch.equal(no_layout, ref)
    # and the branch is not inert: once its joins move, the layout changes the output
    with torch.no_grad():
        for name, p in base.layout_branch.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
        moved = base(x, t, y, layout=layout)
        dropped = base(x, t, y, layout=layout, layout_keep=torch.tensor([True, False, True]))
    assert (moved - ref).abs().amax() > 1e-3
    assert torch.equal(dropped[1], ref[1]) and not torch.equal(dropped[0], ref[0])


def test_layout_channel_mismatch_and_missing_branch_are_explained():
    base = random_tiny_dit()
    x, t, y, layout = _inputs()
    with pytest.raises(ValueError, match="no layout branch"):
        base(x, t, y, layout=layout)
    attach_branch(base, LayoutSpec("light", 1, CATS + ["bus"]))
    with pytest.raises(ValueError, match="2 channels but the branch reads 3"):
        base(x, t, y, layout=layout)


def test_segmentation_one_hot_ignores_ignore_ids():
    layout = torch.zeros(1, 2, 2, 2)
    seg = torch.tensor([[[0, 2], [255, 1]]])
    out = layout_input(layout, seg, 3)  # (1, 5, 2, 2)
    assert out.shape == (1, 5, 2, 2)
    assert out[0, 2:, 0, 0].tolist() == [1, 0, 0] and out[0, 2:, 0, 1].tolist() == [0, 0, 1]
    assert out[0, 2:, 1, 0].tolist() == [0, 0, 0]  # ignore: no class
    with pytest.raises(ValueError, match="reads segmentation"):
        layout_input(layout, None, 3)


def test_spec_carries_the_branch_trainable_and_refuses_to_fold():
    base = random_tiny_dit()
    layout = LayoutSpec("controlnet", 1, CATS).to_dict()
    spec = AdapterSpec(method="driveditfit", num_scenarios=3, modulated=["blocks.0.attn.qkv"], layout=layout)
    model = apply_spec(base, spec)
    names = trainable_names(model, spec)
    assert any(n.startswith("layout_branch.blocks.0.attn.qkv.weight") for n in names)
    # the copy is of the plain block: the method's modulator sits on the main path only
    assert not any(n.startswith("layout_branch.") and ".mod_" in n for n in names)
    assert "blocks.0.attn.qkv.mod_A" in names or any(n.startswith("blocks.0.attn.qkv.mod_") for n in names)
    assert AdapterSpec.from_dict(spec.to_dict()).layout == layout
    with pytest.raises(ValueError, match="layout branch"):
        fold(model, spec)


def test_costs_on_dit_xl2():
    cfg = dit_config("DiT-XL/2", input_size=32)
    cats = [f"c{i}" for i in range(10)]
    light = branch_cost(cfg, LayoutSpec("light", 28, cats))
    control = branch_cost(cfg, LayoutSpec("controlnet", 13, cats))
    assert light["param_fraction"] <= 0.05 and light["mac_fraction"] <= 0.15
    # a block copy is 18 D^2 + biases: 13 copies are most of controlnet's parameters
    assert 13 * 18 * 1152**2 < control["params"] < 13 * 18 * 1152**2 + 20 * 1152**2
    assert control["mac_fraction"] > 0.4


@pytest.mark.parametrize("kind,depth", [("light", 2), ("controlnet", 2)])
def test_planted_layout_changes_output_only_inside_the_layout(kind, depth, one_thread):
    """Train the branch alone to add +1 to eps wherever channel 0 of the layout is set; on a held-out
    box the output moves inside the box and (almost) not outside."""
    torch.manual_seed(0)
    base = random_tiny_dit()
    spec = LayoutSpec(kind, depth, CATS, drop_prob=0.0)
    attach_branch(base, spec)
    for n, p in base.named_parameters():
        p.requires_grad_(n.startswith("layout_branch."))
    opt = torch.optim.Adam([p for p in base.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x = torch.randn(n, 4, 8, 8, generator=g)
        t = torch.randint(0, 1000, (n,), generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        layout = torch.zeros(n, 2, 8, 8)
        for i in range(n):
            r, c = torch.randint(0, 6, (2,), generator=g).tolist()
            h, w = torch.randint(1, 3, (2,), generator=g).tolist()
            layout[i, 0, r:r + h, c:c + w] = 1
        return x, t, y, layout

    base.train()
    for _ in range(150):
        x, t, y, layout = batch(16)
        with torch.no_grad():
            ref = base(x, t, y)[:, :4]
        out = base(x, t, y, layout=layout)[:, :4]
        loss = ((out - ref - layout[:, :1]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.eval()
    x, t, y, _ = batch(4)
    layout = torch.zeros(4, 2, 8, 8)
    layout[:, 0, 2:5, 3:6] = 1  # a held-out 3x3 box
    with torch.no_grad():
        delta = (base(x, t, y, layout=layout) - base(x, t, y))[:, :4]  # (4, 4, 8, 8)
    inside = layout[:, :1].bool().expand_as(delta)
    assert delta[inside].mean() > 0.6
    assert delta[~inside].abs().mean() < 0.25 * delta[inside].mean()


def test_merge_keeps_the_branch_for_sampling(tmp_path):
    """A bundle with a branch: merge(keep_layout=True) folds the method and keeps the branch, with the same
    output as the unmerged model; a plain merge refuses."""
    from drivedit.models.bundle import BundleInfo, apply_bundle, load_bundle, merge, save_bundle

    base_sd = random_tiny_dit().state_dict()
    spec = AdapterSpec(method="driveditfit", num_scenarios=3, modulated=["blocks.0.attn.qkv"],
                       layout=LayoutSpec("light", 1, CATS).to_dict())
    model = apply_spec(random_tiny_dit(), spec)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("layout_branch.", "blocks.0.attn.qkv.mod_")):
                p.add_(0.05 * torch.randn_like(p))
    info = BundleInfo(base="unused", base_sha256=None, model_config=model.config.to_dict(), spec=spec,
                      scenarios=["a", "b", "c"], betas=[1e-4, 0.02], codec="pixel")
    save_bundle(tmp_path / "b", model, info)
    bundle = load_bundle(tmp_path / "b")

    def fresh():
        m = random_tiny_dit()
        m.load_state_dict(base_sd)
        return m

    x, t, y, layout = _inputs()
    y = y % 3
    with torch.no_grad():
        want = apply_bundle(fresh(), bundle)(x, t, y, layout=layout)
        got = merge(fresh(), bundle, keep_layout=True)(x, t, y, layout=layout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layout branch"):
        merge(fresh(), bundle)
