"""Benchmark: what `dtype: auto` buys on this CPU. The shipped tiny VAE's encode and decode and the shipped tiny
DiT's guided sampling, each in float32 (the baseline: the NCHW float32 codec and sampler every version before
used on a CPU) against NHWC float32 and bfloat16 (what `auto` resolves to on a CPU with AVX512-BF16 or AMX).

Same inputs, same torch threads, the arms alternating, best of `--repeats`; images/s counts images. Also prints
how far bfloat16 moves the outputs from float32 (relative L2), so a speed-up is read with its cost.

    python bench/cpu_precision.py                  # 2 threads, batch 32, 3 repeats
    python bench/cpu_precision.py --threads 1 --batch 16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from drivedit.generate.sampler import DiTSampler, SamplerSettings  # noqa: E402
from drivedit.models.checkpoint import load_dit  # noqa: E402
from drivedit.models.codec import load_codec  # noqa: E402
from drivedit.models.precision import autocast_dtype, native_bf16  # noqa: E402


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a - b).norm() / b.norm()), 5)


def codec_arms(batch: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 128, 128, generator=gen) * 2 - 1                       # (B, 3, 128, 128)
    z = torch.randn(batch, 4, 32, 32, generator=gen)                                     # (B, 4, 32, 32)
    arms = {"float32 NCHW (baseline)": ("float32", False), "float32 NHWC": ("float32", True),
            "bfloat16 NHWC": ("bfloat16", True)}
    codecs = {}
    for name, (dtype, nhwc) in arms.items():
        c = load_codec("autoencoder_kl", "builtin:tiny-vae", dtype=dtype)
        c.channels_last = nhwc
        codecs[name] = c.to("cpu")
        c.encode(images[:2]), c.decode(z[:2])  # first-call allocations and oneDNN kernel selection
    best = {name: {"encode": float("inf"), "decode": float("inf")} for name in arms}
    outputs = {}
    for _ in range(repeats):
        for name, c in codecs.items():
            te, moments = _timed(lambda: c.encode(images))
            td, decoded = _timed(lambda: c.decode(z))
            best[name]["encode"], best[name]["decode"] = min(best[name]["encode"], te), min(best[name]["decode"], td)
            outputs[name] = (moments[:, :4], decoded)
    base = "float32 NCHW (baseline)"
    rows = {}
    for name in arms:
        rows[name] = {"encode_img_s": round(batch / best[name]["encode"], 1),
                      "decode_img_s": round(batch / best[name]["decode"], 1),
                      "encode_ratio": round(best[base]["encode"] / best[name]["encode"], 2),
                      "decode_ratio": round(best[base]["decode"] / best[name]["decode"], 2),
                      "latent_mean_rel_diff": _rel(outputs[name][0], outputs[base][0]),
                      "image_rel_diff": _rel(outputs[name][1], outputs[base][1])}
    return rows


def sampler_arms(batch: int, steps: int, repeats: int) -> dict:
    model = load_dit("builtin:tiny-dit")
    labels = torch.arange(batch) % model.config.num_classes                              # (B,)
    seeds = list(range(batch))
    settings = SamplerSettings(sampler="ddpm", steps=steps, guidance=4.0)
    arms = {"float32 (baseline)": DiTSampler(model, amp_dtype=None),
            "bfloat16": DiTSampler(model, amp_dtype=autocast_dtype("bfloat16", "cpu"), cpu_amp=True)}
    for s in arms.values():
        s.sample(labels[:2], seeds[:2], SamplerSettings(sampler="ddpm", steps=2, guidance=4.0))
    best, outputs = {name: float("inf") for name in arms}, {}
    for _ in range(repeats):
        for name, s in arms.items():
            t, outputs[name] = _timed(lambda: s.sample(labels, seeds, settings))
            best[name] = min(best[name], t)
    base = "float32 (baseline)"
    return {name: {"img_s": round(batch / best[name], 2), "ratio": round(best[base] / best[name], 2),
                   "latent_rel_diff": _rel(outputs[name], outputs[base])} for name in arms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="DDPM steps of the sampling arms (guidance 4 throughout)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "batch": args.batch, "native_bf16": native_bf16("cpu"),
              "load_average": round(os.getloadavg()[0], 2),
              "tiny_vae": codec_arms(args.batch, args.repeats),
              "tiny_dit_sampling": sampler_arms(args.batch, args.steps, args.repeats)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
