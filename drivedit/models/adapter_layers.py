"""The adapter layers that fine-tuning methods install on a frozen DiT (layers only).

Where the adapter code lives: these layers; `models/adapter_spec.py` installs a spec's layers on a DiT
and folds them back; `train/method_adapters.py` turns a method name into a spec and its trainable
set (`apply_method`: the one entry point); `train/adapt_ranks.py` does that identically on every rank.

Every Linear adapter is an `nn.Linear` subclass that *shares* the frozen `weight` / `bias`
Parameters of the Linear it replaces, so the official state-dict keys (`blocks.3.attn.qkv.weight`)
stay where they are and a base checkpoint still loads into the adapted model; only new keys
(`blocks.3.attn.qkv.mod_A`) appear. Each adapter starts as the identity and can fold itself back
into a plain `nn.Linear` (`merged()`), which is what `drivedit.models.bundle.merge` relies on.

- `WeightModulatorLinear` (DriveDiTFit): W' = W ⊙ (B Aᵀ), b' = b ⊙ m + a.
- `ScaledLinear` (DiffFit, MinimaxDiffusion placement): y = γ ⊙ (x Wᵀ + b).
- `LoRALinear`: W' = W + (α / r) B A. Ours rather than peft's: peft wraps the Linear as
  `qkv.base_layer`, renaming the official keys, and it has no fold for the other adapters here.
- `affine_layernorm`: FineDiffusion's LayerNorms with γ = 1, β = 0.
- `ScenarioEmbedder` / `TieredEmbedder`: the new label tables.

Imports torch only: no Ray, no MLflow, no pydantic.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from drivedit.models.dit import LabelEmbedder


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class _SharedLinear(nn.Linear):
    """An nn.Linear that adopts another Linear's Parameters instead of allocating its own.

    Subclasses add their adapter tensors and a `merged()` that folds them into a plain nn.Linear.
    """

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias


class WeightModulatorLinear(_SharedLinear):
    """DriveDiTFit's low-rank Hadamard modulation of a frozen Linear.

    A (d_in, r) and B (d_out, r) start at 1/sqrt(r), so B Aᵀ is all ones; m starts at 1 and a at 0,
    so the layer is exactly the frozen one at init. r (d_in + d_out) + 2 d_out new parameters.
    """

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"modulator rank must be >= 1, got {rank}")
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.rank = rank
        init = 1.0 / math.sqrt(rank)
        self.mod_A = nn.Parameter(torch.full((self.in_features, rank), init, **kw))
        self.mod_B = nn.Parameter(torch.full((self.out_features, rank), init, **kw))
        self.mod_m = nn.Parameter(torch.ones(self.out_features, **kw))
        self.mod_a = nn.Parameter(torch.zeros(self.out_features, **kw))

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight * (self.mod_B @ self.mod_A.T)  # (d_out, d_in)
        b = None if self.bias is None else self.bias * self.mod_m + self.mod_a
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.effective()
        return F.linear(x, w, b if b is not None else self.mod_a)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = (self.weight.double() * (self.mod_B.double() @ self.mod_A.double().T)).to(self.weight.dtype)
            if self.bias is None:
                return _plain_linear(w, self.mod_a)
            b = (self.bias.double() * self.mod_m.double() + self.mod_a.double()).to(self.bias.dtype)
            return _plain_linear(w, b)

    @staticmethod
    def num_new_params(d_in: int, d_out: int, rank: int) -> int:
        return rank * (d_in + d_out) + 2 * d_out


class ScaledLinear(_SharedLinear):
    """y = γ ⊙ (x Wᵀ + b), γ (d_out,) initialised to 1: DiffFit's scale on qkv and proj."""

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        self.gamma = nn.Parameter(torch.ones(self.out_features, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.gamma  # (..., d_out)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            g = self.gamma.double()
            w = (self.weight.double() * g[:, None]).to(self.weight.dtype)
            b = None if self.bias is None else (self.bias.double() * g).to(self.bias.dtype)
            return _plain_linear(w, b)


class LoRALinear(_SharedLinear):
    """W' = W + (alpha / r) B A with A (r, d_in) Kaiming-uniform and B (d_out, r) zero, so identity at init."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft / the LoRA paper's code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in); the low-rank path never materialises the d_out x d_in update
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.double() @ self.lora_A.double())  # (d_out, d_in)
            return _plain_linear((self.weight.double() + delta).to(self.weight.dtype), self.bias)


def affine_layernorm(norm: nn.LayerNorm, device=None) -> nn.LayerNorm:
    """The same LayerNorm with elementwise affine γ = 1, β = 0 (FineDiffusion), so identity at init.

    device: where the new γ, β live (the model's device; an affine-free norm has no tensor to tell).
    """
    (dim,) = norm.normalized_shape
    new = nn.LayerNorm(dim, eps=norm.eps, elementwise_affine=True, device=device)
    if not new.weight.is_meta:
        with torch.no_grad():
            new.weight.fill_(1.0)
            new.bias.zero_()
    return new


# ----------------------------------------------------------------------------- label tables


class ScenarioEmbedder(LabelEmbedder):
    """A new table of S scenario rows plus the null row S (last), replacing the class table.

    Same keys and behaviour as the DiT's LabelEmbedder with num_classes = S, so a merged model is
    a plain DiT. Rows are filled by semantic init (`init_rows`); the null row by the base's null row.
    """

    def __init__(self, num_scenarios: int, hidden_size: int, dropout_prob: float, device=None):
        nn.Module.__init__(self)
        if num_scenarios < 1:
            raise ValueError("a scenario table needs at least one scenario")
        # a null row exactly when the base has one (label dropout > 0), as the DiT's own table
        self.embedding_table = nn.Embedding(num_scenarios + int(dropout_prob > 0), hidden_size, device=device)
        self.num_classes = num_scenarios
        self.dropout_prob = dropout_prob


class TieredEmbedder(LabelEmbedder):
    """FineDiffusion's tiered table: K class rows then G superclass rows, no null row.

    Label dropout replaces a label by its superclass row (K + g), so the superclass rows learn the
    "unconditional within the superclass" model that superclass guidance contrasts against.
    """

    def __init__(self, num_classes: int, superclass_of: list[int], hidden_size: int, dropout_prob: float, device=None):
        nn.Module.__init__(self)
        if len(superclass_of) != num_classes:
            raise ValueError(f"superclass_of has {len(superclass_of)} entries for {num_classes} classes")
        num_super = max(superclass_of) + 1 if superclass_of else 0
        if num_super < 1 or min(superclass_of) < 0:
            raise ValueError("superclass ids must be 0..G-1 with G >= 1")
        self.embedding_table = nn.Embedding(num_classes + num_super, hidden_size, device=device)
        self.num_classes = num_classes
        self.num_superclasses = num_super
        self.dropout_prob = dropout_prob
        self.register_buffer("super_of", torch.tensor(superclass_of, dtype=torch.long, device=device), persistent=False)

    @property
    def null_label(self) -> int:
        raise ValueError("a tiered (FineDiffusion) embedder has no null row: guide with superclass_of(labels) "
                         "instead of the null label")

    def superclass_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Table row of each label's superclass: (N,) class ids -> (N,) ids in [K, K + G)."""
        # checked where labels are still on the host (the callers' inputs); on a GPU (every training step's
        # label dropout) reading min/max would stall the host, and an out-of-range index fails there anyway
        if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        return self.num_classes + self.super_of.to(labels.device)[labels]

    def drop_target(self, labels: torch.Tensor) -> torch.Tensor:
        return self.superclass_of(labels)


def init_rows(table: torch.Tensor, source: torch.Tensor, rows: list[list[int]]) -> None:
    """table[i] = mean of source[rows[i]] for each i: the semantic init of a new label table."""
    with torch.no_grad():
        for i, picked in enumerate(rows):
            table[i].copy_(source[picked].mean(0))
