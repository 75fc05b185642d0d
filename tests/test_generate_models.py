"""Model references for generation (no Ray), and the tiny models every generation test uses.

The models: a base checkpoint, adapter bundles made from it, the merged bundle exported as a plain
checkpoint, and an MLflow registry holding the bundle. DiT-N/2 on 8x8 pixel "latents" (3 channels,
the pixel codec), with every weight perturbed so the adaLN-Zero init does not make every image
the same. `tiny_models()` builds them once per test session (test_generate_job.py uses them too).
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from drivedit.config.common import DEFAULT_SCENARIOS
from drivedit.models.adapter_spec import AdapterSpec, apply_spec
from drivedit.models.bundle import BundleInfo, load_bundle, merge, save_bundle
from drivedit.models.checkpoint import export_safetensors, load_dit
from drivedit.storage import sha256_file
from drivedit.models.diffusion import linear_betas
from drivedit.models.dit import build_dit, dit_config

SCENARIOS = list(DEFAULT_SCENARIOS)
REGISTERED = "tiny-drive"


@dataclass
class TinyModels:
    base: Path  # plain checkpoint, 10 classes
    bundle: Path  # bitfit bundle, the 6 BDD scenarios
    tiered_bundle: Path  # finediffusion-style tiered table (superclass guidance)
    merged: Path  # the bundle merged and exported as a checkpoint: same weights as `bundle`
    tracking_uri: str
    registered: str  # models:/tiny-drive/1


def _perturb(model: torch.nn.Module, seed: int, only_trainable: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed" or (only_trainable and not p.requires_grad):
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _bundle(base: Path, out: Path, spec: AdapterSpec, seed: int, codec: str = "pixel", betas=None) -> Path:
    model = apply_spec(load_dit(base), spec)
    for name, p in model.named_parameters():
        p.requires_grad_(("bias" in name or "y_embedder" in name) and name != "pos_embed")
    _perturb(model, seed, only_trainable=True)
    info = BundleInfo(base=str(base), base_sha256=sha256_file(base), model_config=model.config.to_dict(), spec=spec,
                      scenarios=SCENARIOS, betas=(linear_betas() if betas is None else betas).tolist(), codec=codec,
                      method={"name": spec.method})
    return save_bundle(out, model, info)


def make_tiny_models(root: Path) -> TinyModels:
    from drivedit import tracking

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_dit(dit_config("DiT-N/2", input_size=8, in_channels=3, num_classes=10))
    _perturb(model, seed=1)
    base = export_safetensors(model, root / "base.safetensors")
    bundle = _bundle(base, root / "bundle", AdapterSpec(method="bitfit", num_scenarios=6, train_biases=True), seed=2)
    tiered = _bundle(base, root / "tiered", AdapterSpec(method="finediffusion", num_scenarios=6, train_biases=True,
                                                        superclass_of=[0, 0, 0, 1, 1, 2]), seed=3)
    merged = export_safetensors(merge(None, load_bundle(bundle)), root / "merged.safetensors")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run = tracking.start_run(uri, "tiny", "register-tiny")
    run.log_artifacts(bundle, "bundle")
    registered = run.register("bundle", REGISTERED)
    run.end()
    return TinyModels(base, bundle, tiered, merged, uri, registered)


@functools.lru_cache(maxsize=1)
def tiny_models() -> TinyModels:
    root = Path(tempfile.mkdtemp(prefix="drivedit-gen-models-"))
    atexit.register(shutil.rmtree, root, True)
    return make_tiny_models(root)


# ----------------------------------------------------------------------------- tests


from drivedit.generate.model_ref import load_sampling_model  # noqa: E402


@pytest.fixture(scope="module")
def models() -> TinyModels:
    return tiny_models()


def _outputs(model, labels) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(labels), 3, 8, 8, generator=g)
    return model(x, torch.tensor([500] * len(labels)), torch.tensor(labels))


def test_bundle_registry_and_checkpoint_refs_load_the_same_model(models):
    by_dir = load_sampling_model(str(models.bundle))
    by_registry = load_sampling_model(models.registered, tracking_uri=models.tracking_uri)
    by_ckpt = load_sampling_model(str(models.merged), class_names=SCENARIOS)
    for sm in (by_dir, by_registry, by_ckpt):
        assert sm.scenarios == SCENARIOS and sm.class_ids == list(range(6))
        assert sm.image_size == 8 and sm.codec_kind == "pixel" and sm.superclass_of is None
        assert not sm.model.training and not any(p.requires_grad for p in sm.model.parameters())
        np.testing.assert_array_equal(sm.betas, linear_betas())
    assert by_dir.version == f"bundle:{models.bundle}" and by_registry.version == "models:/tiny-drive/1"
    assert by_ckpt.version == f"checkpoint:{models.merged}"
    # the registry serves the very files of the bundle directory
    assert by_dir.digest == by_registry.digest != by_ckpt.digest
    with torch.no_grad():
        ref = _outputs(by_dir.model, [0, 3, 5])
        assert torch.equal(ref, _outputs(by_registry.model, [0, 3, 5]))
        assert torch.equal(ref, _outputs(by_ckpt.model, [0, 3, 5]))
    assert by_ckpt.label_of("night") == 5
    with pytest.raises(ValueError, match="unknown scenario 'sunny'"):
        by_ckpt.label_of("sunny")


def test_checkpoint_class_names_map_to_class_ids(models):
    sm = load_sampling_model(str(models.base), class_names={"snowplow": 7, "traffic light": 2})
    assert sm.scenarios == ["snowplow", "traffic light"] and sm.class_ids == [7, 2]
    assert sm.labels(["traffic light", "snowplow"]).tolist() == [2, 7]
    with pytest.raises(ValueError, match="without a scenario vocabulary; set model.class_names"):
        load_sampling_model(str(models.base))
    with pytest.raises(ValueError, match=r"class ids snowplow=12 are outside the checkpoint's 10 classes"):
        load_sampling_model(str(models.base), class_names={"snowplow": 12})
    with pytest.raises(ValueError, match="carries its own scenario vocabulary"):
        load_sampling_model(str(models.bundle), class_names=["a"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sampling_model(str(models.base) + ".missing", class_names=["a"])


def test_tiered_bundle_exposes_superclasses(models):
    sm = load_sampling_model(str(models.tiered_bundle))
    assert sm.superclass_of is not None
    # superclass ids are table rows after the 6 scenario rows
    assert sm.superclass_of(torch.tensor([0, 2, 3, 5])).tolist() == [6, 6, 7, 8]


def test_codec_must_match_the_latent_channels(models, tmp_path):
    # a VAE directory's config is all that decides its geometry (4 channels, factor 8)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKL", "latent_channels": 4, "block_out_channels": [8, 8, 8, 8]}))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # present; not read before sampling
    with pytest.raises(ValueError, match="samples 3-channel latents but the codec autoencoder_kl:.* has 4"):
        load_sampling_model(str(models.bundle), codec={"kind": "autoencoder_kl", "source": str(tmp_path / "vae")})


def test_bundle_from_s3(models, s3_bucket):
    from drivedit import storage

    uri = f"s3://{s3_bucket}/bundles/tiny"
    storage.upload_dir(str(models.bundle), uri)
    sm = load_sampling_model(uri)
    assert sm.version == f"bundle:{uri}" and sm.scenarios == SCENARIOS
    assert sm.digest == load_sampling_model(str(models.bundle)).digest
