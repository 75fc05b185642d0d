"""Guidance in a limited interval: the demo's generation guided at every step vs only where sigma lies in (lo, hi].

Kynkaenniemi et al. 2024 ("Applying guidance in a limited interval improves sample and distribution quality")
find classifier-free guidance harmful at high noise and idle at low noise. `sampler.guidance_interval` guides
only the steps whose sigma = sqrt((1 - abar_t) / abar_t) lies in (lo, hi]; the others run one plain
conditional forward (with a layout: e(y, L) alone instead of three forwards).

`--run` is a finished demo folder (`make demo` writes runs/demo; `python jobs/demo.py --out DIR`): its scenes,
the model its fine-tune registered and the scenario classifier its eval trained. Every arm runs the demo's own
generate step (configs/demo/generate.yaml: the layouts of the first `--per-scenario` real frames under every
scenario, DDPM 50, guidance 4, layout guidance 4, the same seeds) into <out>/<arm>/, then is scored against the
real frames with that classifier and the classifier-free scene check. The first arm (`none`: every step guided)
is the baseline; wall times are given as ratios to it.

    python bench/guidance_interval.py --run runs/demo --out runs/bench-guidance-interval \
        --intervals none 0.28,5.42 0.28,3 0,3 0.5,2 0.28,20

Writes <out>/result.json and prints the table BENCHMARKS.md records.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def parse_interval(text: str) -> tuple[float, float] | None:
    if text == "none":
        return None
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished demo folder (demo.json, scenes/, eval/)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--intervals", nargs="+", default=["none", "0.28,5.42", "0.28,3"],
                   help="LO,HI in sigma, or `none` (every step); the first is the baseline")
    p.add_argument("--per-scenario", type=int, default=30, help="real frames whose layouts each scenario renders")
    p.add_argument("--sampler-steps", type=int, default=50)
    args = p.parse_args(argv)
    args.intervals = [(name, parse_interval(name)) for name in args.intervals]
    return args


def generate_arm(run: Path, demo: dict, interval, out: Path, args) -> float:
    """The demo's generate step with `interval`; its wall seconds (sampler actors started each time)."""
    from drivedit.config import load_config
    from drivedit.config.generate import GenerateJob
    from drivedit.demo import DEMO_CONFIGS
    from drivedit.generate.job import run_generate

    layouts = {"source": str(run / "scenes" / "labels.json"), "images": str(run / "scenes" / "images"),
               "scenarios": demo["finetune"]["scenarios"], "limit": args.per_scenario}
    job = load_config(GenerateJob, DEMO_CONFIGS / "generate.yaml", [
        "--model.ref", demo["finetune"]["model_uri"], "--tracking.tracking_uri", demo["finetune"]["tracking_uri"],
        "--spec.balance", "null", "--spec.layouts", json.dumps(layouts),
        "--sampler.steps", str(args.sampler_steps), "--sampler.guidance_interval", json.dumps(interval),
        "--output.uri", str(out)])
    t0 = time.perf_counter()
    run_generate(job)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    from drivedit.demo import local_ray
    from drivedit.eval.evaluate import evaluate_folders

    run, out = args.run.resolve(), args.out.resolve()
    demo = json.loads((run / "demo.json").read_text())
    scenarios = demo["finetune"]["scenarios"]
    rows = []
    for name, interval in args.intervals:
        folder = out / name.replace(",", "-") / "synthetic"
        with local_ray(4):  # a fresh Ray per arm: each starts its sampler actors cold, as the demo's step does
            seconds = generate_arm(run, demo, interval, folder, args)
        report = evaluate_folders(run / "scenes", folder, classifier=run / "eval" / "classifier", image_size=32,
                                  kid_subset_size=min(50, args.per_scenario * len(scenarios)))
        scene = report.get("scene") or {}
        rows.append({"interval": interval, "seconds": round(seconds, 1),
                     "condition_accuracy": report["overall"]["condition_accuracy"], "fid": report["overall"]["fid"],
                     "layout_agreement": scene.get("layout_agreement"), "layout_fd": scene.get("layout_fd"),
                     "per_scenario": {s: {k: report["per_scenario"][s][k] for k in ("condition_accuracy", "fid")}
                                      for s in scenarios}})
        print(f"{name}: {seconds:.1f} s, accuracy {rows[-1]['condition_accuracy']:.3f}, FID {rows[-1]['fid']:.2f}",
              flush=True)
    base = rows[0]["seconds"]
    lines = ["| interval (sigma) | generate s (vs first) | cond. acc | FID | layout agreement | layout FD | "
             + " | ".join(f"{s} acc / FID" for s in scenarios) + " |",
             "|---" * (6 + len(scenarios)) + "|"]
    for r in rows:
        iv = "every step" if r["interval"] is None else f"({r['interval'][0]:g}, {r['interval'][1]:g}]"
        per = " | ".join(f"{r['per_scenario'][s]['condition_accuracy']:.2f} / {r['per_scenario'][s]['fid']:.1f}"
                         for s in scenarios)
        lines.append(f"| {iv} | {r['seconds']:.1f} ({r['seconds'] / base:.2f}x) | {r['condition_accuracy']:.3f} | "
                     f"{r['fid']:.2f} | {r['layout_agreement']:.3f} | {r['layout_fd']:.2f} | {per} |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"run": str(run), "rows": rows, "table": table}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
