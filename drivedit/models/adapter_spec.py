"""`AdapterSpec` and what follows from it: install its adapters on a DiT, say which tensors train, fold them back.

The layers themselves are in `models/adapter_layers.py`; choosing a method's spec is
`train/method_adapters.apply_method` (the entry point the jobs use).

`AdapterSpec` is the JSON-able description of an adapted model (it travels in `bundle.json`), so
`apply_spec(build_dit(cfg), spec)` rebuilds the exact structure that training used, and
`fold(adapted)` turns it into a plain DiT with the official keys whose output is the same:

- modulators, qkv/proj gammas, LoRA: folded into their Linear (`merged()`);
- DiffFit's branch gammas γ₁, γ₂: x + γ ⊙ gate ⊙ h, and gate is a row block of the adaLN Linear,
  so γ scales the gate rows: W_g ← diag(γ) W_g, b_g ← γ ⊙ b_g;
- FineDiffusion's affine LayerNorm (γ, β) before modulate(·, shift, scale):
      (LN(x) γ + β)(1 + s) + sh = LN(x)(1 + s') + sh'  with
      s'  = γ ⊙ s + γ − 1            → W_sc ← diag(γ) W_sc,            b_sc ← γ ⊙ b_sc + γ − 1
      sh' = sh + β ⊙ (1 + s)         → W_sh ← W_sh + diag(β) W_sc,     b_sh ← b_sh + β + β ⊙ b_sc
  Both s and sh are affine in silu(c), so the fold into the adaLN rows is exact (no division by γ).

Imports torch only.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

from drivedit.models.adapter_layers import (
    LoRALinear,
    ScaledLinear,
    ScenarioEmbedder,
    TieredEmbedder,
    WeightModulatorLinear,
    _SharedLinear,
    affine_layernorm,
)
from drivedit.models.dit import DiT

METHODS = ("full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit")

# adaLN row chunks that each LayerNorm feeds: (shift, scale); blocks have 6 chunks, the final layer 2.
_NORM_CHUNKS = {"norm1": (0, 1), "norm2": (3, 4)}
_GATE_CHUNKS = {"gamma_attn": 2, "gamma_mlp": 5}


def spec_from_dict(cls, d: dict, what: str):
    """A spec dataclass from its to_dict() form; fields this drivedit does not know are an error, not dropped."""
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{what} has unknown fields {sorted(unknown)}; was it written by a newer drivedit?")
    return cls(**d)


@dataclass
class AdapterSpec:
    """Everything needed to rebuild an adapted DiT's structure (not its values)."""

    method: str
    num_scenarios: int
    rank: int = 4
    lora_alpha: float | None = None
    modulated: list[str] = field(default_factory=list)  # Linear names given WeightModulatorLinear
    lora: list[str] = field(default_factory=list)  # Linear names given LoRALinear
    scaled: list[str] = field(default_factory=list)  # Linear names given an output gamma (DiffFit qkv/proj)
    gamma_blocks: list[int] = field(default_factory=list)  # blocks with branch gammas (DiffFit)
    affine_norms: bool = False  # FineDiffusion
    superclass_of: list[int] | None = None  # tiered table (FineDiffusion): superclass id of each class
    train_all: bool = False  # full fine-tuning
    train_biases: bool = False  # BitFit, DiffFit, FineDiffusion
    train_table: bool = True  # the new label table
    layout: dict | None = None  # a layout branch's LayoutSpec (models/control.py) as a dict, or None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterSpec:
        return spec_from_dict(cls, d, "adapter spec")

    @property
    def adapted_modules(self) -> list[str]:
        return sorted(set(self.modulated) | set(self.lora) | set(self.scaled))


# ----------------------------------------------------------------------------- named module sets


def linear_names(model: DiT) -> list[str]:
    """Every Linear of the DiT in forward order (the candidates for modulators)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def paper_modulated(model: DiT) -> list[str]:
    """DriveDiTFit's fixed set: every block's qkv, proj and adaLN; the timestep MLP; the final linear and adaLN."""
    names = ["t_embedder.mlp.0", "t_embedder.mlp.2"]
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj", f"blocks.{i}.adaLN_modulation.1"]
    return names + ["final_layer.linear", "final_layer.adaLN_modulation.1"]


def attention_linears(model: DiT) -> list[str]:
    return [f"blocks.{i}.attn.{k}" for i in range(len(model.blocks)) for k in ("qkv", "proj")]


def modulator_cost(model: DiT, name: str, rank: int) -> int:
    lin = model.get_submodule(name)
    return WeightModulatorLinear.num_new_params(lin.in_features, lin.out_features, rank)


# ----------------------------------------------------------------------------- install


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} does not exist in this DiT; choose from linear_names(model)") from None
    if type(mod) is not nn.Linear:
        raise ValueError(f"module {name!r} is a {type(mod).__name__}, not a plain Linear; adapters go on Linears "
                         "and a Linear takes one adapter")
    return mod


def apply_spec(model: DiT, spec: AdapterSpec) -> DiT:
    """Install the spec's adapters and label table on `model` in place; values are at their identity init.

    The new table is N(0, 0.02) except the null row, which copies the base null row; semantic init
    (drivedit.train.semantic_init) or a bundle's tensors overwrite it.
    """
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(model.y_embedder, (ScenarioEmbedder, TieredEmbedder)):
        raise ValueError("this DiT already carries adapters; apply a spec to a freshly loaded base model")
    D = model.config.hidden_size
    device = model.pos_embed.device if hasattr(model, "pos_embed") else next(model.parameters()).device
    if spec.layout is not None:  # first: controlnet copies the plain base blocks, not the adapted ones
        from drivedit.models.control import LayoutSpec, attach_branch

        attach_branch(model, LayoutSpec.from_dict(spec.layout))
    for name in spec.modulated:
        _set_submodule(model, name, WeightModulatorLinear(_linear(model, name), spec.rank))
    for name in spec.lora:
        _set_submodule(model, name, LoRALinear(_linear(model, name), spec.rank, spec.lora_alpha))
    for name in spec.scaled:
        _set_submodule(model, name, ScaledLinear(_linear(model, name)))
    for i in spec.gamma_blocks:
        if not 0 <= i < len(model.blocks):
            raise ValueError(f"gamma block {i} is out of range for a DiT with {len(model.blocks)} blocks")
        block = model.blocks[i]
        block.gamma_attn = nn.Parameter(torch.ones(D, device=device))
        block.gamma_mlp = nn.Parameter(torch.ones(D, device=device))
    if spec.affine_norms:
        for block in model.blocks:
            block.norm1, block.norm2 = affine_layernorm(block.norm1, device), affine_layernorm(block.norm2, device)
        model.final_layer.norm_final = affine_layernorm(model.final_layer.norm_final, device)

    old = model.y_embedder
    p = model.config.class_dropout_prob
    if spec.superclass_of is not None:
        table = TieredEmbedder(spec.num_scenarios, spec.superclass_of, D, p, device=device)
    else:
        table = ScenarioEmbedder(spec.num_scenarios, D, p, device=device)
    if not table.embedding_table.weight.is_meta:
        with torch.no_grad():
            nn.init.normal_(table.embedding_table.weight, std=0.02)
            if old.dropout_prob > 0:  # the base has a null row: it seeds our null / superclass rows
                null = old.embedding_table.weight[old.num_classes]
                table.embedding_table.weight[spec.num_scenarios:] = null
    model.y_embedder = table
    return model


def is_trainable(name: str, spec: AdapterSpec) -> bool:
    """The method's published trainable set, by parameter name of the adapted model."""
    if name == "pos_embed":  # a fixed sin-cos table in every DiT, frozen even under full fine-tuning
        return False
    if spec.train_all or name.startswith("layout_branch."):
        return True
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("y_embedder."):
        return spec.train_table
    if leaf.startswith(("mod_", "lora_")) or leaf in ("gamma", "gamma_attn", "gamma_mlp"):
        return True
    parts = name.split(".")
    if spec.affine_norms and len(parts) >= 2 and parts[-2].startswith("norm"):
        return True
    return spec.train_biases and leaf == "bias"


def trainable_names(model: nn.Module, spec: AdapterSpec) -> list[str]:
    return [n for n, _ in model.named_parameters() if is_trainable(n, spec)]


def saved_names(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """What a bundle stores: the trainable tensors plus the label table (trained or not, it is new)."""
    names = trainable_names(model, spec)
    return names + [n for n, _ in model.named_parameters() if n.startswith("y_embedder.") and n not in names]


# ----------------------------------------------------------------------------- fold


@torch.no_grad()
def _fold_gate(lin: nn.Linear, chunk: int, gamma: torch.Tensor) -> None:
    D = gamma.shape[0]
    rows = slice(chunk * D, (chunk + 1) * D)
    g = gamma.double()
    lin.weight[rows] = (lin.weight[rows].double() * g[:, None]).to(lin.weight.dtype)
    lin.bias[rows] = (lin.bias[rows].double() * g).to(lin.bias.dtype)


@torch.no_grad()
def _fold_norm(lin: nn.Linear, shift_chunk: int, scale_chunk: int, norm: nn.LayerNorm) -> None:
    D = norm.weight.shape[0]
    sh, sc = slice(shift_chunk * D, (shift_chunk + 1) * D), slice(scale_chunk * D, (scale_chunk + 1) * D)
    g, b = norm.weight.double(), norm.bias.double()
    W, B = lin.weight.double(), lin.bias.double()
    W_sh = W[sh] + b[:, None] * W[sc]
    B_sh = B[sh] + b + b * B[sc]
    W_sc = g[:, None] * W[sc]
    B_sc = g * B[sc] + g - 1
    lin.weight[sh], lin.bias[sh] = W_sh.to(lin.weight.dtype), B_sh.to(lin.bias.dtype)
    lin.weight[sc], lin.bias[sc] = W_sc.to(lin.weight.dtype), B_sc.to(lin.bias.dtype)


def _plain_norm(norm: nn.LayerNorm) -> nn.LayerNorm:
    return nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)


def merged_config(model: DiT, spec: AdapterSpec):
    """The plain DiT config of a folded model: its label table is the scenario table.

    A tiered table has K + G rows and no null row; declaring num_classes = K + G - 1 gives the official
    layout (num_classes + 1 rows) so the merged model loads anywhere, its "null" row being the last superclass.
    """
    if spec.superclass_of is not None:
        rows = spec.num_scenarios + max(spec.superclass_of) + 1
        return replace(model.config, num_classes=rows - int(model.config.class_dropout_prob > 0))
    return replace(model.config, num_classes=spec.num_scenarios)


def fold(adapted: DiT, spec: AdapterSpec) -> DiT:
    """A plain DiT (official keys, strict load) computing what the adapted model computes."""
    if spec.layout is not None:
        raise ValueError(f"this model has a {spec.layout['kind']} layout branch, which no plain DiT (official "
                         ".pt or diffusers DiTTransformer2DModel) can hold: merging would drop it. Use the adapter "
                         "bundle itself with drivedit generate / serve")
    work = copy.deepcopy(adapted).cpu()
    for name, mod in list(work.named_modules()):
        if isinstance(mod, _SharedLinear):
            _set_submodule(work, name, mod.merged())
    for block in work.blocks:
        ada = block.adaLN_modulation[1]
        for attr, chunk in _GATE_CHUNKS.items():
            gamma = block._parameters.pop(attr, None)
            if gamma is not None:
                _fold_gate(ada, chunk, gamma)
        for attr, (sh, sc) in _NORM_CHUNKS.items():
            norm = getattr(block, attr)
            if norm.elementwise_affine:
                _fold_norm(ada, sh, sc, norm)
                setattr(block, attr, _plain_norm(norm))
    final = work.final_layer
    if final.norm_final.elementwise_affine:
        _fold_norm(final.adaLN_modulation[1], 0, 1, final.norm_final)
        final.norm_final = _plain_norm(final.norm_final)

    from drivedit.models.checkpoint import build_from_state  # diffusers-heavy import, only when merging

    # a strict, allocation-free build from the folded tensors: exactly the official keys, nothing else
    plain = build_from_state(work.state_dict(), merged_config(adapted, spec), source="merged adapter")
    if spec.superclass_of is not None:
        tiered = TieredEmbedder(spec.num_scenarios, spec.superclass_of, plain.config.hidden_size,
                                plain.config.class_dropout_prob)
        tiered.embedding_table = plain.y_embedder.embedding_table
        plain.y_embedder = tiered
    return plain.to(next(adapted.parameters()).device).train(adapted.training)
