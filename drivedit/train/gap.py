"""Per-module source/target gap of a frozen DiT, and modulator placement under a parameter budget.

The measure: a normalized distance between per-channel activation statistics of each Linear's
output on target (driving) inputs and on source inputs, at fixed timesteps with fixed noise.
For module m, timestep t and output channel c, with mean μ and std σ over all tokens and items:

    d_c = |μ_T − μ_S| / sqrt((σ_T² + σ_S²) / 2 + ε²)  +  |log((σ_T + ε) / (σ_S + ε))|
    gap(m) = mean over t and c of d_c

i.e. a standardized mean shift plus a log scale ratio: 0 when the target activations look like
the source ones, invariant to each channel's scale, so a 6·D adaLN and a D-wide projection
compare on one footing. A module whose activations leave the source distribution the most is
the one whose frozen weights are least suited to the target; that is where a modulator goes.
ε is 1e-3 of the module's RMS activation, so constant channels (the timestep MLP under equal t)
give 0, not noise.

Source inputs: `ProbeData.source_latents` (with `source_labels`, else the null label) when the
user has them; otherwise the pretrained model's own class-conditional samples (DDIM, random
source classes), which is what the model believes its source domain to be. Target labels are the
classes the scenario embeddings start from (semantic init) or the null label.

Condition-path modules (timestep MLP, adaLN) output one vector per item and see only (t, label):
within one pass t is fixed, so their spread on each side only counts how many distinct labels
that side uses (the target often one), which says nothing about the domains. For them the log
scale term is dropped and the gap is the standardized mean shift alone: how atypical the target
condition is of the source conditions.

Selection: modules in decreasing gap, each added if its modulator cost still fits the budget.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drivedit import storage
from drivedit.models.diffusion import GaussianDiffusion, linear_betas

EPS = 1e-3  # relative to each module's RMS activation
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass
class ProbeData:
    """A few hundred target frames (and optionally source frames) for gap measurement and semantic init.

    latents: (N, C, h, w) target latents (already scaled); scenarios: (N,) scenario ids;
    source_latents: (M, C, h, w) or None; source_labels: (M,) source class ids or None.
    """

    latents: torch.Tensor
    scenarios: torch.Tensor
    source_latents: torch.Tensor | None = None
    source_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.latents.ndim != 4:
            problems.append(f"latents must be (N, C, h, w), got {tuple(self.latents.shape)}")
        if self.scenarios.shape != (len(self.latents),):
            problems.append(f"scenarios must be ({len(self.latents)},), got {tuple(self.scenarios.shape)}")
        if self.source_latents is not None:
            if self.source_latents.ndim != 4 or self.source_latents.shape[1:] != self.latents.shape[1:]:
                problems.append(f"source_latents {tuple(self.source_latents.shape)} must match the target latents' "
                                f"(C, h, w) {tuple(self.latents.shape[1:])}")
            if self.source_labels is not None and self.source_labels.shape != (len(self.source_latents),):
                problems.append("source_labels needs one label per source latent")
        elif self.source_labels is not None:
            problems.append("source_labels given without source_latents")
        if problems:
            raise ValueError("invalid probe data: " + "; ".join(problems))

    def of_scenario(self, s: int, limit: int | None = None) -> torch.Tensor:
        lat = self.latents[self.scenarios == s]
        return lat if limit is None else lat[:limit]


class _Stats:
    """Running per-channel sum and sum of squares of module outputs, one slot per timestep."""

    def __init__(self):
        self.sum: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self.tokens: dict[str, bool] = {}  # (N, T, d) token path, or (N, d) condition path

    def add(self, key: str, out: torch.Tensor) -> None:
        # float64 sums: E[x^2] - E[x]^2 in float32 leaves a spurious std on constant channels
        flat = out.detach().double().reshape(-1, out.shape[-1])  # (tokens, d)
        if key not in self.sum:
            self.sum[key], self.sq[key], self.n[key] = 0.0, 0.0, 0
        self.sum[key] = self.sum[key] + flat.sum(0)
        self.sq[key] = self.sq[key] + (flat * flat).sum(0)
        self.n[key] += flat.shape[0]
        self.tokens[key] = out.ndim == 3

    def mean_std(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum[key] / self.n[key]
        var = (self.sq[key] / self.n[key] - mean * mean).clamp(min=0)
        return mean, var.sqrt()


@torch.no_grad()
def _collect(model, modules: list[str], latents: torch.Tensor, labels: torch.Tensor, timesteps: list[int],
             seed: int, batch_size: int) -> dict[int, _Stats]:
    device = next(model.parameters()).device
    diffusion = GaussianDiffusion(linear_betas())
    stats = {t: _Stats() for t in timesteps}
    current: dict[str, int] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, inp, out, name=name: stats[current["t"]].add(name, out)) for name in modules]
    try:
        for t in timesteps:
            gen = torch.Generator().manual_seed(seed + t)
            current["t"] = t
            for i in range(0, len(latents), batch_size):
                x0 = latents[i:i + batch_size].float()
                noise = torch.randn(x0.shape, generator=gen)
                tt = torch.full((len(x0),), t, dtype=torch.long)
                x_t = diffusion.q_sample(x0, tt, noise).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    model(x_t, tt.to(device), labels[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return stats


def module_gaps(model, modules: list[str], target: torch.Tensor, target_labels: torch.Tensor,
                source: torch.Tensor, source_labels: torch.Tensor, timesteps: list[int], seed: int = 0,
                batch_size: int = 64) -> dict[str, float]:
    """gap(m) for every named module (see the module doc); the model is run in eval mode, unchanged."""
    was_training = model.training
    model.eval()
    try:
        st = _collect(model, modules, target, target_labels, timesteps, seed, batch_size)
        ss = _collect(model, modules, source, source_labels, timesteps, seed, batch_size)
    finally:
        model.train(was_training)
    gaps = {}
    for name in modules:
        per_t = []
        for t in timesteps:
            mt, vt = st[t].mean_std(name)
            ms, vs = ss[t].mean_std(name)
            # epsilon relative to the module's activation scale, so tiny and huge modules compare alike
            eps = EPS * torch.sqrt((mt**2 + vt**2 + ms**2 + vs**2).mean() / 2) + 1e-12
            shift = (mt - ms).abs() / torch.sqrt((vt**2 + vs**2) / 2 + eps**2)
            scale = torch.log((vt + eps) / (vs + eps)).abs() if st[t].tokens[name] else 0.0
            per_t.append((shift + scale).mean().item())
        gaps[name] = float(np.mean(per_t))
    return gaps


def sample_source(model, num: int, steps: int, guidance: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's own class-conditional samples over random source classes: (num, C, h, w), (num,)."""
    from drivedit.generate.sampler import DiTSampler, SamplerSettings

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, model.y_embedder.num_classes, (num,), generator=gen)
    device = next(model.parameters()).device
    was_training = model.training
    try:
        sampler = DiTSampler(model, device=device)
        settings = SamplerSettings(sampler="ddim", steps=steps, guidance=guidance)
        lat = sampler.sample(labels, [seed + i for i in range(num)], settings).cpu()
    finally:
        model.train(was_training)
    return lat, labels


def select_by_gap(gaps: dict[str, float], costs: dict[str, int], budget: int) -> tuple[list[str], int]:
    """Greedy: largest gap first, add each module whose cost still fits. Returns (selected, spent)."""
    selected, spent = [], 0
    for name in sorted(gaps, key=lambda n: (-gaps[n], n)):
        if spent + costs[name] <= budget:
            selected.append(name)
            spent += costs[name]
    return selected, spent


def split_name(name: str) -> tuple[str, str]:
    """'blocks.3.attn.qkv' -> ('3', 'attn.qkv'); 'final_layer.linear' -> ('final', 'linear')."""
    m = _BLOCK.match(name)
    if m:
        return m.group(1), m.group(2)
    head, _, rest = name.partition(".")
    return {"t_embedder": "t_emb", "final_layer": "final"}.get(head, head), rest


def gap_report(gaps: dict[str, float], costs: dict[str, int], selected: list[str], budget: int, spent: int,
               source: str, timesteps: list[int]) -> dict:
    chosen = set(selected)
    rows = []
    for name, g in gaps.items():
        block, module = split_name(name)
        rows.append({"name": name, "block": block, "module": module, "gap": g, "cost": costs[name],
                     "selected": name in chosen})
    return {"measure": "per-channel standardized mean shift + |log std ratio| of module outputs, "
                       "averaged over channels and timesteps",
            "source": source, "timesteps": list(timesteps), "budget": int(budget), "spent": int(spent),
            "selected": list(selected), "modules": rows}


def write_gap_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """gap_report.json and gap_report.png: bars per block, one colour per module kind; modulated ones solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "gap_report.json", out / "gap_report.png"
    storage.write_text_atomic(str(json_path), json.dumps(report, indent=2))

    rows = report["modules"]
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    kinds = list(dict.fromkeys(r["module"] for r in rows))
    width = 0.8 / max(len(kinds), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(blocks) * max(len(kinds), 1) / 2), 4.5))
    colors = plt.get_cmap("tab10")
    for j, kind in enumerate(kinds):
        for r in (r for r in rows if r["module"] == kind):
            x = blocks.index(r["block"]) + (j - (len(kinds) - 1) / 2) * width
            ax.bar(x, r["gap"], width, color=colors(j % 10), alpha=1.0 if r["selected"] else 0.3,
                   edgecolor="black" if r["selected"] else "none", label=kind)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xticks(range(len(blocks)), blocks, fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("gap")
    ax.set_title(f"source/target gap per module (solid, outlined = modulated; {report['spent']:,} of "
                 f"{report['budget']:,} params)", fontsize=9)
    fig.tight_layout()
    with storage.atomic_local_file(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return json_path, png_path
