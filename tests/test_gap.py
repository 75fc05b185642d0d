"""Gap measurement: the planted module wins; selection respects the budget; the report is written."""
import copy
import json

import pytest
import torch
from conftest import random_tiny_dit

from drivedit.config.method import MethodConfig
from drivedit.models.adapter_spec import linear_names, modulator_cost
from drivedit.train.gap import ProbeData, module_gaps, select_by_gap, write_gap_report
from drivedit.train.method_adapters import apply_method

PLANTED = "blocks.2.attn.proj"


@pytest.fixture(scope="module")
def base():
    return random_tiny_dit("DiT-T/2", std=0.05)


class _Planted:
    """Shifts PLANTED's output by 6 on target passes only, told apart from source passes by their batch size."""

    def __init__(self, model, target_batch: int):
        self.target = False
        self.handles = [
            model.register_forward_pre_hook(
                lambda m, args: setattr(self, "target", args[0].shape[0] == target_batch)),
            model.get_submodule(PLANTED).register_forward_hook(
                lambda m, i, out: out + 6.0 if self.target else out),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


def test_planted_module_has_the_largest_gap(base):
    g = torch.Generator().manual_seed(1)
    target = torch.randn(16, 4, 8, 8, generator=g)
    source = torch.randn(12, 4, 8, 8, generator=g)  # the same distribution: only the plant differs
    names = linear_names(base)
    planted = _Planted(base, target_batch=16)
    try:
        gaps = module_gaps(base, names, target, torch.full((16,), 3), source, torch.full((12,), 3),
                           timesteps=[100, 500])
    finally:
        planted.remove()
    ranked = sorted(gaps, key=gaps.get, reverse=True)
    assert ranked[0] == PLANTED
    # modules upstream of the plant only see sampling differences
    upstream = [n for n in names if n.startswith(("t_embedder", "blocks.0.", "blocks.1.", "blocks.2.attn.qkv"))]
    assert max(gaps[n] for n in upstream) < gaps[PLANTED] / 4
    assert gaps["t_embedder.mlp.0"] == pytest.approx(0.0, abs=1e-4)  # same t, same label: no gap at all


def test_no_shift_no_gap(base):
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(8, 4, 8, 8, generator=g)
    gaps = module_gaps(base, linear_names(base), lat, torch.full((8,), 3), lat, torch.full((8,), 3), [200])
    assert max(gaps.values()) < 1e-3


def test_selection_is_greedy_under_budget():
    gaps = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0}
    costs = {"a": 60, "b": 50, "c": 30, "d": 10}
    assert select_by_gap(gaps, costs, 100) == (["a", "c", "d"], 100)  # b no longer fits; c and d still do
    assert select_by_gap(gaps, costs, 9) == ([], 0)


def test_apply_method_gap_select_respects_budget_and_writes_report(base, tmp_path):
    g = torch.Generator().manual_seed(3)
    probe = ProbeData(torch.randn(12, 4, 8, 8, generator=g), torch.arange(12) % 3,
                      source_latents=torch.randn(10, 4, 8, 8, generator=g),
                      source_labels=torch.randint(0, 10, (10,), generator=g))
    planted_model = copy.deepcopy(base)
    budget = 40_000
    cfg = MethodConfig(name="driveditfit", select="gap", budget=budget, scenario_init="denoise", init_samples=2,
                       init_timesteps=[500], gap_timesteps=[100, 600])
    planted = _Planted(planted_model, target_batch=12)
    try:
        r = apply_method(planted_model, cfg, ["clear", "rainy", "night"], probe)
    finally:
        planted.remove()
    rep = r.report["gap"]
    table = 4 * 96
    assert rep["spent"] <= budget and r.report["counts"]["trainable"] == rep["spent"]
    assert rep["spent"] == table + sum(modulator_cost(base, n, 4) for n in r.selected_modules)
    assert set(r.selected_modules) == set(rep["selected"]) and PLANTED in r.selected_modules
    assert {n.rsplit(".", 1)[0] for n in r.trainable if ".mod_" in n} == set(r.selected_modules)
    assert max(rep["modules"], key=lambda m: m["gap"])["name"] == PLANTED
    json_path, png_path = write_gap_report(rep, tmp_path / "gap")
    data = json.loads(json_path.read_text())
    assert len(data["modules"]) == len(linear_names(base)) and data["budget"] == budget
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gap_without_source_latents_uses_the_models_own_samples(base):
    g = torch.Generator().manual_seed(4)
    probe = ProbeData(torch.randn(6, 4, 8, 8, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]))
    cfg = MethodConfig(name="driveditfit", select="gap", budget=0.05, scenario_init="random", source_samples=4,
                       source_steps=2, gap_timesteps=[300])
    model = copy.deepcopy(base).train()
    r = apply_method(model, cfg, ["clear", "rainy", "night"], probe)
    assert model.training  # the source sampler put the mode back
    rep = r.report["gap"]
    assert "samples of the base model" in rep["source"]
    total_base = sum(p.numel() for p in base.parameters())
    assert rep["budget"] == int(0.05 * total_base) and 0 < rep["spent"] <= rep["budget"]
    assert r.selected_modules and all(m["gap"] >= 0 for m in rep["modules"])
    with pytest.raises(ValueError, match="does not cover the scenario table"):
        apply_method(copy.deepcopy(base), cfg.model_copy(update={"budget": 100}), ["clear", "rainy", "night"], probe)
