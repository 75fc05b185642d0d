"""The sampler: DDPM / DDIM steps against the DiT formulas in float64, seeds, guidance, grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from drivedit.generate.grid import latents_to_uint8, save_grid
from drivedit.generate.sampler import DiTSampler, SamplerSettings, build_scheduler
from drivedit.models.diffusion import cosine_power_betas, linear_betas
from drivedit.models.dit import build_dit, dit_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    cfg = dit_config("DiT-N/2", input_size=8, num_classes=10)
    m = build_dit(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:  # small random weights keep a sampled trajectory bounded
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def noise_of(seeds, shape) -> np.ndarray:
    """What one generator per item, seeded with its seed, draws first: (N, *shape)."""
    return np.concatenate([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)).double().numpy()
                           for s in seeds])


# ----------------------------------------------------------------------------- one step against the formulas


def test_ddpm_step_equals_dit_formula_in_float64():
    settings = SamplerSettings(sampler="ddpm", steps=250)
    sched = build_scheduler(settings)
    sched.set_timesteps(250)
    # DiT's respacing space_timesteps(1000, "250"): round(i * 999 / 249), newest first
    dit_steps = [round(i * 999 / 249) for i in range(250)][::-1]
    assert sched.timesteps.tolist() == dit_steps

    abar = np.cumprod(1.0 - linear_betas(1000))  # float64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    out = torch.cat([torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 4, 8, 8, generator=g) * 2 - 1], dim=1)
    seeds = [11, 12]
    for i in (0, 100, 248):
        t, t_prev = dit_steps[i], dit_steps[i + 1]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        got = sched.step(out, t, x, generator=gens).prev_sample

        # independent: Ho et al. posterior with the respaced beta, learned-range log-variance (DiT)
        a_t, a_prev = abar[t], abar[t_prev]
        beta = 1.0 - a_t / a_prev
        eps, v = f64(out[:, :4]), f64(out[:, 4:])
        xt = f64(x)
        x0 = (xt - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        mean = beta * np.sqrt(a_prev) / (1 - a_t) * x0 + (1 - a_prev) * np.sqrt(1 - beta) / (1 - a_t) * xt
        post_var = beta * (1 - a_prev) / (1 - a_t)
        frac = (v + 1) / 2
        log_var = frac * np.log(beta) + (1 - frac) * np.log(post_var)
        expected = mean + np.exp(0.5 * log_var) * noise_of(seeds, (4, 8, 8))
        np.testing.assert_allclose(f64(got), expected, rtol=0, atol=2e-5 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("custom", [False, True])
def test_ddim_step_equals_formula_in_float64(custom):
    betas = cosine_power_betas(1000, power=2.0) if custom else None
    sched = build_scheduler(SamplerSettings(sampler="ddim", steps=50), betas)
    sched.set_timesteps(50)
    steps = list(range(980, -1, -20))  # "leading" spacing: DiT's ddim50 timesteps
    assert sched.timesteps.tolist() == steps

    abar = np.cumprod(1.0 - (betas if custom else linear_betas(1000)))
    g = torch.Generator().manual_seed(5)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t in (980, 500, 0):
        got = sched.step(eps, t, x).prev_sample
        a_t = abar[t]
        a_prev = abar[t - 20] if t >= 20 else 1.0  # set_alpha_to_one at the last step
        x0 = (f64(x) - np.sqrt(1 - a_t) * f64(eps)) / np.sqrt(a_t)
        expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * f64(eps)  # eta = 0
        np.testing.assert_allclose(f64(got), expected, rtol=0, atol=2e-5 * max(1.0, np.abs(expected).max()))


# ----------------------------------------------------------------------------- the loop


def test_ddim_loop_equals_an_independent_guided_loop(model):
    """Three guided DDIM steps from the seeds' noise, recomputed with plain model calls and float64."""
    sampler = DiTSampler(model)
    labels, seeds, s = torch.tensor([1, 7]), [5, 6], 3.0
    got = sampler.sample(labels, seeds, SamplerSettings(sampler="ddim", steps=3, guidance=s))

    abar = np.cumprod(1.0 - linear_betas(1000))
    steps = [666, 333, 0]  # leading spacing, 1000 // 3 apart
    x = noise_of(seeds, (4, 8, 8))
    null = torch.full_like(labels, 10)
    for i, t in enumerate(steps):
        xt = torch.from_numpy(x).float()
        tt = torch.full((2,), t)
        with torch.no_grad():
            cond, uncond = f64(model(xt, tt, labels)[:, :4]), f64(model(xt, tt, null)[:, :4])
        eps = uncond + s * (cond - uncond)
        a_t = abar[t]
        a_prev = abar[steps[i + 1]] if i + 1 < len(steps) else 1.0
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    assert np.abs(eps).max() > 1e-2  # the model is not the zero function
    np.testing.assert_allclose(f64(got), x, rtol=0, atol=1e-4 * max(1.0, np.abs(x).max()))


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_same_seed_same_image_whatever_the_batch(model, kind):
    sampler = DiTSampler(model)
    settings = SamplerSettings(sampler=kind, steps=6, guidance=4.0)
    batch = sampler.sample(torch.tensor([3, 1, 4, 1]), [100, 7, 9, 23], settings)  # (4, 4, 8, 8)
    alone = sampler.sample(torch.tensor([1]), [7], settings)
    other = sampler.sample(torch.tensor([2, 1, 5]), [55, 7, 8], settings)
    scale = batch.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(other[1], batch[1], rtol=0, atol=1e-5 * scale)
    assert (batch[1] - batch[3]).abs().max() > 0.1  # same label, other seed: another image
    again = sampler.sample(torch.tensor([3, 1, 4, 1]), [100, 7, 9, 23], settings)
    assert torch.equal(again, batch)


def test_guidance_one_is_the_conditional_prediction(model):
    sampler = DiTSampler(model)
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([900, 100]), torch.tensor([2, 8])
    batch_sizes = []
    hook = model.x_embedder.register_forward_hook(lambda m, i, o: batch_sizes.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            plain = sampler.predict(x, t, y, None, SamplerSettings(guidance=1.0))
            cond = model(x, t, y)
            guided = sampler.predict(x, t, y, torch.full_like(y, 10), SamplerSettings(guidance=1.0))
        assert torch.equal(plain, cond)
        torch.testing.assert_close(guided, cond, rtol=0, atol=1e-5)
        batch_sizes.clear()
        sampler.sample(y, [1, 2], SamplerSettings(steps=2, guidance=1.0))
        assert batch_sizes == [2, 2]  # no unconditional half at guidance 1
        batch_sizes.clear()
        sampler.sample(y, [1, 2], SamplerSettings(steps=2, guidance=4.0))
        assert batch_sizes == [4, 4]  # both halves in one batch
    finally:
        hook.remove()


def test_guidance_interval_guides_only_the_steps_inside_it(model):
    """(lo, hi] in sigma = sqrt((1 - abar) / abar): steps outside run the plain conditional forward alone."""
    settings = SamplerSettings(sampler="ddpm", steps=50, guidance_interval=(0.28, 5.42))
    sched = build_scheduler(settings)
    sched.set_timesteps(50)
    abar = np.cumprod(1.0 - linear_betas(1000))
    sigma = np.sqrt((1 - abar) / abar)
    want = [bool(0.28 < sigma[t] <= 5.42) for t in sched.timesteps.tolist()]
    assert settings.guided_steps(sched.alphas_cumprod, sched.timesteps) == want
    # the guided steps are one run in the middle: t = 571 .. 82 for DiT's linear betas
    guided_t = [t for t, g in zip(sched.timesteps.tolist(), want) if g]
    assert (max(guided_t), min(guided_t), len(guided_t)) == (571, 82, 25)
    assert guided_t == [t for t in sched.timesteps.tolist() if 82 <= t <= 571]
    assert SamplerSettings().guided_steps(sched.alphas_cumprod, sched.timesteps) == [True] * 50

    sampler = DiTSampler(model)
    y, seeds = torch.tensor([2, 8]), [1, 2]
    batch_sizes = []
    hook = model.x_embedder.register_forward_hook(lambda m, i, o: batch_sizes.append(i[0].shape[0]))
    try:
        sampler.sample(y, seeds, SamplerSettings(sampler="ddpm", steps=6, guidance=4.0, guidance_interval=(1.0, 20.0)))
    finally:
        hook.remove()
    # DDPM-6 runs t = 999 799 599 400 200 0: sigma 157, 25.5, 6.1, 2.0, 0.72, 0.01
    assert batch_sizes == [2, 2, 4, 4, 2, 2]
    # an interval holding every step is plain guidance; one holding none is guidance 1
    for kind in ("ddim", "ddpm"):
        def run(guidance=4.0, interval=None):
            return sampler.sample(y, seeds, SamplerSettings(sampler=kind, steps=4, guidance=guidance,
                                                            guidance_interval=interval))

        every, always = run(interval=(0, 1e9)), run()
        assert torch.equal(every, always)
        none, unguided = run(interval=(1e8, 1e9)), run(guidance=1.0)
        assert torch.equal(none, unguided) and (none - always).abs().max() > 1e-3
    for bad in [(5.0, 1.0), (-1.0, 2.0), (0.0, float("inf")), (1.0,)]:
        with pytest.raises(ValueError, match="guidance_interval must be"):
            sampler.sample(y, seeds, SamplerSettings(steps=2, guidance_interval=bad))


def test_fine_tune_grids_sample_with_the_configured_interval(model, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from drivedit.config.finetune import SamplingSection
    from drivedit.train.grids import draw_grid

    seen = []

    def spy(self, labels, seeds, settings, uncond=None):
        seen.append(settings)
        raise StopIteration  # the settings are what this test is about

    monkeypatch.setattr(DiTSampler, "sample", spy)
    meta = SimpleNamespace(scenarios=["rainy", "night"], codec_id="pixel", scale_factor=1.0)
    for interval in (None, (0.28, 3.0)):
        with pytest.raises(StopIteration):
            draw_grid(model, meta, SamplingSection(guidance_interval=interval), None, torch.device("cpu"),
                      tmp_path / "g.png")
    assert [s.guidance_interval for s in seen] == [None, (0.28, 3.0)]
    with pytest.raises(ValueError, match="must be"):
        SamplingSection(guidance_interval=(3.0, 0.28))


def test_superclass_guidance_uses_the_given_uncond_labels(model):
    sampler = DiTSampler(model)
    y, seeds = torch.tensor([1, 2]), [3, 4]
    settings = SamplerSettings(steps=3, guidance=4.0, guidance_kind="superclass")
    with pytest.raises(ValueError, match="superclass guidance needs uncond_labels"):
        sampler.sample(y, seeds, settings)
    sup = sampler.sample(y, seeds, settings, uncond_labels=torch.tensor([9, 9]))
    cfg = sampler.sample(y, seeds, SamplerSettings(steps=3, guidance=4.0))
    null = sampler.sample(y, seeds, settings, uncond_labels=torch.tensor([10, 10]))
    assert (sup - cfg).abs().max() > 1e-3
    torch.testing.assert_close(null, cfg, rtol=0, atol=1e-6)


def test_bad_inputs_are_named(model):
    sampler = DiTSampler(model)
    with pytest.raises(ValueError, match="got 1 seeds for 2 labels"):
        sampler.sample(torch.tensor([1, 2]), [1], SamplerSettings(steps=2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        sampler.sample(torch.tensor([11]), [1], SamplerSettings(steps=2))
    with pytest.raises(ValueError, match="steps must be an integer in"):
        sampler.sample(torch.tensor([1]), [1], SamplerSettings(steps=0))
    with pytest.raises(ValueError, match="sampler must be one of ddim, ddpm"):
        sampler.sample(torch.tensor([1]), [1], SamplerSettings(sampler="euler"))
    with pytest.raises(ValueError, match="guide_channels 5 exceeds"):
        sampler.sample(torch.tensor([1]), [1], SamplerSettings(guide_channels=5))
    with pytest.raises(ValueError, match="betas must be"):
        DiTSampler(model, betas=np.array([0.5, 1.5]))


def test_custom_betas_reach_the_scheduler(model):
    betas = cosine_power_betas(1000, power=1.5)
    sched = build_scheduler(SamplerSettings(sampler="ddpm", steps=10), betas)
    np.testing.assert_allclose(sched.betas.double().numpy(), betas, rtol=1e-6)
    a = DiTSampler(model, betas=betas).sample(torch.tensor([1]), [1], SamplerSettings(steps=4))
    b = DiTSampler(model).sample(torch.tensor([1]), [1], SamplerSettings(steps=4))
    assert (a - b).abs().max() > 1e-3


# ----------------------------------------------------------------------------- grids


def test_latents_to_uint8_and_grid(tmp_path):
    images = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(2, 3, 4, 5).clone()
    pixels = latents_to_uint8(images)
    assert pixels.shape == (2, 4, 5, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]  # (x + 1) * 127.5, rounded, clipped

    tiles = np.stack([np.full((16, 16, 3), 40 * i, np.uint8) for i in range(5)])
    path = save_grid(tiles, tmp_path / "grids" / "g.png", nrow=3, labels=["clear", "night"])
    img = np.asarray(Image.open(path))
    assert img.shape[0] == 2 * 16 + 3 * 2  # two rows of 16 px with 2 px gaps
    assert img.shape[1] > 3 * 16 + 4 * 2  # room for the row labels on the left
    label_w = img.shape[1] - (3 * 16 + 4 * 2)
    assert (img[2:18, label_w + 2 + 18:label_w + 2 + 34] == 40).all()  # second tile in place
    assert (img[:, :label_w] < 128).any()  # some label text was drawn
    plain = np.asarray(Image.open(save_grid(tiles, tmp_path / "plain.png", nrow=5)))
    assert plain.shape == (16 + 4, 5 * 16 + 6 * 2, 3)
    with pytest.raises(ValueError, match="got 1 row labels for 2 rows"):
        save_grid(tiles, tmp_path / "bad.png", nrow=3, labels=["one"])
    assert not (tmp_path / "bad.png").exists()


def test_pixel_models_clip_predicted_x0_to_the_image_range():
    """clip_x0 (set for pixel codecs) keeps every DDIM x0 prediction, hence the final image, in [-1, 1];
    latent models sample unclipped as DiT does."""
    from drivedit.models.codec import sample_clip_range
    from drivedit.models.dit import build_dit, dit_config

    torch.manual_seed(0)
    model = build_dit(dit_config("DiT-N/4", input_size=8, in_channels=3, num_classes=2))
    torch.nn.init.normal_(model.final_layer.linear.weight, std=2.0)  # wild eps predictions
    settings = SamplerSettings(sampler="ddim", steps=4, guidance=1.0)
    labels = torch.tensor([0, 1])
    free = DiTSampler(model).sample(labels, [1, 2], settings)
    clipped = DiTSampler(model, clip_x0=sample_clip_range("pixel")).sample(labels, [1, 2], settings)
    assert free.abs().max() > 1.5
    assert clipped.abs().max() <= 1.0 + 1e-6
    assert sample_clip_range("autoencoder_kl") is None
