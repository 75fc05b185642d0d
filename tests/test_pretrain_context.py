"""bench/pretrain_context.py (what made the shipped tiny DiT) at its dry-run size: it trains, scores and
writes the two shipped formats of one model, and its held-out figures, every one measured."""
from __future__ import annotations

import json

import torch

from drivedit.models.checkpoint import load_dit


def test_dry_run_writes_the_shipped_formats_and_its_scores(tmp_path):
    from bench import pretrain_context

    out = tmp_path / "ctx"
    argv = ["--out", str(out), "--dry-run", "--device", "cpu", "--max-images", "224", "--threads", "1"]
    assert pretrain_context.main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps_done"] == result["total_steps"] == 6  # the dry run's max_steps
    assert [c["step"] for c in result["checkpoints"]][-1] == 6
    for row in [result["baseline"], *result["checkpoints"]]:
        assert 0.0 <= row["context_accuracy"] <= 1.0 and row["context_loss"] > 0
    # the official .pt and the safetensors file hold the same DiT-T/4, which the shipped tests would load
    a, b = load_dit(out / "tiny-dit.pt"), load_dit(out / "tiny-dit.safetensors")
    assert (a.config.depth, a.config.hidden_size, a.config.patch_size, a.config.in_channels) == (6, 96, 4, 4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list(out.glob("*.partial"))
    assert (out / "samples.jpg").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    assert "held-out loss in context / baseline" in (out / "table.md").read_text()
