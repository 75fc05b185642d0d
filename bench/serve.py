"""Serving benchmark: throughput and p50 / p99 latency at several concurrencies, batching on vs off.

Baseline: the same deployment with batching off (one sampler call per request, calls serialized on
the replica's model thread). Both run in this process's Ray, one after the other, on the same
random-weight model and settings, over real HTTP on 127.0.0.1; every request asks for one image
with its own seed. Prints one row per (mode, concurrency) and the batched / unbatched throughput
ratio at the highest concurrency.

    python bench/serve.py                                   # CPU: DiT-N/2, 16x16 pixel latents, 10 steps
    python bench/serve.py --model DiT-XL/2 --latent-size 32 --steps 50 --requests 128 --max-batch-size 32
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-N/2", help="registry size of the random-weight DiT")
    p.add_argument("--latent-size", type=int, default=16, help="side of the latent grid (pixel codec: image side)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per request")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    p.add_argument("--requests", type=int, default=64, help="requests per (mode, concurrency) measurement")
    p.add_argument("--max-batch-size", type=int, default=32, help="images per batched sampler call")
    p.add_argument("--batch-wait", type=float, default=0.05,
                   help="batch_wait_timeout_s of the batched mode (default: the ServeApp default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    return p.parse_args(argv)


def write_model(args, directory: Path) -> Path:
    import torch

    from drivedit.models.checkpoint import export_safetensors
    from drivedit.models.dit import build_dit, dit_config

    torch.manual_seed(0)
    model = build_dit(dit_config(args.model, input_size=args.latent_size, in_channels=3, num_classes=len(SCENARIOS)))
    with torch.no_grad():  # leave the adaLN-Zero init so the work is that of a trained model
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    return export_safetensors(model, directory / "bench-model.safetensors")


def serve_config(args, ckpt: Path, batching: bool, concurrency: int):
    from drivedit.config.serve import ServeApp

    return ServeApp.model_validate({
        "model": {"ref": str(ckpt), "class_names": SCENARIOS, "device": args.device},
        "sampler": {"max_steps": max(args.steps, 250), "default_steps": args.steps, "max_images": 1,
                    "max_image_steps": max(args.steps, 800), "max_guidance": max(args.guidance, 10.0)},
        "batching": {"enabled": batching, "max_batch_size": args.max_batch_size,
                     "batch_wait_timeout_s": args.batch_wait},
        "deployment": {"max_ongoing_requests": max(concurrency, 2), "max_queued_requests": 4 * concurrency + 64,
                       "cpus_per_replica": args.cpus_per_replica},
    })


async def load(url: str, concurrency: int, num_requests: int, steps: int, guidance: float, seed0: int):
    """`concurrency` clients, each sending its next request when its last one returns."""
    import httpx

    latencies, batch_sizes = [], []
    counter = iter(range(num_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        async def worker():
            for i in counter:
                body = {"scenario": SCENARIOS[i % len(SCENARIOS)], "seed": seed0 + i, "steps": steps,
                        "guidance": guidance}
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"request failed with {r.status_code}: {r.text[:300]}")
                batch_sizes.append(int(r.headers["x-batch-size"]))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return wall, latencies, batch_sizes


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(args, emit=None) -> tuple[list[dict], str]:
    """Start Ray and Serve, deploy the app batched then unbatched, and load it at each concurrency.
    Each row is passed to `emit` as soon as it is measured. Returns (rows, the replica's device)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx
    import ray
    from ray import serve

    from drivedit.serve.app import build_app

    levels = [int(c) for c in args.concurrency.split(",")]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows, device = [], "?"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1/samples"
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = write_model(args, Path(tmp))
            for batching in (True, False):
                mode = "batched" if batching else "unbatched"
                cfg = serve_config(args, ckpt, batching, max(levels))
                serve.run(build_app(cfg), name=f"bench-{mode}", route_prefix="/")
                asyncio.run(load(url, 2, 4, args.steps, args.guidance, 10**6))  # warm-up: first calls build caches
                device = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60).json()["device"]
                for c in levels:
                    wall, lat, sizes = asyncio.run(load(url, c, args.requests, args.steps, args.guidance, 0))
                    rows.append({"mode": mode, "concurrency": c, "requests": len(lat), "wall_s": wall,
                                 "img_per_s": len(lat) / wall, "p50_ms": 1000 * pct(lat, 50),
                                 "p99_ms": 1000 * pct(lat, 99), "mean_batch": statistics.mean(sizes),
                                 "device": device})
                    r = rows[-1]
                    print(f"  {mode:9s} c={c:<3d} {r['img_per_s']:8.2f} img/s  p50 {r['p50_ms']:9.1f} ms  "
                          f"p99 {r['p99_ms']:9.1f} ms  mean batch {r['mean_batch']:.1f}", flush=True)
                    if emit is not None:
                        emit(r)
                serve.delete(f"bench-{mode}")
    finally:
        ray.shutdown()  # this process's own Ray: takes Serve with it (serve.shutdown() can hang on a busy machine)
    return rows, device


def main(argv=None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, device = measure(args)

    print(f"\nserve benchmark: {args.model} on {args.latent_size}x{args.latent_size} pixel latents, {args.steps} DDIM "
          f"steps, guidance {args.guidance}, 1 image/request, {args.requests} requests per row, "
          f"max_batch_size {args.max_batch_size}, batch wait {args.batch_wait} s, device {device}")
    print(f"{'mode':10s} {'conc':>4s} {'img/s':>9s} {'p50 ms':>10s} {'p99 ms':>10s} {'mean batch':>11s}")
    for r in rows:
        print(f"{r['mode']:10s} {r['concurrency']:4d} {r['img_per_s']:9.2f} {r['p50_ms']:10.1f} {r['p99_ms']:10.1f} "
              f"{r['mean_batch']:11.1f}")
    top = max(levels)
    on = next(r for r in rows if r["mode"] == "batched" and r["concurrency"] == top)
    off = next(r for r in rows if r["mode"] == "unbatched" and r["concurrency"] == top)
    print(f"\nbatched / unbatched throughput at concurrency {top}: {on['img_per_s'] / off['img_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
