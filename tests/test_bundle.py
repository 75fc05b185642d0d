"""Adapter bundles: save / load / apply / merge; the merged plain DiT computes what the adapted model computes."""
import copy
import json

import pytest
import torch

from drivedit.config.method import MethodConfig
from drivedit.models.adapter_spec import apply_spec
from drivedit.models.bundle import BundleInfo, apply_bundle, load_bundle, merge, save_bundle
from drivedit.models.checkpoint import export_safetensors
from drivedit.models.dit import DiT, build_dit, dit_config
from drivedit.storage import sha256_file
from drivedit.train.method_adapters import apply_method
from drivedit.train.schedule import ProgressiveSchedule

METHODS = ["full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit"]
SCENARIOS = ["clear", "rainy", "night"]


def _trained(base, name):
    """An adapted model whose trainable tensors moved away from their init, as after training."""
    cfg = MethodConfig(name=name, scenario_init="random")
    if name == "finediffusion":
        cfg = cfg.model_copy(update={"superclasses": {"day": ["clear", "rainy"], "dark": ["night"]}})
    r = apply_method(copy.deepcopy(base), cfg, SCENARIOS)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in r.trainable.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return r


def _info(r, base_ref="(test)", sha=None):
    return BundleInfo(base=base_ref, base_sha256=sha, model_config=r.model.config.to_dict(), spec=r.spec,
                      scenarios=r.scenarios, betas=ProgressiveSchedule(60).final_betas().tolist(), codec="pixel",
                      method=r.method.model_dump(mode="json"), selected_modules=r.selected_modules,
                      superclasses=r.superclass_names, extra={"step": 60})


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, 4, 8, 8, generator=g), torch.tensor([0, 3, 250, 500, 750, 999])


@pytest.mark.parametrize("name", METHODS)
def test_round_trip_merged_equals_adapted(base, tmp_path, name):
    r = _trained(base, name)
    adapted = r.model.eval()
    path = save_bundle(tmp_path / "bundle", adapted, _info(r))
    bundle = load_bundle(path)
    meta = json.loads((path / "bundle.json").read_text())
    # only the trainable tensors plus the scenario table are stored
    assert set(bundle.tensors) == set(r.trainable) | {"y_embedder.embedding_table.weight"}
    assert meta["scenarios"] == SCENARIOS and meta["codec"] == "pixel" and len(meta["betas"]) == 1000
    assert bundle.betas[-1] == pytest.approx(ProgressiveSchedule(60).final_betas()[-1])

    x, t = _inputs()
    labels = [torch.tensor([0, 1, 2, 0, 1, 2]), torch.full((6,), 3)]
    if name == "finediffusion":
        labels[1] = torch.tensor([3, 4, 3, 4, 3, 4])  # superclass rows
    rebuilt = apply_bundle(copy.deepcopy(base), bundle)
    merged = merge(copy.deepcopy(base), bundle)
    assert type(merged) is DiT and merged.config.hidden_size == 64
    plain = DiT(merged.config)
    assert list(merged.state_dict()) == list(plain.state_dict())  # official keys, nothing else
    if name != "finediffusion":
        assert merged.config.num_classes == 3
    with torch.no_grad():
        for y in labels:
            want = adapted(x, t, y)
            torch.testing.assert_close(rebuilt(x, t, y), want, rtol=0, atol=1e-6)
            torch.testing.assert_close(merged(x, t, y), want, rtol=1e-5, atol=2e-5)
    # the merge really moved away from the base: a silently dropped adapter would not
    assert not torch.allclose(merged(x, t, labels[0]), base(x, t, labels[0]), atol=1e-3)


def test_tiered_merge_keeps_superclass_guidance(base, tmp_path):
    r = _trained(base, "finediffusion")
    merged = merge(copy.deepcopy(base), load_bundle(save_bundle(tmp_path / "b", r.model, _info(r))))
    assert merged.config.num_classes == 4  # 3 classes + 2 superclasses = num_classes + 1 rows
    assert merged.y_embedder.superclass_of(torch.tensor([0, 1, 2])).tolist() == [3, 3, 4]
    x, t = _inputs()
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        want = r.model.eval().forward_guided(x, t, y, r.model.y_embedder.superclass_of(y), 4.0)
        got = merged.forward_guided(x, t, y, merged.y_embedder.superclass_of(y), 4.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_merge_from_the_recorded_base_checks_its_sha(base, tmp_path):
    base_file = export_safetensors(base, tmp_path / "base.safetensors")
    r = _trained(base, "driveditfit")
    path = save_bundle(tmp_path / "b", r.model, _info(r, str(base_file), sha256_file(base_file)))
    merged = merge(None, load_bundle(path))
    x, t = _inputs()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, y), r.model.eval()(x, t, y), rtol=1e-5, atol=2e-5)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.blocks[0].attn.qkv.bias.add_(1.0)
    export_safetensors(other, base_file)
    with pytest.raises(ValueError, match="does not match the sha256"):
        merge(None, load_bundle(path))


def test_bad_bundles_are_refused_and_saves_are_atomic(base, tmp_path):
    r = _trained(base, "bitfit")
    path = save_bundle(tmp_path / "b", r.model, _info(r))
    first = (path / "adapter.safetensors").read_bytes()
    # a failing save leaves the previous bundle intact and no temp directory behind
    with pytest.raises(ValueError, match="missing"):
        save_bundle(path, r.model, _info(r), tensors={})
    assert (path / "adapter.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    # a base of another shape
    wrong = build_dit(dit_config("DiT-N/2", input_size=16, num_classes=10))
    with pytest.raises(ValueError, match="input_size: bundle 8 vs base 16"):
        apply_bundle(wrong, load_bundle(path))
    # an already adapted model
    with pytest.raises(ValueError, match="already carries adapters"):
        apply_spec(r.model, r.spec)
    (path / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors is missing"):
        load_bundle(path)
    # EMA weights can be stored instead of the live ones
    ema = {n: torch.zeros_like(p) for n, p in r.model.named_parameters() if n in r.trainable}
    ema["y_embedder.embedding_table.weight"] = r.model.y_embedder.embedding_table.weight.detach().clone()
    b = load_bundle(save_bundle(tmp_path / "ema", r.model, _info(r), tensors=ema))
    assert all(torch.count_nonzero(b.tensors[n]) == 0 for n in r.trainable)


@pytest.mark.parametrize("name", ["driveditfit", "finediffusion"])
def test_base_without_null_row(tmp_path, name):
    torch.manual_seed(1)
    base = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=10, class_dropout_prob=0.0))
    r = _trained(base, name)
    assert r.model.y_embedder.embedding_table.num_embeddings == (3 if name == "driveditfit" else 5)
    merged = merge(copy.deepcopy(base), load_bundle(save_bundle(tmp_path / "b", r.model, _info(r))))
    x, t = _inputs()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, y), r.model.eval()(x, t, y), rtol=1e-5, atol=2e-5)
