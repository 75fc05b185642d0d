"""The parts of the GPU suite (`bench/gpu_suite.py`), each run in its own process:

    python -m bench.gpu_parts PART --rows FILE [--dry-run]

A part appends one JSON line per measurement to FILE the moment it has it (and prints it), so a part
stopped at its time cap still leaves every figure it measured. The suite gives every part the same FILE
(each line names its part): few files to carry back from a GPU machine. Each part reuses a benchmark's own code
(bench/sampling.py, finetune_step.py, encode.py, serve.py) with the suite's sizes: the GPU goals' shapes,
or, with --dry-run, tiny shapes on the CPU that run the same code in seconds.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

METHODS = ("full", "driveditfit", "bitfit", "difffit", "lora", "finediffusion")  # the goals' two first
COMPILED_METHODS = ("driveditfit", "full")

# each part's sizes: the GPU goals' shapes, and tiny CPU shapes for --dry-run (same code paths)
SIZES = {
    "gpu": {
        "checks": dict(model="DiT-XL/2", input_size=32, depth=2, sync_model="DiT-XL/2"),
        "sampling": ["--preset", "gpu", "--repeats", "3", "--warmup", "1"],
        "finetune": ["--preset", "gpu", "--steps", "10", "--warmup", "3"],
        "compile_backend": "inductor",
        "encode": dict(num=2048, unique=64, size=256, aspect=16 / 9, resolution=256, codec="sd-vae", read_batch=64,
                       encode_batch=64, read_cpus=0.5, workers=1, cpus_per_worker=2.0, use_gpu=True),
        "serve": ["--model", "DiT-XL/2", "--latent-size", "32", "--steps", "25", "--concurrency", "32",
                  "--requests", "64", "--max-batch-size", "32", "--device", "cuda"],
    },
    "dry": {
        "checks": dict(model="DiT-N/2", input_size=8, depth=None, sync_model="DiT-N/2"),
        "sampling": ["--preset", "cpu", "--model", "DiT-N/2", "--image-size", "16", "--vae-factor", "2",
                     "--batch", "2", "--steps", "2", "--repeats", "1", "--warmup", "1", "--threads", "1"],
        "finetune": ["--preset", "cpu", "--model", "DiT-N/2", "--image-size", "32", "--batch", "2", "--steps", "1",
                     "--warmup", "1", "--threads", "1"],
        "compile_backend": "eager",  # dynamo traces the same graphs; inductor's C++ build is too slow for a test
        "encode": dict(num=16, unique=2, size=32, aspect=16 / 9, resolution=16, codec="tiny-vae", read_batch=8,
                       encode_batch=8, read_cpus=0.5, workers=1, cpus_per_worker=1.0, use_gpu=False),
        "serve": ["--model", "DiT-N/2", "--latent-size", "8", "--steps", "2", "--concurrency", "32",
                  "--requests", "32", "--max-batch-size", "32", "--device", "cpu", "--num-cpus", "4"],
    },
}


class Emitter:
    """Appends {"kind": ..., **fields} lines to the rows file, flushed at once, and echoes them."""

    def __init__(self, path: Path, part: str):
        self.part, self.f = part, open(path, "a", encoding="utf-8")

    def __call__(self, kind: str, **fields) -> None:
        line = json.dumps({"part": self.part, "kind": kind, **fields}, default=str)
        self.f.write(line + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        print(f"[{self.part}] {line}", flush=True)


def _device_info() -> dict:
    from bench._common import bf16_peak_tflops

    if not torch.cuda.is_available():
        return {"device": "cpu", "name": f"CPU ({os.cpu_count()} cores)", "peak_tflops": None}
    name = torch.cuda.get_device_name(0)
    return {"device": "cuda", "name": name, "peak_tflops": bf16_peak_tflops(name),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


def _missing(*modules: str) -> str | None:
    """The first module of `modules` this Python cannot import, else None."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return m
    return None


# ----------------------------------------------------------------------------- checks


def part_checks(sizes: dict, emit: Emitter) -> None:
    """Attention kernels of every DiT path, and the host syncs inside the sampling and training loops."""
    from bench.attention_paths import check_paths
    from bench.finetune_step import Runner, base_and_batch
    from drivedit.generate.sampler import DiTSampler, SamplerSettings
    from drivedit.models.dit import build_dit, dit_config

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    c = sizes["checks"]
    for row in check_paths(c["model"], c["input_size"], device, depth=c["depth"]):
        emit("attention", **row)

    # host syncs: on a GPU the recorder runs on CUDA (plus torch's own sync debug mode); on a CPU on meta
    where = device if cuda else torch.device("meta")
    extra = {"depth": c["depth"]} if c["depth"] else {}
    sampler = DiTSampler(build_dit(dit_config(c["sync_model"], input_size=c["input_size"], num_classes=6, **extra)),
                         device=where)
    for kind in ("ddim", "ddpm"):
        emit("host_sync", **_loop_sync_row(f"sampler {kind}", where, lambda n, kind=kind: sampler.sample(
            torch.tensor([1, 2]), [0, 1], SamplerSettings(sampler=kind, steps=n))))
    del sampler
    args = argparse.Namespace(rank=4, scenarios=6, dtype="bfloat16" if cuda else "float32")
    base, batch = base_and_batch(c["sync_model"], c["input_size"] * 8, 8, 2, 6, where, **extra)
    for name in METHODS:
        runner = Runner(name, base, args, batch, where)
        emit("host_sync", **_loop_sync_row(f"train step {name}", where,
                                           lambda n: [runner.step() for _ in range(n)]))
        runner.free()


def _loop_sync_row(label: str, where: torch.device, run) -> dict:
    """The host syncs of `run(n)` after one warm-up call (tables built, kernels picked)."""
    from bench.host_syncs import cuda_sync_warnings, loop_syncs

    run(1)
    found = loop_syncs(run, where)
    row = {"loop": label, "device": where.type, "per_call": found["per_call"], "in_loop": found["in_loop"],
           "ok": not found["in_loop"] and not found["stopped_at_read"]}
    if where.type == "cuda":
        row["cuda_sync_warnings"] = {n: len(cuda_sync_warnings(lambda: run(n))) for n in (2, 4)}
    return row


# ----------------------------------------------------------------------------- sampling


def part_sampling(sizes: dict, emit: Emitter, compile_backend: str | None = None) -> None:
    """Ours vs DiTPipeline (eager), or ours compiled vs ours eager: warm-up and every timed run emitted."""
    from bench import sampling

    args = sampling.parse_args(sizes["sampling"])
    sides = sampling.build_sides(args, diffusers=compile_backend is None, compile_backend=compile_backend)
    names = ["ours", "diffusers"] if compile_backend is None else ["ours", "ours eager"]
    emit("config", model=args.model, image_size=args.image_size, batch=args.batch, steps=args.steps,
         guidance=args.guidance, dtype=args.dtype, flop_per_call=sampling.dit_flop(sides["model"], args),
         compile=compile_backend or "off", **_device_info())
    images = {}
    for name in names:  # warm-up: allocations, cuDNN / SDPA kernel choice, and the compilation
        for _ in range(args.warmup):
            seconds, images[name] = sampling.timed(sides[name], args.device)
            emit("warmup", side=name, seconds=seconds)
    for run in range(args.repeats):  # alternate the sides so anything else on the machine hits both alike
        for name in names:
            seconds, images[name] = sampling.timed(sides[name], args.device)
            emit("run", side=name, run=run, seconds=seconds, images_per_s=args.batch / seconds)
    if len(images) == 2:
        a, b = (images[n].float().cpu() for n in names)
        emit("parity", max_abs_image_diff=(a - b).abs().max().item(), sides=names)


# ----------------------------------------------------------------------------- fine-tuning


def part_finetune(sizes: dict, emit: Emitter, compile_backend: str | None = None) -> None:
    """Each method on its own: step time, images/s, peak memory; with a backend, eager then compiled.
    A batch that does not fit is halved until it does (the row says which batch ran)."""
    from bench import finetune_step as fs

    args = fs.parse_args(sizes["finetune"])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base, batch = fs.base_and_batch(args.model, args.image_size, args.latent_factor, args.batch, args.scenarios,
                                    device)
    emit("config", model=args.model, image_size=args.image_size, batch=args.batch, dtype=args.dtype,
         steps=args.steps, warmup=args.warmup, **_device_info())
    methods = COMPILED_METHODS if compile_backend else METHODS
    for name in methods:
        for backend in ([None, compile_backend] if compile_backend else [None]):
            while True:
                try:
                    row = fs.measure_alone(name, base, args, batch, device, backend)
                    emit("method", **row)
                    break
                except torch.cuda.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    if args.batch == 1:
                        emit("method", method=name, compile=backend or "off", error="out of memory at batch 1")
                        break
                    args.batch //= 2
                    batch = {k: v[:args.batch] for k, v in batch.items()}
                    emit("note", text=f"{name}: out of memory, batch halved to {args.batch}")


# ----------------------------------------------------------------------------- encode


def part_encode(sizes: dict, emit: Emitter) -> None:
    """The Ray Data encode pipeline vs the codec alone on preloaded tensors (NHWC and NCHW)."""
    missing = _missing("ray", "diffusers")
    if missing:
        emit("skip", reason=f"python module {missing!r} is not installed on this machine")
        return
    import ray

    from bench import encode as be

    ns = argparse.Namespace(**sizes["encode"])
    tmp = tempfile.mkdtemp(prefix="gpu-suite-encode-")
    try:
        data_root, out_root = os.path.join(tmp, "ds"), os.path.join(tmp, "out")
        t0 = time.perf_counter()
        be.make_dataset(data_root, ns)
        source = be.make_codec_dir(ns.codec, tmp)
        emit("config", frames=ns.num, resolution=ns.resolution, codec=ns.codec, encode_batch=ns.encode_batch,
             setup_s=time.perf_counter() - t0, **_device_info())
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        be.run_encode(be.encode_job(ns, data_root, f"{out_root}/warm", source, limit=8))  # actors, Ray Data
        seconds, first, summary = be.time_pipeline(be.encode_job(ns, data_root, f"{out_root}/pipe", source))
        steady = (summary["encoded"] - ns.encode_batch) / max(seconds - first, 1e-9)
        emit("pipeline", frames=summary["encoded"], seconds=seconds, images_per_s=summary["encoded"] / seconds,
             first_rows_s=first, after_startup_images_per_s=steady)
        job = be.encode_job(ns, data_root, f"{out_root}/alone", source)
        for layout, flag in (("default (NHWC)", None), ("NCHW", False)):
            emit("codec_alone", layout=layout, images_per_s=be.codec_alone(job, max(ns.num, 4 * ns.encode_batch),
                                                                            channels_last=flag))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- serve and detect


def part_serve(sizes: dict, emit: Emitter) -> None:
    """Batched vs unbatched Serve deployments under 32 concurrent clients."""
    missing = _missing("ray", "httpx", "fastapi", "diffusers")
    if missing:
        emit("skip", reason=f"python module {missing!r} is not installed on this machine")
        return
    from bench import serve as bs

    args = bs.parse_args(sizes["serve"])
    emit("config", model=args.model, latent_size=args.latent_size, steps=args.steps, requests=args.requests,
         concurrency=args.concurrency, **_device_info())
    bs.measure(args, emit=lambda row: emit("load", **row))


def part_detect(sizes: dict, emit: Emitter) -> None:
    """The detector's training images/s, once the detect job exists: it plugs in as bench/detect.py's
    `suite_part(dry_run: bool, emit)`."""
    if importlib.util.find_spec("drivedit.detect") is None:
        emit("skip", reason="not available: drivedit.detect is not in this checkout")
        return
    if importlib.util.find_spec("bench.detect") is None or not hasattr(importlib.import_module("bench.detect"),
                                                                        "suite_part"):
        emit("skip", reason="not available: drivedit.detect exists but bench/detect.py defines no "
                            "suite_part(dry_run, emit) for the suite to call")
        return
    importlib.import_module("bench.detect").suite_part(sizes is SIZES["dry"], emit)


PARTS = {
    "checks": part_checks,
    "sampling": part_sampling,
    "finetune": part_finetune,
    "finetune_compiled": lambda sizes, emit: part_finetune(sizes, emit, sizes["compile_backend"]),
    "sampling_compiled": lambda sizes, emit: part_sampling(sizes, emit, sizes["compile_backend"]),
    "encode": part_encode,
    "serve": part_serve,
    "detect": part_detect,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--rows", type=Path, required=True, help="JSON-lines file the part appends to")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU shapes")
    args = p.parse_args(argv)
    # the suite stops a part at its cap with SIGTERM: unwind so `finally` blocks (ray.shutdown) run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run on a GPU, or pass --dry-run for the CPU shapes")
    emit = Emitter(args.rows, args.part)
    PARTS[args.part](SIZES["dry" if args.dry_run else "gpu"], emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
