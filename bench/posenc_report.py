"""The tables of `bench/posenc.py`: per encoding, mean ± half-range over seeds and the ratio to `abs`, from the
rows the runs appended to OUT/rows.jsonl; and the per-step cost of each encoding."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

BASELINE = "abs"
METRICS = [("heldout_loss", "held-out loss"), ("heldout_mse", "held-out eps MSE"), ("train_loss", "train loss"),
           ("fid", "FID (classifier features)"), ("kid", "KID"), ("condition_accuracy", "condition accuracy")]


def read_rows(out: Path) -> list[dict]:
    path = out / "rows.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the others stand
            continue
    return rows


def _stat(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def table(out: Path, info: dict | None = None) -> str:
    """A markdown table: one line per (step, metric), a column per encoding, then the ratios to abs."""
    if info is None and (out / "results.json").exists():
        info = json.loads((out / "results.json").read_text())
    info = info or {}
    rows = read_rows(out)
    posencs = [p for p in ("abs", "rope", "gta") if any(r["posenc"] == p for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    lines = []
    if info:
        plan = info.get("plan") or {}
        lines.append(f"`{info.get('command')}` on {info.get('name')} (load average {info.get('load_avg', 0):.1f} "
                     f"at start); {plan.get('steps')} steps at batch {info.get('batch')}, warmup {plan.get('warmup')}, "
                     f"EMA {plan.get('ema')}; wall {info.get('wall_s', 0):.0f}s")
    lines.append(f"\nmean ± half-range over seeds {seeds}; ratio = encoding / {BASELINE}\n")
    others = [p for p in posencs if p != BASELINE]
    lines.append("| step | metric | " + " | ".join(posencs) + " | " + " | ".join(f"{p} / {BASELINE}" for p in others) + " |")
    lines.append("|---" * (2 + len(posencs) + len(others)) + "|")
    for step in sorted({r["step"] for r in rows}):
        for key, title in METRICS:
            cells, means = [], {}
            for pe in posencs:
                vals = [r[key] for r in rows if r["posenc"] == pe and r["step"] == step and r.get(key) is not None]
                if not vals:
                    cells.append("–")
                    continue
                means[pe], spread = _stat(vals)
                cells.append(f"{means[pe]:.4g} ± {spread:.2g}" if len(vals) > 1 else f"{means[pe]:.4g} (1 seed)")
            if not means:
                continue
            ratios = [f"{means[p] / means[BASELINE]:.3f}" if p in means and means.get(BASELINE) else "–" for p in others]
            lines.append(f"| {step} | {title} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    status = info.get("status") or {}
    if status:
        lines.append("\nruns: " + ", ".join(f"{n} {s}" for n, s in sorted(status.items())))
    return "\n".join(lines)


def write_results(args, info: dict) -> str:
    """results.json (settings, material, plan, status, every row) and results.md, each written whole."""
    from drivedit import storage

    rows = read_rows(args.out)
    info = {**info, "wall_s": round(info.get("wall_s", 0), 1), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                           time.gmtime())}
    storage.write_bytes_atomic(str(args.out / "results.json"), json.dumps({**info, "rows": rows}, indent=1,
                                                                          default=str).encode())
    md = table(args.out, info)
    storage.write_bytes_atomic(str(args.out / "results.md"), (md + "\n").encode())
    return md


def step_cost(args) -> str:
    """Seconds per optimizer step (forward, backward, AdamW) of the same DiT-T/4 on 32x32x4 latents under each
    encoding, round-robin in this process: process time on a CPU, CUDA-synchronised wall time on a GPU."""
    import statistics

    from drivedit.models.diffusion import GaussianDiffusion, linear_betas
    from drivedit.models.dit import build_dit, dit_config

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    diffusion = GaussianDiffusion(linear_betas())
    runs = {}
    for pe in args.posencs:
        torch.manual_seed(0)
        model = build_dit(dit_config("DiT-T/4", input_size=32, in_channels=4, num_classes=14, posenc=pe)).to(device)
        runs[pe] = (model.train(), torch.optim.AdamW(model.parameters(), 1e-4), [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, 32, 32, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    y = torch.randint(0, 14, (args.batch,), generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    clock = time.perf_counter if cuda else time.process_time
    for i in range(args.cost + 2):
        for model, opt, times in runs.values():
            if cuda:
                torch.cuda.synchronize()
            t0 = clock()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = diffusion.training_losses(model, x, t, {"y": y}, noise)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(clock() - t0)
    med = {pe: statistics.median(times) for pe, (_, _, times) in runs.items()}
    base = med.get(BASELINE, next(iter(med.values())))
    where = torch.cuda.get_device_name(0) if cuda else f"{args.threads} thread(s), CPU process time"
    return "\n".join([f"step cost, DiT-T/4 at 32x32x4, batch {args.batch}, {where}, median of {args.cost} "
                      f"round-robin steps (load average {os.getloadavg()[0]:.1f})"] +
                     [f"{pe:>5} {m * 1000:.2f} ms  {m / base:.2f}x {BASELINE}" for pe, m in med.items()])
