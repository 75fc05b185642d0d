"""Checkpoint formats: official .pt, train.py dicts, safetensors, diffusers directories; refusals and errors."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import drivedit.models.checkpoint as ckpt
from drivedit.models.checkpoint import (CheckpointMismatchError, export_diffusers, export_official,
                                        export_safetensors, load_dit, read_dit_config, resolve_model_source)
from drivedit.models.diffusers_format import DiffusersFormatError, patch_for_parity
from drivedit.models.dit import build_dit, dit_config
from drivedit.storage import sha256_file


pytestmark = pytest.mark.usefixtures("one_thread")


def random_dit(name="DiT-N/2", seed=0, **kw):
    cfg = dit_config(name, **{"input_size": 8, "num_classes": 10, **kw})
    model = build_dit(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # pos_embed keeps its fixed sin-cos table
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def inputs(n=3, size=8, num_classes=10):
    g = torch.Generator().manual_seed(42)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.tensor([1, 500, 999][:n])
    y = torch.tensor([0, 3, num_classes][:n])  # the last one is the null row
    return x, t, y


def assert_same_model(a, b):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x, t, y = inputs(num_classes=a.config.num_classes)
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))


def test_official_pt_round_trip(tmp_path):
    model = random_dit()
    path = export_official(model, tmp_path / "dit.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(model.state_dict())  # a bare state dict, official keys
    assert_same_model(model, load_dit(path))
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_train_py_checkpoint_uses_ema(tmp_path):
    ema, live = random_dit(seed=1), random_dit(seed=2)
    args = argparse.Namespace(model="DiT-N/2", image_size=8, num_classes=10, global_batch_size=256)
    opt = torch.optim.AdamW(live.parameters(), lr=1e-4).state_dict()
    torch.save({"model": live.state_dict(), "ema": ema.state_dict(), "opt": opt, "args": args}, tmp_path / "0001000.pt")
    assert_same_model(ema, load_dit(tmp_path / "0001000.pt"))


def test_safetensors_round_trip_with_and_without_metadata(tmp_path):
    model = random_dit("DiT-T/2")
    path = export_safetensors(model, tmp_path / "m.safetensors")
    assert_same_model(model, load_dit(path))
    assert read_dit_config(path) == model.config
    # a plain safetensors file (no metadata): the size is inferred from the shapes
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    assert_same_model(model, load_dit(tmp_path / "plain.safetensors"))


def test_rope_model_needs_metadata_or_config(tmp_path):
    model = random_dit(posenc="rope")
    assert_same_model(model, load_dit(export_safetensors(model, tmp_path / "rope.safetensors")))
    export_official(model, tmp_path / "rope.pt")  # no pos_embed and no metadata: the grid is unknown
    with pytest.raises(ValueError, match="input_size"):
        load_dit(tmp_path / "rope.pt")
    assert_same_model(model, load_dit(tmp_path / "rope.pt", config=model.config))


def test_given_config_must_match(tmp_path):
    model = random_dit()
    path = export_official(model, tmp_path / "dit.pt")
    wrong = dit_config("DiT-N/2", input_size=16, num_classes=10)
    with pytest.raises(CheckpointMismatchError) as e:
        load_dit(path, config=wrong)
    assert "input_size is 16 in the given config but 8 in the checkpoint" in str(e.value)
    assert "pos_embed checkpoint (1, 16, 64) vs model (1, 64, 64)" in str(e.value)


def test_missing_block_names_the_missing_keys(tmp_path):
    model = random_dit("DiT-T/2")  # 6 blocks
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.3.")}
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatchError) as e:
        load_dit(tmp_path / "broken.pt")
    err = e.value
    assert isinstance(err, ValueError)
    assert err.missing == sorted(f"blocks.3.{k}" for k in [
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
        "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"])
    assert err.unexpected == ["extra.weight"]
    assert "missing: blocks.3.adaLN_modulation.1.bias, blocks.3.adaLN_modulation.1.weight" in str(err)
    # the last block missing from a file that states its depth is caught too
    full = export_safetensors(model, tmp_path / "full.safetensors")
    from safetensors import safe_open
    with safe_open(str(full), "pt") as f:
        meta = f.metadata()
        cut = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("blocks.5.")}
    save_file(cut, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(CheckpointMismatchError, match="missing: blocks.5.adaLN_modulation.1.bias"):
        load_dit(tmp_path / "cut.safetensors")


class Payload:
    """A pickle that would create a file when unpickled if arbitrary objects were allowed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_a_non_tensor_object_is_refused(tmp_path):
    marker = tmp_path / "was-executed"
    state = dict(random_dit().state_dict())
    state["payload"] = Payload(marker)
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load .*evil.pt.*never unpickles arbitrary objects"):
        load_dit(tmp_path / "evil.pt")
    assert not marker.exists()
    # a plain non-tensor value passes the unpickler but is still not a state dict
    torch.save({"w": torch.zeros(1), "note": "hello"}, tmp_path / "note.pt")
    with pytest.raises(ValueError, match="not a state dict: entries note"):
        load_dit(tmp_path / "note.pt")


def tiny_diffusers(seed=0, legacy=False):
    from diffusers import DiTTransformer2DModel, Transformer2DModel

    cls = Transformer2DModel if legacy else DiTTransformer2DModel
    torch.manual_seed(seed)
    kw = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
              norm_elementwise_affine=False)
    if legacy:  # the legacy class has other defaults; the hub's converted configs state these
        kw.update(activation_fn="gelu-approximate", attention_bias=True)
    model = cls(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        # a converted checkpoint holds the same embedder in every block
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


@pytest.mark.parametrize("legacy", [False, True])
def test_diffusers_directory_loads_and_matches_patched_diffusers(tmp_path, legacy):
    ref = tiny_diffusers(legacy=legacy)
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_dit(tmp_path / "transformer")
    assert ours.config == dit_config("DiT-N/2", input_size=8, num_classes=10)
    x, t, y = inputs()
    with torch.no_grad():
        as_shipped = ref(x, timestep=t, class_labels=y).sample
        patch_for_parity(ref)
        patched = ref(x, timestep=t, class_labels=y).sample
        out = ours(x, t, y)
    assert (out - as_shipped).abs().max() > 1e-4  # the two documented differences are real
    torch.testing.assert_close(out, patched, rtol=0, atol=1e-5)
    # a pipeline directory (transformer/ subfolder) works too
    assert_same_model(ours, load_dit(tmp_path))


def test_diffusers_with_diverged_embedder_copies_is_refused(tmp_path):
    ref = tiny_diffusers()
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    ref.save_pretrained(tmp_path / "d")
    with pytest.raises(DiffusersFormatError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"):
        load_dit(tmp_path / "d")


def test_export_diffusers_loads_with_from_pretrained(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = random_dit()
    out_dir = export_diffusers(model, tmp_path / "export")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["out_channels"] == 8
    theirs = DiTTransformer2DModel.from_pretrained(out_dir).eval()
    patch_for_parity(theirs)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, timestep=t, class_labels=y).sample, model(x, t, y), rtol=0, atol=1e-5)
    assert_same_model(model, load_dit(out_dir))  # and back
    export_diffusers(model, out_dir)  # re-export over an existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(DiffusersFormatError, match="posenc 'rope'"):
        export_diffusers(random_dit(posenc="rope"), tmp_path / "rope")


def test_builtin_refs_and_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "ASSETS_DIR", tmp_path)
    with pytest.raises(ValueError, match="none are shipped"):
        resolve_model_source("builtin:tiny-dit")
    model = random_dit()
    path = export_safetensors(model, tmp_path / "tiny-dit.safetensors")
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:nope'; available: builtin:tiny-dit"):
        resolve_model_source("builtin:nope")
    assert resolve_model_source("builtin:tiny-dit") == path
    assert_same_model(model, load_dit("builtin:tiny-dit"))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(tmp_path / "absent.pt")
