"""Fine-tuning step cost per method against `full`: the job's step (forward + backward, gradient clipping, AdamW,
EMA), same model and batch.

Every method adapts a copy of the same randomly initialised DiT (no checkpoint download) and trains
on the same latent batch with the DiT loss (eps MSE + VLB) at the same timesteps, one method after
the other in this one process. Reported per method: median step time over the timed steps, the
speed-up over `full` (full's time / the method's), trainable parameters, the optimizer's state
(measured from its tensors) and, on CUDA, the peak memory allocated during a step with only that
method resident (a separate pass). The timed steps go round-robin over all methods, so load from
other processes on a shared machine slows every method alike.

    python bench/finetune_step.py                     # CPU: DiT-T/2, 64 px latents 8x8, batch 8, fp32
    python bench/finetune_step.py --preset gpu        # CUDA: DiT-XL/2, 256 px (32x32 latents), batch 32, bf16
    python bench/finetune_step.py --methods full driveditfit --steps 5
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._common import apply_preset  # noqa: E402

METHODS = ("full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit")
PRESETS = {
    "cpu": dict(model="DiT-T/2", image_size=64, latent_factor=8, batch=8, dtype="float32", device="cpu", steps=5),
    "gpu": dict(model="DiT-XL/2", image_size=256, latent_factor=8, batch=32, dtype="bfloat16", device="cuda",
                steps=20),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="cpu (default without a GPU) or gpu; the flags below override it")
    p.add_argument("--model", help="registry size, e.g. DiT-T/2, DiT-XL/2")
    p.add_argument("--image-size", type=int)
    p.add_argument("--latent-factor", type=int, help="codec downsampling factor (8: SD VAE)")
    p.add_argument("--batch", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="autocast dtype (fp32 master weights)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to measure (full is always included: it is the baseline)")
    p.add_argument("--rank", type=int, default=4, help="modulator / LoRA rank")
    p.add_argument("--scenarios", type=int, default=6)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = p.parse_args(argv)
    apply_preset(args, PRESETS)
    if "full" not in args.methods:
        args.methods = ["full"] + args.methods
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    if args.dtype == "bfloat16" and args.device != "cuda":
        p.error("--dtype bfloat16 is for CUDA; use float32 on CPU")
    if args.image_size % args.latent_factor:
        p.error("--image-size must be a multiple of --latent-factor")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


class Runner:
    """One method's adapted copy of the base, its optimizer and a `step()` on the shared batch."""

    def __init__(self, name: str, base, args, batch: dict, device: torch.device, compile: str | None = None):
        from drivedit.config.method import MethodConfig
        from drivedit.models.diffusion import GaussianDiffusion, linear_betas
        from drivedit.train.method_adapters import apply_method
        from drivedit.train.state import EMA

        self.name, self.batch, self.device = name, batch, device
        model = copy.deepcopy(base)
        kw = {"rank": args.rank} if name in ("lora", "driveditfit") else {}
        self.result = apply_method(model, MethodConfig(name=name, scenario_init="random", **kw),
                                   [f"s{i}" for i in range(args.scenarios)])
        self.model = model.to(device).train()
        # as the fine-tuning job: fused AdamW on CUDA, torch.compile of the model when asked (a backend name)
        self.forward = torch.compile(self.model, backend=compile) if compile else self.model
        self.opt = torch.optim.AdamW(self.result.param_groups(1e-4, 0.0), fused=device.type == "cuda")
        self.diffusion = GaussianDiffusion(linear_betas())
        self.ema = EMA(self.result.trainable, 0.9999)
        self.amp = args.dtype == "bfloat16"
        self.times: list[float] = []

    def step(self) -> None:
        b = self.batch
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext():
            loss = self.diffusion.training_losses(self.forward, b["x"], b["t"], {"y": b["y"]}, b["noise"])["loss"]
        loss.mean().backward()
        # the rest of the job's step (drivedit/train/loop.py): clip (unbounded by default), AdamW, EMA
        torch.nn.utils.clip_grad_norm_(list(self.result.trainable.values()), float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.result.trainable)

    def timed_step(self) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        self.times.append(time.perf_counter() - t0)

    def summary(self) -> dict:
        return {"method": self.name, "step_s": statistics.median(self.times) if self.times else None,
                "trainable": sum(p.numel() for p in self.result.trainable.values()),
                "optimizer_state_bytes": _state_bytes(self.opt)}

    def free(self) -> None:
        del self.model, self.forward, self.opt, self.result, self.ema
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def peak_memory(name: str, base, args, batch: dict, device: torch.device) -> int:
    """CUDA bytes at the peak of a step with only this method resident (after a warm-up step)."""
    runner = Runner(name, base, args, batch, device)
    runner.step()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    runner.free()
    return peak


def timings(args, base, batch: dict, device: torch.device) -> list[dict]:
    """Step times with every method resident, round-robin, so a busy machine slows all of them alike."""
    runners = [Runner(name, base, args, batch, device) for name in args.methods]
    for _ in range(args.warmup):
        for r in runners:
            r.step()
    for _ in range(args.steps):
        for r in runners:
            r.timed_step()
    rows = [r.summary() for r in runners]
    for r in runners:
        r.free()
    return rows


def base_and_batch(model: str, image_size: int, latent_factor: int, batch: int, scenarios: int,
                   device: torch.device, **overrides) -> tuple:
    """A random registry DiT (every weight non-zero; `overrides` change its config) and one latent batch on
    `device`."""
    from drivedit.models.dit import build_dit, dit_config

    torch.manual_seed(0)
    cfg = dit_config(model, input_size=image_size // latent_factor, **overrides)
    base = build_dit(cfg)
    with torch.no_grad():  # non-zero everywhere, so no branch is skipped by adaLN-zero's zeros
        for n, p in base.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    data = {"x": torch.randn(shape, generator=g).to(device), "noise": torch.randn(shape, generator=g).to(device),
            "t": torch.randint(0, 1000, (batch,), generator=g).to(device),
            "y": torch.randint(0, scenarios, (batch,), generator=g).to(device)}
    return base, data


def measure_alone(name: str, base, args, batch: dict, device: torch.device, compile: str | None = None) -> dict:
    """One method resident on its own: `args.warmup` steps (compilation included), then `args.steps` steps
    timed together with one synchronisation at each end (the GPU queue stays full, as in training).
    Returns step time, images/s and, on CUDA, the peak memory of the timed steps."""
    runner = Runner(name, base, args, batch, device, compile)
    try:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            runner.step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            runner.step()
        _sync(device)
        step_s = (time.perf_counter() - t0) / args.steps
        row = runner.summary() | {"step_s": step_s, "images_per_s": args.batch / step_s, "warmup_s": warm_s,
                                  "batch": args.batch, "compile": compile or "off"}
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return row
    finally:
        runner.free()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base, batch = base_and_batch(args.model, args.image_size, args.latent_factor, args.batch, args.scenarios, device)
    cfg = base.config
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"finetune step: {args.model} at {args.image_size} px (latent {cfg.input_size}x{cfg.input_size}), "
          f"batch {args.batch}, {args.dtype}, {where}; median of {args.steps} round-robin steps after {args.warmup} warm-up")
    peaks = {n: peak_memory(n, base, args, batch, device) for n in args.methods} if device.type == "cuda" else {}
    rows = timings(args, base, batch, device)
    for r in rows:
        r["peak_bytes"] = peaks.get(r["method"])
    full = next(r for r in rows if r["method"] == "full")
    print(f"{'method':<14} {'step ms':>9} {'speed-up':>9} {'trainable':>14} {'optim state MB':>15} {'peak MB':>9}"
          f" {'peak vs full':>12}")
    for r in rows:
        r["speedup_vs_full"] = full["step_s"] / r["step_s"]
        peak = f"{r['peak_bytes'] / 2**20:>9.0f}" if r["peak_bytes"] is not None else f"{'n/a':>9}"
        ratio = f"{r['peak_bytes'] / full['peak_bytes']:>12.2f}" if r["peak_bytes"] is not None else f"{'n/a':>12}"
        print(f"{r['method']:<14} {1000 * r['step_s']:>9.1f} {r['speedup_vs_full']:>8.2f}x {r['trainable']:>14,} "
              f"{r['optimizer_state_bytes'] / 2**20:>15.1f} {peak} {ratio}")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "json"},
                                         "device": where, "results": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
