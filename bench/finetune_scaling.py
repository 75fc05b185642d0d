"""Fine-tuning throughput of the whole job (Ray Train + Ray Data + DDP) with 1 and N workers on the same data.

Each configuration runs the real `run_finetune` (preflight, TorchTrainer, the per-worker loop reading
its shard of the same latent shards) in this one process against one local Ray. The baseline is the
1-worker run; each worker keeps the same micro-batch, so the global batch grows with the workers
(data-parallel weak scaling), and the speed-up of N workers is their images/s over 1 worker's.
Images/s is rank 0's count of global images over the second half of the steps (the first half holds
process start, dataset start and warm-up), as the job's own log line reports it.

    python bench/finetune_scaling.py                               # CPU: DiT-T/2, 32 px pixel latents, 1 and 2 workers
    python bench/finetune_scaling.py --workers 1 2 4 --steps 40
    python bench/finetune_scaling.py --gpu --model DiT-XL/2 --image-size 256 --latent-factor 8 \\
        --latent-channels 4 --batch 32 --methods driveditfit full --workers 1     # images/s per GPU, bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-T/2", help="registry size of the (random) base model")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--latent-factor", type=int, default=1, help="1: pixel codec; 8: SD VAE latents")
    p.add_argument("--latent-channels", type=int, default=3, help="3 for the pixel codec, 4 for the SD VAE")
    p.add_argument("--batch", type=int, default=16, help="micro-batch per worker (kept when workers grow)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts; the first is the baseline")
    p.add_argument("--methods", nargs="+", default=["driveditfit"], help="methods to measure")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the second half is timed)")
    p.add_argument("--rows", type=int, default=512, help="rows of the synthetic shards")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile on GPU workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    return p.parse_args(argv)


def write_material(root: Path, args) -> tuple[Path, Path]:
    """A random base DiT (zero-init layers perturbed) and shards of random moments."""
    from drivedit.data.shards import ShardMetadata, build_shard_table, shard_name, write_shard
    from drivedit.models.checkpoint import export_safetensors
    from drivedit.models.dit import build_dit, dit_config

    size = args.image_size // args.latent_factor
    c = args.latent_channels
    torch.manual_seed(0)
    model = build_dit(dit_config(args.model, input_size=size, in_channels=c, num_classes=8))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.02)
    base = export_safetensors(model, root / "base.safetensors")
    codec = "pixel" if args.latent_factor == 1 else "autoencoder_kl:stabilityai/sd-vae-ft-ema"
    meta = ShardMetadata(codec, 1.0 if args.latent_factor == 1 else 0.18215, args.image_size, (c, size, size),
                         ["clear", "overcast", "rainy", "snowy", "night"])
    rng = np.random.default_rng(0)
    per_shard = 128
    for s in range(0, args.rows, per_shard):
        n = min(per_shard, args.rows - s)
        mean = rng.normal(0, 0.5, (n, c, size, size)).astype(np.float16)
        moments = np.concatenate([mean, np.full_like(mean, -8.0)], axis=1).reshape(n, -1)
        rows = {"frame_id": [f"f{s + i}" for i in range(n)], "source_uri": [""] * n,
                "scenario": rng.integers(0, 5, n), "weather": ["clear"] * n, "timeofday": ["daytime"] * n,
                "moments": moments, "moments_flip": moments,
                "object_mask": (rng.random((n, size * size)) < 0.1).astype(np.uint8), "num_objects": np.ones(n)}
        write_shard(str(root / "shards" / shard_name(s // per_shard)), build_shard_table(rows, meta))
    return base, root / "shards"


def run_one(base: Path, shards: Path, storage: Path, method: str, workers: int, args) -> dict:
    from drivedit.config.base import validate_config
    from drivedit.config.finetune import FinetuneJob
    from drivedit.train.trainer import run_finetune

    half = max(1, args.steps // 2)
    raw = {
        "model": {"source": str(base), "compile": args.compile},
        "data": {"shards": str(shards), "materialize": True},
        "method": {"name": method, "rank": args.rank, "scenario_init": "random", "schedule": "linear"},
        "optim": {"total_steps": 2 * half, "global_batch_size": args.batch * workers, "lr": 1e-4,
                  "ema_decay": 0.9999, "precision": "bf16" if args.gpu else "fp32"},
        "scaling": {"num_workers": workers, "use_gpu": args.gpu, "cpus_per_worker": args.cpus_per_worker},
        "run": {"name": f"{method}-{workers}w", "storage_path": str(storage), "checkpoint_every": 2 * half,
                "log_every": half, "keep_checkpoints": 1},
        "tracking": {"enabled": False},
        "sampling": {"at_end": False},
    }
    t0 = time.perf_counter()
    summary = run_finetune(validate_config(FinetuneJob, raw))
    wall = time.perf_counter() - t0
    m = summary["metrics"]
    return {"method": method, "workers": workers, "global_batch": args.batch * workers,
            "images_per_s": m["images_per_s"], "loss": m["loss"], "peak_mem_gib": m["peak_mem_gib"],
            "wall_s": wall, "steps": 2 * half, "timed_steps": half}


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    need = max(args.workers) * args.cpus_per_worker + 2  # train workers + Ray Data + the driver
    ray.init(num_cpus=int(np.ceil(need)), include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as d:
        base, shards = write_material(Path(d), args)
        for method in args.methods:
            for w in args.workers:
                r = run_one(base, shards, Path(d) / "runs", method, w, args)
                results.append(r)
                print(f"  {method} x{w}: {r['images_per_s']:.1f} img/s ({r['wall_s']:.0f} s wall)", flush=True)
    ray.shutdown()
    device = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores visible, {args.cpus_per_worker:g} CPU per worker)"
    print(f"\nfine-tuning throughput: {args.model} at {args.image_size} px "
          f"({args.latent_channels}x{args.image_size // args.latent_factor}^2 latents), micro-batch {args.batch} "
          f"per worker, {'bf16' if args.gpu else 'fp32'}, on {device}")
    print(f"{'method':<12} {'workers':>7} {'global batch':>12} {'images/s':>10} {'vs 1st':>8} {'efficiency':>10} "
          f"{'img/s/worker':>12}")
    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        base_ips = rows[0]["images_per_s"]
        for r in rows:
            ratio = r["images_per_s"] / base_ips
            r["speedup"], r["efficiency"] = ratio, ratio * rows[0]["workers"] / r["workers"]
            print(f"{method:<12} {r['workers']:>7} {r['global_batch']:>12} {r['images_per_s']:>10.1f} "
                  f"{ratio:>7.2f}x {r['efficiency']:>9.0%} {r['images_per_s'] / r['workers']:>12.1f}")
    print(f"baseline: the {args.workers[0]}-worker run of the same job on the same shards, in this process")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
