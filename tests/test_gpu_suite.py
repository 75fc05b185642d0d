"""The GPU suite (bench/gpu_suite.py) and the speed work it checks: fused attention in every DiT path,
no host sync inside the sampling and training loops, the compiled sampler, the channels-last codec.
The CUDA-only checks skip without a GPU; the suite's dry run runs the same code on the CPU."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.attention_paths import check_paths
from bench.gpu_report import markdown, summarise
from bench.host_syncs import loop_syncs, record
from conftest import TEST_THREADS
from drivedit.generate.sampler import DiTSampler, SamplerSettings
from drivedit.models.dit import build_dit, dit_config

ROOT = Path(__file__).resolve().parent.parent
META = torch.device("meta")


def test_every_dit_path_calls_fused_attention_once_per_block():
    rows = check_paths("DiT-N/2", 8, torch.device("cpu"))
    assert {r["path"] for r in rows} == {"posenc abs", "posenc rope", "method bitfit", "method difffit",
                                         "method finediffusion", "method lora", "method driveditfit"}
    for r in rows:
        assert r["ok"], r
        assert r["sdpa_calls"] == r["blocks"] == 2 and r["softmax_calls"] == 0
        assert "math" not in r["kernels"]


def test_attention_stays_fused_when_timm_turns_fused_attention_off(monkeypatch):
    import timm.layers.config as timm_config

    monkeypatch.setattr(timm_config, "_USE_FUSED_ATTN", 0)  # what TIMM_FUSED_ATTN=0 does
    model = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=4))
    assert all(block.attn.fused_attn for block in model.blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash / efficient kernels exist on CUDA only")
def test_cuda_bf16_picks_flash_or_efficient_attention_in_every_path():
    rows = check_paths("DiT-XL/2", 32, torch.device("cuda"), depth=2)  # XL's head size 72 at 256 px
    for r in rows:
        assert r["ok"] and r["flash_or_efficient_accepts"], r
        assert set(r["kernels"]) <= {"flash", "efficient", "cudnn"}


def test_recorder_finds_planted_syncs_in_a_loop_and_not_in_its_set_up():
    x = torch.ones(4, device=META)

    def loop(n):
        torch.arange(3).to(META)  # set-up: once per call
        for _ in range(n):
            torch.zeros(2).to(META)  # a blocking host -> device copy every step

    found = loop_syncs(loop, META)
    assert len(found["per_call"]) == 1 and found["per_call"][0].endswith("(1 per call)")
    assert len(found["in_loop"]) == 1 and found["in_loop"][0].endswith("(1 per step)")
    assert "host -> device blocking" in found["in_loop"][0] and "test_gpu_suite.py" in found["in_loop"][0]
    assert len(record(lambda: x.sum().item(), META)) == 1  # a read stops the run on meta
    assert record(lambda: x * torch.tensor(3.0) + 1, META) == []  # a 0-dim CPU tensor is a scalar, no copy


@pytest.mark.parametrize("kind, clean", [("ddim", True), ("ddpm", False)])
def test_sampling_loop_host_syncs(kind, clean):
    sampler = DiTSampler(build_dit(dit_config("DiT-N/2", input_size=8, num_classes=6)), device=META)
    found = loop_syncs(lambda n: sampler.sample(torch.tensor([1, 2]), [0, 1], SamplerSettings(sampler=kind, steps=n)),
                       META)
    assert not found["stopped_at_read"]
    assert len(found["per_call"]) >= 2  # labels and initial noise go to the device once per call
    if clean:
        assert found["in_loop"] == []
    else:  # known: diffusers' DDPMScheduler draws each step's noise with our per-item CPU generators
        assert len(found["in_loop"]) == 1 and "scheduling_ddpm" in found["in_loop"][0]


def test_training_step_of_every_method_has_no_host_sync():
    from bench.finetune_step import METHODS, Runner, base_and_batch

    base, batch = base_and_batch("DiT-N/2", 32, 8, 2, 6, META)
    args = argparse.Namespace(rank=4, scenarios=6, dtype="float32")
    for name in METHODS:
        runner = Runner(name, base, args, batch, META)
        runner.step()

        def steps(n):
            for _ in range(n):
                runner.step()
        found = loop_syncs(steps, META)
        assert found == {"per_call": [], "in_loop": [], "stopped_at_read": False}, name


def test_autocast_casts_a_frozen_models_weights_once_per_call_not_per_step(monkeypatch):
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    from drivedit.generate import sampler as sampler_mod

    model = build_dit(dit_config("DiT-N/2", input_size=8, num_classes=6)).requires_grad_(False)  # as served
    sampler = DiTSampler(model)

    def casts_per_step() -> float:
        counts = []
        for steps in (2, 4):  # the sampler leaves a caller's autocast region in charge: CPU bf16 here
            with torch.autocast("cpu", dtype=torch.bfloat16), profile(activities=[ProfilerActivity.CPU]) as prof:
                sampler.sample(torch.tensor([1, 2]), [0, 1], SamplerSettings(steps=steps))
            counts.append([e.name for e in prof.events()].count("aten::_to_copy"))
        return (counts[1] - counts[0]) / 2

    cached = casts_per_step()
    monkeypatch.setattr(sampler_mod, "cached_weight_casts", lambda model, enabled=True: contextlib.nullcontext())
    uncached = casts_per_step()
    weights = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))) * 2  # + biases
    assert uncached - cached == weights  # every weight and bias cast once per call, no longer once per step
    assert not any(p.requires_grad for p in model.parameters())  # the model is left frozen


def test_compiled_sampler_matches_eager(base):
    model = base
    settings = SamplerSettings(steps=3, guidance=2.0)
    eager = DiTSampler(model).sample(torch.tensor([1, 4]), [5, 6], settings)
    compiled = DiTSampler(model, compile="eager")
    got = compiled.sample(torch.tensor([1, 4]), [5, 6], settings)
    assert compiled._compiled_guided is not None
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_channels_last_codec_gives_the_same_moments_and_images():
    from bench._common import random_vae
    from drivedit.models.codec import AutoencoderKLCodec

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    plain = AutoencoderKLCodec(random_vae(4, full=False), "t", channels_last=False).to("cpu")
    nhwc = AutoencoderKLCodec(random_vae(4, full=False), "t", channels_last=True).to("cpu")
    conv = next(m for m in nhwc.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    m1, m2 = plain.encode(x), nhwc.encode(x)
    assert m2.is_contiguous() and m2.shape == (2, 8, 4, 4)
    torch.testing.assert_close(m2, m1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nhwc.decode(m1[:, :4]), plain.decode(m1[:, :4]), rtol=1e-4, atol=1e-4)


def test_report_arithmetic_from_rows():
    parts = [
        {"part": "sampling", "status": "timed out", "seconds": 90, "cap_s": 90, "rows": [
            {"kind": "config", "batch": 32, "flop_per_call": 7.59e14, "peak_tflops": 989.0},
            {"kind": "run", "side": "ours", "seconds": 2.0}, {"kind": "run", "side": "diffusers", "seconds": 3.0},
            {"kind": "run", "side": "ours", "seconds": 1.8}, {"kind": "run", "side": "ours", "seconds": 1.9}]},
        {"part": "finetune", "status": "ok", "seconds": 40, "cap_s": 90, "rows": [
            {"kind": "method", "method": "full", "compile": "off", "step_s": 0.2, "images_per_s": 160.0,
             "batch": 32, "trainable": 1, "warmup_s": 1.0, "peak_bytes": 2**31},
            {"kind": "method", "method": "driveditfit", "compile": "off", "step_s": 0.1, "images_per_s": 320.0,
             "batch": 32, "trainable": 1, "warmup_s": 1.0, "peak_bytes": 2**30}]},
        {"part": "serve", "status": "ok", "seconds": 40, "cap_s": 90, "rows": [
            {"kind": "load", "mode": "batched", "concurrency": 32, "img_per_s": 30.0, "p50_ms": 1, "p99_ms": 2,
             "mean_batch": 20},
            {"kind": "load", "mode": "unbatched", "concurrency": 32, "img_per_s": 12.0, "p50_ms": 1, "p99_ms": 2,
             "mean_batch": 1}]},
        {"part": "detect", "status": "timed out", "seconds": 120, "cap_s": 120, "rows": [
            {"kind": "throughput", "backbone": "resnet18", "batch": 64, "step_s": 0.25, "images_per_s_per_worker": 256.0,
             "peak_mem_gib": 0.7, "trainable": 12},
            {"kind": "throughput", "backbone": "dit-demo", "batch": 64, "step_s": 0.5, "images_per_s_per_worker": 128.0,
             "peak_mem_gib": 0.9, "trainable": 3},
            {"kind": "plan", "steps": 80}, {"kind": "ap", "backbone": "resnet18", "AP50": 0.1, "mAP": 0.03}]},
    ]
    s = summarise(parts, {"dry_run": False})
    ours = s["figures"]["sampling"]["sides"]["ours"]
    assert ours["median_s"] == 1.9 and ours["images_per_s"] == pytest.approx(32 / 1.9)
    assert ours["percent_of_bf16_peak"] == pytest.approx(100 * 7.59e14 / 1.9 / 1e12 / 989)
    g = s["goals"]
    assert g["sampling_ratio"]["value"] == pytest.approx(3.0 / 1.9) and g["sampling_ratio"]["met"] is True
    assert g["sampling_images_per_s"]["met"] is True
    assert g["driveditfit_vs_full"]["value"] == pytest.approx(2.0) and g["driveditfit_images_per_s"]["met"]
    assert g["serve_ratio"]["value"] == pytest.approx(2.5) and g["serve_ratio"]["met"] is False
    assert "encode_vs_codec" not in g  # not measured: no row, no figure
    md = markdown({"environment": {"dry_run": False}, "parts": parts, "summary": s})
    assert "| sampling | timed out |" in md and "| driveditfit | off | 32 | 100.0 | 320.0 | 2.00× | — | 1.0 |" in md
    # detect: the part was stopped before the DiT's AP: its throughput row stays, its AP shows as not measured
    assert "AP50 after 80 steps each" in md and "| resnet18 | 256.0 | 1.00× | 0.7 | 12 | 0.100 | 0.030 |" in md
    assert "| dit-demo | 128.0 | 0.50× | 0.9 | 3 | — | — |" in md


def _suite(tmp_path, *args, timeout=600):
    # the parts' own torch work on this test process's thread budget (conftest.TEST_THREADS)
    return subprocess.run([sys.executable, "bench/gpu_suite.py", "--out", str(tmp_path), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS)})


@pytest.mark.e2e  # the suite's command as users run it (subprocesses)
def test_suite_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = _suite(tmp_path, "--parts", "detect")
    assert r.returncode == 2 and "--dry-run" in r.stderr
    r = _suite(tmp_path, "--dry-run", "--cap", "sampling=-1", "--cap", "nope=3")
    assert r.returncode == 2 and "sampling=-1" in r.stderr and "nope=3" in r.stderr


@pytest.mark.e2e  # the suite's command as users run it (subprocesses)
def test_suite_stops_a_part_at_its_cap_and_still_writes_results(tmp_path):
    from bench.gpu_suite import GRACE_S

    r = _suite(tmp_path, "--dry-run", "--parts", "sampling", "detect", "--cap", "sampling=2", "--cap", "detect=2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    status = {p["part"]: p["status"] for p in res["parts"]}
    assert status == {"sampling": "timed out", "detect": "timed out"}  # the next part runs after a capped one
    assert res["parts"][0]["seconds"] < 2 + GRACE_S + 10  # stopped at its cap (SIGTERM, SIGKILL after the grace)
    assert "| sampling | timed out |" in (tmp_path / "results.md").read_text()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["results.json", "results.md", "rows.jsonl"]


@pytest.mark.e2e  # the suite's command as users run it (subprocesses)
def test_suite_stopped_with_sigterm_stops_its_part_and_keeps_the_results(tmp_path):
    import signal

    # encode: the dry-run part that runs longest (it starts a local Ray), so the suite is stopped mid-part
    # whatever the machine's speed (a quiet machine finished the sampling part before the first tick)
    proc = subprocess.Popen([sys.executable, "bench/gpu_suite.py", "--out", str(tmp_path), "--dry-run", "--parts",
                             "encode"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def running() -> bool:  # the first 10 s tick has written the part as running
        try:
            return json.loads((tmp_path / "results.json").read_text())["parts"][0]["status"] == "running"
        except (OSError, ValueError, KeyError, IndexError):
            return False

    deadline = time.time() + 120
    while not running() and time.time() < deadline:
        time.sleep(0.5)
    assert running(), "the encode part finished before the suite could be stopped mid-part"
    proc.send_signal(signal.SIGTERM)  # what a device run's time limit does
    assert proc.wait(timeout=90) == 143
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(p["part"], p["status"]) for p in res["parts"]] == [("encode", "stopped with the suite")]
    parts = subprocess.run(["pgrep", "-f", f"gpu_parts encode --rows {tmp_path}"], capture_output=True, text=True)
    assert parts.stdout.strip() == ""  # the part's process group went with it
    assert os.path.exists(tmp_path / "results.md")


@pytest.mark.slow
@pytest.mark.e2e  # the whole dry run: every part in its own process, two of them with their own local Ray
def test_suite_dry_run_runs_every_part_on_the_cpu(tmp_path):
    r = _suite(tmp_path, "--dry-run", timeout=1900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads((tmp_path / "results.json").read_text())
    status = {p["part"]: p["status"] for p in res["parts"]}
    assert status == {"checks": "ok", "sampling": "ok", "finetune": "ok", "finetune_compiled": "ok",
                      "sampling_compiled": "ok", "encode": "ok", "serve": "ok", "detect": "ok"}
    goals, figs = res["summary"]["goals"], res["summary"]["figures"]
    assert set(goals) == {"sampling_ratio", "sampling_images_per_s", "driveditfit_images_per_s",
                          "driveditfit_vs_full", "encode_vs_codec", "serve_ratio"}
    assert all(g["value"] > 0 and g["met"] is None for g in goals.values())  # dry run: no goal is judged
    assert figs["sampling"]["sides"]["ours"]["runs"] == 1
    assert figs["sampling_compiled"]["compiled_vs_eager"] > 0
    assert {(r["method"], r["compile"]) for r in figs["finetune_compiled"]} == {
        ("driveditfit", "off"), ("driveditfit", "eager"), ("full", "off"), ("full", "eager")}
    assert all(r["speedup_vs_eager"] > 0 for r in figs["finetune_compiled"] if r["compile"] == "eager")
    assert len(figs["finetune"]) == 6 and all(r["step_s"] > 0 for r in figs["finetune"])
    assert {r["mode"] for r in figs["serve"]} == {"batched", "unbatched"}
    assert all(r["ok"] for r in figs["checks"]["attention"])
    sync = {r["loop"]: r["ok"] for r in figs["checks"]["host_sync"]}
    assert sync.pop("sampler ddpm") is False and all(sync.values())  # DDPM's per-step noise: known
    detect = figs["detect"]  # no Ray, MLflow or data files: it draws its scenes
    assert [r["backbone"] for r in detect["throughput"]] == ["resnet18", "dit-demo", "dit-random-DiT-N/2"]
    assert all(r["images_per_s_per_worker"] > 0 for r in detect["throughput"])
    assert [r["backbone"] for r in detect["ap"]] == ["resnet18", "dit-demo"]
    assert detect["ap"][0]["steps"] == detect["ap"][1]["steps"] == detect["plan"]["steps"] >= 1
    assert all(0 <= r["AP50"] <= 1 for r in detect["ap"])
    md = (tmp_path / "results.md").read_text()
    assert "CPU DRY RUN" in md and "| detect | ok |" in md and "## Fine-tuning step" in md
    assert "## Detector training" in md
