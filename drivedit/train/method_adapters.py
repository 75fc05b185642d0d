"""Method name -> its adapters installed and its trainable subset chosen: `apply_method` is the entry point.

Methods: full, bitfit, difffit, finediffusion, lora, driveditfit. The adapter layers are in
`models/adapter_layers.py`, the spec that installs and folds them in `models/adapter_spec.py`.

Published trainable sets (reference/methods.md), every one starting as the base model's function:
- full: every parameter except the fixed sin-cos `pos_embed`.
- bitfit: every bias; the scenario table stays at its semantic init (0.490 M on DiT-XL/2, the
  published count, has no table in it).
- difffit: biases, gammas (init 1) on qkv, proj and both residual branches of the first half of
  the blocks (MinimaxDiffusion's placement), norms (none are affine in DiT), the scenario table;
  lr x10.
- finediffusion: affine LayerNorms (init 1/0), biases, a tiered table (scenarios + superclasses).
- lora: LoRA of rank r on every block's qkv and proj, the scenario table.
- driveditfit: weight modulators on the paper set (or the gap-selected set), the scenario table.

Every method replaces the class table with a scenario table whose rows start at the source classes
chosen by semantic init (and whose null / superclass rows start at the base null row).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from drivedit.config.method import METHOD_DEFAULTS, MethodConfig
from drivedit.models.adapter_spec import (
    AdapterSpec,
    apply_spec,
    attention_linears,
    linear_names,
    modulator_cost,
    paper_modulated,
    trainable_names,
)
from drivedit.models.adapter_layers import init_rows
from drivedit.models.dit import DiT, build_dit, dit_config
from drivedit.train import gap as gap_mod
from drivedit.train import semantic_init
from drivedit.train.gap import ProbeData

# multiplicative parameters: zero is not their identity, so weight decay must not pull them there
_NO_DECAY_LEAVES = ("mod_A", "mod_B", "mod_m", "mod_a", "gamma", "gamma_attn", "gamma_mlp")


@dataclass
class MethodResult:
    """The adapted model (changed in place) and everything the trainer and the bundle need."""

    model: DiT
    method: MethodConfig
    spec: AdapterSpec
    trainable: dict[str, nn.Parameter]
    selected_modules: list[str]
    scenarios: list[str]
    superclass_names: list[str] | None = None
    report: dict = field(default_factory=dict)

    @property
    def lr_multiplier(self) -> float:
        return float(self.method.lr_multiplier)

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices decay; biases, norms, gammas, modulator factors and tables do not."""
        decay, no_decay = [], []
        for name, p in self.trainable.items():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf not in _NO_DECAY_LEAVES and not name.startswith("y_embedder."):
                decay.append(p)
            else:
                no_decay.append(p)
        lr = base_lr * self.lr_multiplier
        groups = [{"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def counts(self) -> dict:
        return count_groups(self.model, self.trainable)


def _group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    parts = name.split(".")
    if name.startswith("layout_branch."):
        return "layout branch"
    if name.startswith("y_embedder."):
        return "scenario table"
    if leaf.startswith("mod_"):
        return "modulators"
    if leaf.startswith("lora_"):
        return "lora"
    if leaf.startswith("gamma"):
        return "gammas"
    if len(parts) >= 2 and parts[-2].startswith("norm"):
        return "norms"
    if leaf == "bias":
        return "biases"
    return "weights"


def count_groups(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict:
    groups: dict[str, int] = {}
    for name, p in trainable.items():
        groups[_group(name)] = groups.get(_group(name), 0) + p.numel()
    total = sum(p.numel() for p in model.parameters())
    n = sum(groups.values())
    return {"groups": groups, "trainable": n, "total": total, "fraction": n / total}


def _table_rows(superclass_of: list[int] | None, num_scenarios: int, has_null: bool) -> int:
    if superclass_of is not None:
        return num_scenarios + max(superclass_of) + 1
    return num_scenarios + int(has_null)


def layout_spec(section, num_blocks: int, box_categories: list[str], segmentation_classes: list[str]):
    """The LayoutSpec of a config's `layout` section (LayoutSection) for a DiT of `num_blocks` blocks and
    shards with these vocabularies, or None for kind none."""
    from drivedit.models.control import LayoutSpec

    if section is None or section.kind == "none":
        return None
    return LayoutSpec(kind=section.kind, depth=section.resolved_depth(num_blocks), box_categories=list(box_categories),
                      segmentation_classes=list(segmentation_classes) if section.use_segmentation else [],
                      width=section.width, drop_prob=section.drop_prob)


def build_spec(model: DiT, method: MethodConfig, num_scenarios: int, superclass_of: list[int] | None = None,
               modulated: list[str] | None = None, layout=None) -> AdapterSpec:
    """The AdapterSpec of a (resolved) method on this DiT; `modulated` overrides driveditfit's paper set;
    `layout` (a LayoutSpec) adds a layout branch."""
    name = method.name
    spec = AdapterSpec(method=name, num_scenarios=num_scenarios, rank=method.rank, lora_alpha=method.lora_alpha,
                       layout=layout.to_dict() if layout is not None else None)
    if name == "full":
        spec.train_all = True
    elif name == "bitfit":
        spec.train_biases = True
    elif name == "difffit":
        n = len(model.blocks) // 2 if method.difffit_blocks is None else min(method.difffit_blocks, len(model.blocks))
        spec.train_biases = True
        spec.gamma_blocks = list(range(n))
        spec.scaled = [f"blocks.{i}.attn.{k}" for i in range(n) for k in ("qkv", "proj")]
    elif name == "finediffusion":
        spec.train_biases, spec.affine_norms = True, True
        spec.superclass_of = list(superclass_of) if superclass_of is not None else [0] * num_scenarios
    elif name == "lora":
        spec.lora = attention_linears(model)
    elif name == "driveditfit":
        spec.modulated = list(modulated) if modulated is not None else paper_modulated(model)
    spec.train_table = (method.train_table if method.train_table is not None
                        else METHOD_DEFAULTS[name]["train_table"])
    return spec


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _semantic_choice(model: DiT, method: MethodConfig, scenarios: list[str], probe: ProbeData | None,
                     class_names: list[str] | None):
    if method.scenario_init == "random":
        return None
    if method.scenario_init == "text":
        return semantic_init.choose_by_text(scenarios, class_names, method.top_k)
    if method.scenario_init == "name":
        return semantic_init.choose_by_name(scenarios, class_names)
    if probe is None:
        raise ValueError("method.scenario_init 'denoise' needs probe latents (ProbeData); pass them, or set "
                         "method.scenario_init to text or random")
    lat = [probe.of_scenario(i, method.init_samples) for i in range(len(scenarios))]
    return semantic_init.choose_by_denoising(model, lat, scenarios, model.y_embedder.num_classes,
                                             method.init_timesteps, method.top_k, method.probe_seed)


def budget_params(method: MethodConfig, model: DiT, table_params: int) -> int:
    """The gap budget as a count of trainable parameters (table included); default: the paper set's cost."""
    if method.budget is None:
        return table_params + sum(modulator_cost(model, n, method.rank) for n in paper_modulated(model))
    if method.budget <= 1:
        return int(method.budget * sum(p.numel() for p in model.parameters()))
    return int(method.budget)


def _gap_selection(model: DiT, method: MethodConfig, probe: ProbeData | None, choice, table_params: int):
    if probe is None:
        raise ValueError("method.select 'gap' needs probe latents (ProbeData) of the target data; pass them, or "
                         "set method.select to paper")
    candidates = linear_names(model)
    costs = {n: modulator_cost(model, n, method.rank) for n in candidates}
    budget = budget_params(method, model, table_params)
    if budget - table_params < min(costs.values()):
        raise ValueError(f"method.budget ({budget:,} parameters) does not cover the scenario table "
                         f"({table_params:,}) plus the cheapest modulator ({min(costs.values()):,}); raise it")
    null = model.y_embedder.num_classes if model.y_embedder.dropout_prob > 0 else 0
    # the target condition: the class each scenario's embedding starts from
    first = [rows[0] for rows in choice.rows] if choice is not None else [null] * (int(probe.scenarios.max()) + 1)
    target_labels = torch.tensor(first)[probe.scenarios.long()]
    if probe.source_latents is not None:
        src = probe.source_latents
        src_labels = probe.source_labels if probe.source_labels is not None else torch.full((len(src),), null)
        source = "given source latents"
    else:
        src, src_labels = gap_mod.sample_source(model, method.source_samples, method.source_steps,
                                                method.source_guidance, method.probe_seed)
        source = f"{method.source_samples} class-conditional samples of the base model ({method.source_steps} DDIM steps)"
    gaps = gap_mod.module_gaps(model, candidates, probe.latents, target_labels, src, src_labels.long(),
                               method.gap_timesteps, method.probe_seed)
    selected, spent = gap_mod.select_by_gap(gaps, costs, budget - table_params)
    report = gap_mod.gap_report(gaps, costs, selected, budget, spent + table_params, source, method.gap_timesteps)
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(selected, key=order.__getitem__), report


def _random_selection(model: DiT, method: MethodConfig, table_params: int) -> tuple[list[str], dict]:
    """Modules drawn at random (seed probe_seed) until the gap budget is spent, by the same greedy fill as
    gap selection with random scores in place of gaps: the control that says whether measuring helps."""
    candidates = linear_names(model)
    costs = {n: modulator_cost(model, n, method.rank) for n in candidates}
    budget = budget_params(method, model, table_params)
    g = torch.Generator().manual_seed(method.probe_seed)
    scores = dict(zip(candidates, torch.rand(len(candidates), generator=g).tolist()))
    selected, spent = gap_mod.select_by_gap(scores, costs, budget - table_params)
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(selected, key=order.__getitem__), {"budget": budget, "spent": spent + table_params,
                                                     "seed": method.probe_seed, "selected": sorted(selected)}


def apply_method(model: DiT, method: MethodConfig, scenarios: list[str], probe: ProbeData | None = None,
                 class_names: list[str] | None = None, layout=None) -> MethodResult:
    """Adapt `model` (a freshly loaded base DiT, changed in place) for `scenarios` with `method`.

    class_names: names of the base model's classes for reports and `text` init (default: ImageNet's for a
    1000-class model). probe: target latents for `denoise` init and `gap` selection.
    """
    if not scenarios or len(set(scenarios)) != len(scenarios):
        raise ValueError(f"scenarios must be a non-empty list of distinct names, got {scenarios}")
    if probe is not None and len(probe.scenarios) and int(probe.scenarios.max()) >= len(scenarios):
        raise ValueError(f"probe scenario ids go up to {int(probe.scenarios.max())} but there are only "
                         f"{len(scenarios)} scenarios")
    method = method.resolve()
    _freeze(model)
    names = semantic_init.source_class_names(model.y_embedder.num_classes, class_names) \
        if method.scenario_init != "random" or class_names is not None else None
    if method.scenario_init == "auto":  # the resolved choice is what the run records
        method = method.model_copy(update={"scenario_init": "text" if names is not None else "random"})
    choice = _semantic_choice(model, method, scenarios, probe, names)
    report: dict = {}
    if choice is not None:
        report["semantic_init"] = choice.report(scenarios, names)

    superclass_of, superclass_names = None, None
    if method.name == "finediffusion":
        superclass_of, superclass_names = method.superclass_ids(scenarios)
    D = model.config.hidden_size
    table_params = _table_rows(superclass_of, len(scenarios), model.config.class_dropout_prob > 0) * D
    modulated = None
    if method.name == "driveditfit" and method.select == "gap":
        modulated, report["gap"] = _gap_selection(model, method, probe, choice, table_params)
    elif method.name == "driveditfit" and method.select == "random":
        modulated, report["random_selection"] = _random_selection(model, method, table_params)

    source_table = model.y_embedder.embedding_table.weight.detach().clone()
    spec = build_spec(model, method, len(scenarios), superclass_of, modulated, layout)
    apply_spec(model, spec)
    if choice is not None:
        init_rows(model.y_embedder.embedding_table.weight, source_table, choice.rows)
    trainable = {}
    wanted = set(trainable_names(model, spec))
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            trainable[name] = p
    selected = spec.adapted_modules if method.name != "driveditfit" else list(spec.modulated)
    result = MethodResult(model=model, method=method, spec=spec, trainable=trainable, selected_modules=selected,
                          scenarios=list(scenarios), superclass_names=superclass_names, report=report)
    report["counts"] = result.counts()
    return result


def count_method(model_name: str, method: MethodConfig, num_scenarios: int, image_size: int = 256,
                 num_superclasses: int | None = None, base_num_classes: int = 1000, latent_factor: int = 8,
                 in_channels: int = 4, layout=None) -> dict:
    """Trainable parameters per group, total and fraction, on the meta device (no weights allocated).

    select=gap is counted as its budget's default, the paper set; the real gap selection needs data.
    layout: a LayoutSpec; its branch is counted in the groups, and its parameters and MACs beside the DiT's.
    """
    if image_size % latent_factor:
        raise ValueError(f"image size {image_size} is not a multiple of the codec factor {latent_factor}")
    cfg = dit_config(model_name, input_size=image_size // latent_factor, num_classes=base_num_classes,
                     in_channels=in_channels)
    model = build_dit(cfg, device="meta")
    m = method.model_copy(update={"scenario_init": "random", "select": "paper", "budget": None})
    scenarios = [f"scenario {i}" for i in range(num_scenarios)]
    if method.name == "finediffusion" and num_superclasses is not None:
        if not 1 <= num_superclasses <= num_scenarios:
            raise ValueError(f"superclasses must be between 1 and the number of classes ({num_scenarios})")
        groups: dict[str, list[str]] = {f"super {g}": [] for g in range(num_superclasses)}
        for i, s in enumerate(scenarios):
            groups[f"super {i % num_superclasses}"].append(s)
        m = m.model_copy(update={"superclasses": groups})
    result = apply_method(model, m, scenarios, layout=layout)
    out = {"model": model_name, "image_size": image_size, "method": method.name, "num_scenarios": num_scenarios}
    out.update(result.counts())
    if layout is not None:
        from drivedit.models.control import branch_cost

        out["layout"] = branch_cost(cfg, layout)
    if method.name in ("driveditfit", "lora"):
        out["rank"] = method.rank
    if result.superclass_names is not None:
        out["num_superclasses"] = len(result.superclass_names)
    out["adapted_modules"] = len(result.selected_modules)
    return out
