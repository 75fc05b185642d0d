"""The sampler with a layout: guidance on the scenario and on the layout, and its input checks."""
from __future__ import annotations

import pytest
import torch

from conftest import random_tiny_dit
from drivedit.generate.sampler import DiTSampler, SamplerSettings
from drivedit.models.control import LayoutSpec, attach_branch


@pytest.fixture(scope="module")
def model():
    m = random_tiny_dit()
    attach_branch(m, LayoutSpec("light", 2, ["car", "pedestrian"], drop_prob=0.0))
    with torch.no_grad():  # a "trained" branch: joins away from zero
        for p in m.layout_branch.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _layout(n=2):
    layout = torch.zeros(n, 2, 8, 8)
    layout[:, 0, 2:5, 1:4] = 1
    return layout


def test_two_condition_guidance_matches_its_formula(model):
    sampler = DiTSampler(model)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 700]), torch.tensor([1, 4])
    null = torch.full_like(y, 10)
    settings = SamplerSettings(guidance=3.0, layout_guidance=2.0)
    with torch.no_grad():
        got = sampler.predict(x, t, y, null, settings, _layout())
        e_yl = model(x, t, y, layout=_layout())
        e_y = model(x, t, y)
        e_0 = model(x, t, null)
    want = e_yl[:, :4] + 2.0 * (e_y[:, :4] - e_0[:, :4]) + 1.0 * (e_yl[:, :4] - e_y[:, :4])
    torch.testing.assert_close(got[:, :4], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 4:], e_yl[:, 4:])
    # both scales 1: the plain conditional forward with the layout
    with torch.no_grad():
        plain = sampler.predict(x, t, y, None, SamplerSettings(guidance=1.0), _layout())
    torch.testing.assert_close(plain, e_yl)


def test_layout_changes_samples_and_bad_layouts_are_explained(model):
    sampler = DiTSampler(model)
    s = SamplerSettings(steps=3, guidance=2.0, layout_guidance=2.0)
    a = sampler.sample(torch.tensor([1, 2]), [5, 6], s, layout=_layout())
    b = sampler.sample(torch.tensor([1, 2]), [5, 6], s, layout=_layout())
    c = sampler.sample(torch.tensor([1, 2]), [5, 6], s)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match=r"layout must have shape \(2, 2, 8, 8\)"):
        sampler.sample(torch.tensor([1, 2]), [5, 6], s, layout=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="layout_guidance"):
        sampler.sample(torch.tensor([1]), [5], SamplerSettings(layout_guidance=-1.0), layout=_layout(1))
    with pytest.raises(ValueError, match="no layout branch"):
        DiTSampler(random_tiny_dit()).sample(torch.tensor([1]), [5], s, layout=_layout(1))


def test_outside_the_guidance_interval_one_forward_with_the_layout(model):
    """Guided steps run e(y, L), e(y, -), e(null, -) in one batch; the others e(y, L) alone, the layout kept."""
    sampler = DiTSampler(model)
    y, seeds = torch.tensor([1, 2]), [5, 6]
    sizes = []
    hook = model.x_embedder.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        # DDPM-6: t = 999 799 599 400 200 0, sigma 157, 25.5, 6.1, 2.0, 0.72, 0.01; (1, 20] guides 599 and 400
        sampler.sample(y, seeds, SamplerSettings(sampler="ddpm", steps=6, guidance=2.0, layout_guidance=2.0,
                                                 guidance_interval=(1.0, 20.0)), layout=_layout())
    finally:
        hook.remove()
    assert sizes == [2, 2, 6, 6, 2, 2]
    never = sampler.sample(y, seeds, SamplerSettings(steps=3, guidance=2.0, layout_guidance=2.0,
                                                     guidance_interval=(1e8, 1e9)), layout=_layout())
    plain = sampler.sample(y, seeds, SamplerSettings(steps=3, guidance=1.0, layout_guidance=1.0), layout=_layout())
    free = sampler.sample(y, seeds, SamplerSettings(steps=3, guidance=1.0, layout_guidance=1.0))
    assert torch.equal(never, plain) and (never - free).abs().max() > 1e-4  # the branch still draws the layout
