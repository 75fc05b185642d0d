"""Fine-tuning methods: identity at init, only the declared tensors train, published counts, configs."""
import copy

import pytest
import torch

from drivedit.config.base import ConfigError, validate_config
from drivedit.config.method import MethodConfig
from drivedit.models.diffusion import GaussianDiffusion, linear_betas
from drivedit.models.dit import build_dit, dit_config
from drivedit.train.gap import ProbeData
from drivedit.train.method_adapters import apply_method, count_method

METHODS = ["full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit"]
SCENARIOS = ["clear", "rainy", "night"]


@pytest.fixture(scope="module")
def probe():
    g = torch.Generator().manual_seed(1)
    return ProbeData(torch.randn(12, 4, 8, 8, generator=g), torch.arange(12) % 3)


@pytest.fixture(scope="module")
def adapted(base, probe):
    """One adapted model per method (tests that train take a deep copy)."""
    return {name: _adapt(base, probe, name) for name in METHODS}


def _adapt(base, probe, name, **kw):
    model = copy.deepcopy(base)
    cfg = MethodConfig(**{"name": name, "scenario_init": "denoise", "init_samples": 2, "init_timesteps": [300, 700], **kw})
    if name == "finediffusion":
        cfg = cfg.model_copy(update={"superclasses": {"day": ["clear", "rainy"], "dark": ["night"]}})
    return apply_method(model, cfg, SCENARIOS, probe)


@pytest.mark.parametrize("name", METHODS)
def test_output_unchanged_at_init(base, adapted, name):
    r = adapted[name]
    model = r.model.eval()
    chosen = [c[0]["class"] for c in r.report["semantic_init"]["choices"].values()]
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(6, 4, 8, 8, generator=g), torch.tensor([0, 10, 200, 500, 800, 999])
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        # scenario s behaves exactly as the base model told the class s was initialised from
        torch.testing.assert_close(model(x, t, y), base(x, t, torch.tensor(chosen)[y]), rtol=0, atol=1e-6)
        # the null row (or each superclass row) is the base null row
        extra = torch.full((6,), 3) if name != "finediffusion" else torch.tensor([3, 4, 3, 4, 3, 4])
        torch.testing.assert_close(model(x, t, extra), base(x, t, torch.full((6,), 10)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_one_step_changes_only_declared_tensors(adapted, name):
    r = copy.deepcopy(adapted[name])
    model = r.model.train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen.isdisjoint(r.trainable) and set(r.trainable) == {n for n, p in model.named_parameters()
                                                                   if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(r.param_groups(1e-2, 0.0))
    diffusion = GaussianDiffusion(linear_betas())
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    loss = diffusion.training_losses(model, x0, torch.tensor([50, 300, 600, 900]),
                                     {"y": torch.tensor([0, 1, 2, 0])}, torch.randn(x0.shape, generator=g))["loss"]
    loss.mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(r.trainable), f"frozen tensors changed: {sorted(changed - set(r.trainable))}"
    assert "pos_embed" not in changed
    # every declared tensor moved, except LoRA's A, whose gradient is zero until B leaves zero
    expected = {n for n in r.trainable if not n.endswith("lora_A")}
    assert changed == expected, f"declared but unchanged: {sorted(expected - changed)}"


def test_declared_sets_per_method(base, adapted):
    names = {m: set(adapted[m].trainable) for m in METHODS}
    D = 64
    assert all(n.endswith("bias") for n in names["bitfit"])
    assert len(names["bitfit"]) == sum(1 for n, _ in base.named_parameters() if n.endswith("bias"))
    assert "pos_embed" not in names["full"] and "blocks.0.mlp.fc1.weight" in names["full"]
    assert {"blocks.0.gamma_attn", "blocks.0.gamma_mlp", "blocks.0.attn.qkv.gamma", "blocks.0.attn.proj.gamma"} \
        <= names["difffit"] and not any(n.startswith("blocks.1.gamma") for n in names["difffit"])
    assert {"blocks.1.norm2.weight", "final_layer.norm_final.bias"} <= names["finediffusion"]
    assert not any("mlp.fc" in n and "mod_" in n for n in names["driveditfit"])  # the FFN is not modulated
    assert {n.rsplit(".", 2)[-2] for n in names["lora"] if "lora_" in n} == {"qkv", "proj"}
    assert base.y_embedder.embedding_table.weight.shape == (11, D)  # the base itself was never touched


def _tiny_formulas(S: int, r: int, G: int) -> dict[str, int]:
    """Closed-form trainable counts of DiT-N/2 (depth 2, D 64, 4 -> 8 channels, patch 2)."""
    L, D, p, Cin, Cout, F = 2, 64, 2, 4, 8, 256
    out_final = p * p * Cout
    lin = {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, F), "fc2": (F, D), "ada": (D, 6 * D)}
    biases = D + (D + D) + L * (3 * D + D + F + D + 6 * D) + out_final + 2 * D  # patch, t-MLP, blocks, final
    mod = lambda i, o: r * (i + o) + 2 * o  # noqa: E731
    modulators = (L * (mod(*lin["qkv"]) + mod(*lin["proj"]) + mod(*lin["ada"])) + mod(256, D) + mod(D, D)
                  + mod(D, out_final) + mod(D, 2 * D))
    weights = Cin * p * p * D + 256 * D + D * D + L * sum(i * o for i, o in lin.values()) + D * out_final + D * 2 * D
    table = (S + 1) * D
    return {
        "full": weights + biases + table,
        "bitfit": biases,
        "difffit": biases + (L // 2) * (3 * D + D + D + D) + table,
        "finediffusion": biases + (2 * L + 1) * 2 * D + (S + G) * D,
        "lora": L * (r * (D + 3 * D) + r * (D + D)) + table,
        "driveditfit": modulators + table,
    }


@pytest.mark.parametrize("name", METHODS)
def test_counts_match_formulas_on_tiny_model(name):
    S, r, G = 7, 3, 2
    cfg = MethodConfig(name=name, **({"rank": r} if name in ("lora", "driveditfit") else {}))
    got = count_method("DiT-N/2", cfg, S, image_size=64, num_superclasses=G if name == "finediffusion" else None)
    assert got["trainable"] == _tiny_formulas(S, r, G)[name]
    assert got["trainable"] == sum(got["groups"].values())


def test_published_counts_on_dit_xl():
    bitfit = count_method("DiT-XL/2", MethodConfig(name="bitfit"), 5)
    assert bitfit["trainable"] == 489_632 and bitfit["groups"] == {"biases": 489_632}
    fit = count_method("DiT-XL/2", MethodConfig(name="driveditfit", rank=4), 5)
    assert fit["trainable"] == 2_372_032 and round(100 * fit["fraction"], 2) == 0.35
    fine = count_method("DiT-XL/2", MethodConfig(name="finediffusion"), 10_000, num_superclasses=11)
    assert fine["trainable"] == 12_153_632 and round(100 * fine["fraction"], 2) == 1.77
    assert fine["groups"] == {"scenario table": 11_532_672, "biases": 489_632, "norms": 131_328}
    difffit = count_method("DiT-XL/2", MethodConfig(name="difffit"), 5)
    assert difffit["trainable"] == 489_632 + 14 * 6 * 1152 + 6 * 1152  # 0.59 M as published


def test_adapters_live_on_the_models_device():
    model = build_dit(dit_config("DiT-N/2", input_size=8), device="meta")
    cfg = MethodConfig(name="finediffusion", scenario_init="random")
    apply_method(model, cfg, SCENARIOS)
    assert all(p.is_meta for p in model.parameters())
    model = build_dit(dit_config("DiT-N/2", input_size=8), device="meta")
    apply_method(model, MethodConfig(name="difffit", scenario_init="random"), SCENARIOS)
    assert all(p.is_meta for p in model.parameters())


def test_param_groups_lr_multiplier_and_decay(base, probe, adapted):
    r = adapted["difffit"]
    groups = {g["name"]: g for g in r.param_groups(1e-4, 0.01)}
    assert set(groups) == {"no_decay"} and groups["no_decay"]["lr"] == pytest.approx(1e-3)  # DiffFit's 10x
    r = _adapt(base, probe, "lora", lr_multiplier=2.0)
    groups = {g["name"]: g for g in r.param_groups(1e-4, 0.01)}
    assert groups["decay"]["weight_decay"] == 0.01 and groups["decay"]["lr"] == pytest.approx(2e-4)
    assert sum(len(g["params"]) for g in groups.values()) == len(r.trainable)
    r = adapted["driveditfit"]
    # multiplicative modulator factors never decay towards zero
    assert [g["name"] for g in r.param_groups(1e-4, 0.01)] == ["no_decay"]


def test_config_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        validate_config(MethodConfig, {"name": "bitfit", "rank": 0, "budget": 0.1, "powers": [1, 2],
                                       "superclasses": {"a": ["x"]}})
    text = str(e.value)
    for needle in ("rank must be >= 1", "budget only applies", "powers needs", "superclasses only applies"):
        assert needle in text
    with pytest.raises(ConfigError, match="unknown field"):
        validate_config(MethodConfig, {"nmae": "lora"})
    resolved = MethodConfig(name="driveditfit").resolve()
    assert resolved.schedule == "linear" and resolved.lr_multiplier == 1.0 and resolved.max_obj_weight == 4.0
    assert MethodConfig(name="difffit").resolve().lr_multiplier == 10.0


def test_bad_inputs_are_named(base, probe):
    with pytest.raises(ValueError, match="distinct"):
        apply_method(copy.deepcopy(base), MethodConfig(name="bitfit"), ["a", "a"], probe)
    with pytest.raises(ValueError, match="needs probe latents"):
        apply_method(copy.deepcopy(base), MethodConfig(name="bitfit", scenario_init="denoise"), SCENARIOS, None)
    with pytest.raises(ValueError, match="does not place these scenarios"):
        apply_method(copy.deepcopy(base), MethodConfig(name="finediffusion", superclasses={"a": ["clear"]}),
                     SCENARIOS, probe)
    few = ProbeData(probe.latents[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no probe latents for scenario 'night'"):
        apply_method(copy.deepcopy(base), MethodConfig(name="bitfit", scenario_init="denoise"), SCENARIOS, few)


def test_train_table_overrides_the_method_default(base, probe):
    """bitfit keeps its published set (table frozen) unless told to train the table; any method can freeze it."""
    table = "y_embedder.embedding_table.weight"
    assert table not in _adapt(base, probe, "bitfit").trainable
    assert table in _adapt(base, probe, "bitfit", train_table=True).trainable
    assert table not in _adapt(base, probe, "lora", train_table=False).trainable
    assert table in _adapt(base, probe, "lora").trainable


def test_random_selection_spends_the_paper_budget(base, probe):
    """select=random: the control for gap selection fills the same budget (the paper set's cost by default)
    with modules drawn by probe_seed: reproducible, another draw for another seed, never over budget."""
    paper = _adapt(base, probe, "driveditfit")
    drawn = [_adapt(base, probe, "driveditfit", select="random", probe_seed=s) for s in (0, 0, 1)]
    assert drawn[0].selected_modules == drawn[1].selected_modules
    assert drawn[0].selected_modules != drawn[2].selected_modules
    budget = paper.counts()["trainable"]
    for r in drawn:
        assert r.report["random_selection"]["budget"] == budget
        assert 0.5 * budget < r.counts()["trainable"] <= budget
    with pytest.raises(ValueError, match="select: random places weight modulators"):
        MethodConfig(name="lora", select="random")
