"""`drivedit export --diffusers-pipeline`: a fine-tuned latent model loads in diffusers' DiTPipeline as it is
and samples what drivedit's sampler samples (unit: no Ray).

The model: a random tiny AutoencoderKL (factor 4) saved as a diffusers directory and a tiny latent DiT-N/2
(4 x 8 x 8 latents, 32 px images) with a bitfit bundle of the six BDD100K scenarios, trained-looking
(every weight perturbed) and with its own noise schedule, so the scheduler's betas matter.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import random_vae  # noqa: E402
from test_generate_models import SCENARIOS, _bundle, _perturb  # noqa: E402

from drivedit.export import main as export_main  # noqa: E402
from drivedit.models.adapter_spec import AdapterSpec  # noqa: E402
from drivedit.models.bundle import load_bundle, merge  # noqa: E402
from drivedit.models.checkpoint import export_safetensors  # noqa: E402
from drivedit.models.dit import build_dit, dit_config  # noqa: E402

BETAS = np.linspace(2e-4, 0.03, 1000)  # not DiT's default linear 1e-4..0.02
STEPS, GUIDANCE = 10, 4.0
# measured: pipeline vs drivedit sampler, max |difference| 0.0084 in [0, 1] pixels (about 2/255): diffusers'
# transformer forward uses timestep frequencies /127 and norm3 eps 1e-5 where DiT uses /128 and 1e-6
TOLERANCE = 0.03
# with those two set to DiT's values (patch_for_parity), only float rounding is left: measured 6e-7
PARITY_TOLERANCE = 1e-5


def _base(root: Path, in_channels: int) -> Path:
    torch.manual_seed(0)
    model = build_dit(dit_config("DiT-N/2", input_size=8, in_channels=in_channels, num_classes=10))
    _perturb(model, seed=1)
    return export_safetensors(model, root / f"base{in_channels}.safetensors")


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    random_vae(4, full=False).save_pretrained(root / "vae")
    bundle = _bundle(_base(root, 4), root / "bundle", AdapterSpec(method="bitfit", num_scenarios=6, train_biases=True),
                     seed=2, codec=f"autoencoder_kl:{root / 'vae'}", betas=BETAS)
    return root, bundle


def _sampler_images(bundle: Path, labels: list[int], seeds: list[int]) -> np.ndarray:
    """drivedit's own path: the generate job's model loading, sampler and codec; (N, H, W, 3) in [0, 1]."""
    from drivedit.generate.model_ref import load_sampling_model
    from drivedit.generate.sampler import DiTSampler, SamplerSettings

    sm = load_sampling_model(str(bundle))
    latents = DiTSampler(sm.model, sm.betas, amp_dtype=None).sample(
        torch.tensor(labels), seeds, SamplerSettings("ddim", STEPS, GUIDANCE))  # (N, 4, 8, 8)
    images = sm.load_codec().decode(latents)  # (N, 3, 32, 32) in [-1, 1]
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_dit_pipeline_loads_the_export_and_samples_what_the_sampler_samples(latent, capsys):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from drivedit.models.diffusers_format import patch_for_parity

    root, bundle = latent
    assert export_main([str(bundle), "--diffusers-pipeline", str(root / "pipe")]) == 0
    assert "diffusers_pipeline" in capsys.readouterr().out
    pipe = DiTPipeline.from_pretrained(str(root / "pipe"))  # no patching, no extra arguments

    assert pipe.labels == {name: i for i, name in enumerate(SCENARIOS)}
    assert pipe.get_label_ids(["rainy"]) == [3] and pipe.get_label_ids(["night", "clear"]) == [5, 0]
    # the label table: scenario rows first, the model's null row at DiTPipeline's 1000 (and below it)
    merged = merge(None, load_bundle(bundle))
    ours = merged.y_embedder.embedding_table.weight  # (7, D): 6 scenarios, null last
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight  # (1001, D)
    assert table.shape == (1001, ours.shape[1])
    assert torch.equal(table[:6], ours[:6]) and torch.equal(table[1000], ours[6])
    assert torch.equal(table[6:1000], ours[6].expand(994, -1))
    # the scheduler steps on the bundle's betas, DDIM as the sampler configures it
    assert isinstance(pipe.scheduler, DDIMScheduler) and not pipe.scheduler.config.clip_sample
    np.testing.assert_allclose(pipe.scheduler.betas.numpy(), BETAS, rtol=1e-6)
    # the VAE the model was trained with
    vae = AutoencoderKL.from_pretrained(str(root / "vae"))
    assert pipe.vae.config.scaling_factor == vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), vae.state_dict().values()))

    # the same seed for both labels: the images differ only through the label rows
    ids, seeds = pipe.get_label_ids(["rainy", "night"]), [11, 11]
    want = _sampler_images(bundle, ids, seeds)

    def run() -> np.ndarray:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(class_labels=ids, guidance_scale=GUIDANCE, generator=generators, num_inference_steps=STEPS,
                    output_type="np").images  # (2, 32, 32, 3) in [0, 1]

    got = run()
    assert got.shape == want.shape == (2, 32, 32, 3)
    assert np.abs(got - want).max() <= TOLERANCE
    # with diffusers' two numeric differences set to DiT's values, the images agree to float rounding: a wrong
    # table row, null id, scheduler, beta or VAE scale would show far above it (the rainy and night images of
    # one seed differ by ~1e-3 on average even with this random VAE)
    patch_for_parity(pipe.transformer)
    exact = run()
    assert np.abs(exact - want).max() <= PARITY_TOLERANCE
    assert np.abs(exact[0] - exact[1]).mean() > 100 * np.abs(exact - want).max()


def test_models_that_cannot_be_a_pipeline_are_refused_with_the_reason(latent, tmp_path, capsys):
    root, _ = latent
    pixel = _bundle(_base(tmp_path, 3), tmp_path / "pixel", AdapterSpec(method="bitfit", num_scenarios=6,
                                                                        train_biases=True), seed=2)
    assert export_main([str(pixel), "--diffusers-pipeline", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "'pixel' space" in err and "has no VAE to decode with" in err and "--diffusers" in err
    tiered = _bundle(_base(tmp_path, 4), tmp_path / "tiered", AdapterSpec(
        method="finediffusion", num_scenarios=6, train_biases=True, superclass_of=[0, 0, 0, 1, 1, 2]), seed=3,
        codec=f"autoencoder_kl:{root / 'vae'}")
    assert export_main([str(tiered), "--diffusers-pipeline", str(tmp_path / "t"), "--official",
                        str(tmp_path / "t.pt")]) == 2
    assert "FineDiffusion" in capsys.readouterr().err
    # refused before anything was written
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists() and not (tmp_path / "t.pt").exists()
