"""Benchmark: the tiny DiT's training step on cores it shares, with GNU OpenMP's default barrier spinning (the
baseline) against the short spin count a local Ray's workers now get (drivedit.raylocal.SHARED_CORE_OPENMP_ENV),
against no spinning, and against one thread.

Each arm is a fresh process (OpenMP reads its environment once, at load), alone and then beside `--busy` plain
busy loops (a neighbour's work at the same priority); the arms alternate, `--repeats` times, and the median
images/s of each is compared with the baseline's in the same condition.

    python bench/shared_cores.py                 # 2 busy loops, 3 repeats
    python bench/shared_cores.py --busy 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivedit.raylocal import SHARED_CORE_OPENMP_ENV  # noqa: E402

# one arm's measurement, run in its own process: forward + backward of the shipped DiT-T/4 at batch 32
STEP = """
import time, torch
from drivedit.models.checkpoint import load_dit
torch.set_num_threads({threads})
m = load_dit("builtin:tiny-dit")
x = torch.randn(32, 4, 32, 32); t = torch.randint(0, 1000, (32,)); y = torch.randint(0, 10, (32,))
def step():
    m(x, t, y).square().mean().backward()
for _ in range(3):
    step()
t0 = time.perf_counter()
for _ in range({steps}):
    step()
print(32 * {steps} / (time.perf_counter() - t0))
"""

ARMS = {  # name: (torch threads, OpenMP environment)
    "default spinning (baseline)": (2, {}),
    f"GOMP_SPINCOUNT={SHARED_CORE_OPENMP_ENV['GOMP_SPINCOUNT']} (a local Ray's workers)": (2, SHARED_CORE_OPENMP_ENV),
    "GOMP_SPINCOUNT=0": (2, {"GOMP_SPINCOUNT": "0"}),
    "one thread": (1, {}),
}


def measure(threads: int, env: dict, steps: int) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", STEP.format(threads=threads, steps=steps)], check=True,
                         capture_output=True, text=True, env={**clean, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def condition(busy: int, repeats: int, steps: int) -> dict:
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        rates = {name: [] for name in ARMS}
        for _ in range(repeats):
            for name, (threads, env) in ARMS.items():
                rates[name].append(measure(threads, env, steps))
    finally:
        for p in loops:
            p.kill()
    base = statistics.median(rates["default spinning (baseline)"])
    return {name: {"img_s": [round(r, 1) for r in v], "median": round(statistics.median(v), 1),
                   "ratio": round(statistics.median(v) / base, 2)} for name, v in rates.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, default=2, help="busy loops beside the step in the shared condition")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15, help="timed training steps per measurement")
    args = ap.parse_args(argv)
    result = {"cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
              "alone": condition(0, args.repeats, args.steps),
              f"beside {args.busy} busy loops": condition(args.busy, args.repeats, args.steps)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
