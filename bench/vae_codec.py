"""Benchmark: the shipped tiny VAE's encode and decode throughput on this machine, against the
sd-vae-ft-* architecture (random weights: speed does not depend on their values) producing the same
32x32x4 latent grid (from 256 px images, its factor being 8).

Both go through drivedit's AutoencoderKLCodec (`load_codec`, the path encode and generate take),
float32, the same torch threads, alternating, best of `--repeats`; images/s counts images (encode:
image -> posterior moments; decode: scaled latents -> image).

    python bench/vae_codec.py                      # 2 threads, batch 32, 3 repeats
    python bench/vae_codec.py --threads 1 --batch 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench._common import random_vae  # noqa: E402
from drivedit.models.codec import load_codec  # noqa: E402


def _rate(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x[:2])  # warm-up: first-call allocations and oneDNN kernel selection
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def measure(codec, size: int, batch: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1                    # (B, 3, S, S)
    latents = codec.encode(images[:1]).chunk(2, dim=1)[0]
    z = torch.randn((batch, *latents.shape[1:]), generator=gen)                          # (B, 4, S/f, S/f)
    return {"image_size": size, "latent_shape": list(latents.shape[1:]),
            "encode_img_s": round(_rate(codec.encode, images, repeats), 2),
            "decode_img_s": round(_rate(codec.decode, z, repeats), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tiny = load_codec("autoencoder_kl", "builtin:tiny-vae")
    with tempfile.TemporaryDirectory() as tmp:
        random_vae(8, full=True).save_pretrained(tmp)
        sd = load_codec("autoencoder_kl", tmp)
        result = {"threads": args.threads, "batch": args.batch, "load_average": os.getloadavg()[0],
                  "tiny-vae": measure(tiny, 128, args.batch, args.repeats),
                  "sd-vae-architecture": measure(sd, 256, args.batch, args.repeats)}
    for op in ("encode_img_s", "decode_img_s"):
        result[f"{op[:6]}_ratio"] = round(result["tiny-vae"][op] / result["sd-vae-architecture"][op], 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
