"""bfloat16 on the CPU: what each dtype setting means per device, and the codec and sampler computing in it
close to float32 (the settings the demo's encode and generate use: `auto`)."""
import numpy as np
import pytest
import torch

from drivedit.generate.sampler import DiTSampler, SamplerSettings
from drivedit.models import precision
from drivedit.models.codec import load_codec
from drivedit.models.dit import build_dit, dit_config


@pytest.mark.parametrize("native", [True, False])
def test_settings_resolve_per_device(monkeypatch, native):
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: native)
    cpu = "cpu"
    assert precision.compute_dtype("float32", cpu) == torch.float32
    assert precision.compute_dtype("bfloat16", cpu) == torch.bfloat16  # asked for: honoured, native or not
    assert precision.compute_dtype("float16", cpu) == torch.float32  # no fast float16 on a CPU
    assert precision.compute_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert precision.compute_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert precision.compute_dtype("float16", "cuda") == torch.float16
    assert precision.autocast_dtype("float32", cpu) is None and precision.autocast_dtype(None, cpu) is None
    assert precision.autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    with pytest.raises(ValueError, match="dtype 'half' is not one of float32, float16, bfloat16, auto"):
        precision.compute_dtype("half", cpu)


def test_the_configs_offer_the_settings_the_policy_resolves():
    import typing

    from drivedit.config.common import DtypeSetting

    assert typing.get_args(DtypeSetting) == precision.DTYPE_SETTINGS


def test_auto_on_a_gpu_without_cuda_is_float32():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert precision.compute_dtype("auto", "cuda") == torch.float32


@pytest.fixture(scope="module")
def scenes():
    from drivedit.data.scenes import render_scene

    rng = np.random.default_rng(3)
    frames = [np.asarray(render_scene(rng, w, t, 128, 128)[0]) for w, t in
              [("clear", "daytime"), ("rainy", "daytime"), ("snowy", "daytime"), ("clear", "night")]]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (4, 3, 128, 128)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).square().mean().item()  # images in [-1, 1] -> [0, 1]
    return 10 * np.log10(1 / mse)


def test_tiny_vae_in_bfloat16_on_the_cpu_keeps_its_round_trip(scenes):
    fp32 = load_codec("autoencoder_kl", "builtin:tiny-vae").to("cpu")
    bf16 = load_codec("autoencoder_kl", "builtin:tiny-vae", dtype="bfloat16").to("cpu")
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16 and next(fp32.vae.parameters()).dtype == torch.float32
    conv = next(m for m in bf16.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # oneDNN's fast layout on the CPU too
    m32, m16 = fp32.encode(scenes), bf16.encode(scenes)  # (4, 8, 32, 32) float32 both
    assert m16.dtype == torch.float32 and m16.shape == m32.shape == (4, 8, 32, 32)
    mean32, mean16 = m32[:, :4], m16[:, :4]
    rel = (mean16 - mean32).norm() / mean32.norm()
    assert 0 < rel < 0.02, rel  # computed in bfloat16 (not identical), within 2 % of float32
    z = mean32 * fp32.scale_factor
    rec32, rec16 = fp32.decode(z), bf16.decode(z)
    assert rec16.dtype == torch.float32 and rec16.shape == (4, 3, 128, 128)
    assert _psnr(rec16, rec32) > 40  # the decoders agree far above the VAE's own round-trip error
    assert abs(_psnr(bf16.decode(mean16 * bf16.scale_factor), scenes) - _psnr(rec32, scenes)) < 0.3


@pytest.fixture(scope="module")
def model():
    m = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():  # DiT zero-initialises its outputs: give every weight a value
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def test_sampler_autocasts_on_the_cpu_only_when_asked(model):
    settings = SamplerSettings(steps=5, guidance=3.0)
    labels, seeds = torch.tensor([1, 7]), [11, 12]
    fp32 = DiTSampler(model).sample(labels, seeds, settings)
    legacy = DiTSampler(model, amp_dtype=torch.bfloat16).sample(labels, seeds, settings)  # CUDA-only autocast
    torch.testing.assert_close(legacy, fp32, rtol=0, atol=0)
    bf16 = DiTSampler(model, amp_dtype=torch.bfloat16, cpu_amp=True).sample(labels, seeds, settings)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    rel = (bf16 - fp32).norm() / fp32.norm()
    assert rel < 0.05, rel
    none = DiTSampler(model, amp_dtype=None, cpu_amp=True).sample(labels, seeds, settings)
    torch.testing.assert_close(none, fp32, rtol=0, atol=0)


def test_a_jobs_sampler_resolves_its_dtype_setting_and_codec_clip(model):
    settings = SamplerSettings(steps=5, guidance=3.0)
    labels, seeds = torch.tensor([1, 7]), [11, 12]
    bf16 = DiTSampler.for_setting(model, None, "cpu", "bfloat16", "autoencoder_kl")
    assert (bf16.amp_dtype, bf16.cpu_amp, bf16.clip_x0) == (torch.bfloat16, True, None)
    reference = DiTSampler(model, amp_dtype=torch.bfloat16, cpu_amp=True).sample(labels, seeds, settings)
    torch.testing.assert_close(bf16.sample(labels, seeds, settings), reference, rtol=0, atol=0)
    fp32 = DiTSampler.for_setting(model, None, "cpu", "float32", "pixel")
    assert (fp32.amp_dtype, fp32.clip_x0) == (None, 1.0)  # pixel latents are images: x0 clipped to [-1, 1]
    assert DiTSampler.for_setting(model, None, "cpu", "float16", "pixel").amp_dtype is None  # a CPU keeps float32


def test_cpu_precision_benchmark_measures_each_arm_against_float32():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.cpu_precision import codec_arms, sampler_arms

    codec = codec_arms(batch=2, repeats=1)
    base = codec["float32 NCHW (baseline)"]
    assert base["encode_ratio"] == base["decode_ratio"] == 1.0 and base["latent_mean_rel_diff"] == 0.0
    assert codec["float32 NHWC"]["latent_mean_rel_diff"] < 1e-4 and codec["float32 NHWC"]["image_rel_diff"] < 1e-4
    assert 0 < codec["bfloat16 NHWC"]["latent_mean_rel_diff"] < 0.02 and codec["bfloat16 NHWC"]["encode_img_s"] > 0
    # a few large DDPM steps amplify the eps error (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)): 10 steps, 6-10 %
    sampling = sampler_arms(batch=2, steps=10, repeats=1)
    assert sampling["float32 (baseline)"]["ratio"] == 1.0 and sampling["float32 (baseline)"]["latent_rel_diff"] == 0
    assert 0 < sampling["bfloat16"]["latent_rel_diff"] < 0.15 and sampling["bfloat16"]["img_s"] > 0
