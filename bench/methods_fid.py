"""Benchmark: driveditfit against bitfit (and any other method) at the same step budget, on the demo's data.

Each method fine-tunes the shipped tiny DiT on the demo's driving shards with the demo's fine-tuning config
(same steps, batch, learning rate, seed, workers), each with its own published recipe otherwise:
driveditfit with its progressive schedule and small-object weighting, the others with DiT's linear schedule
and a plain loss. Each fine-tuned model then generates the same number of images per scenario with the
generation job (same seeds, sampler and guidance), and every generated set is scored against the real
frames of each scenario with one scenario classifier trained once on the real frames (its features for
FID / KID, its verdict for condition accuracy). Lower FID is better; the ratio is bitfit's FID over
driveditfit's.

    python bench/methods_fid.py                              # the figures in BENCHMARKS.md
    python bench/methods_fid.py --steps 100 --per-scenario 16 --methods driveditfit bitfit lora
    python bench/methods_fid.py --out runs/bench-methods --reuse   # rescore what an earlier run wrote
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from drivedit.demo import DEMO_CONFIGS, SIZES, step_encode, step_scenes  # noqa: E402

METHODS = ("driveditfit", "full", "bitfit", "difffit", "finediffusion", "lora")


def published_recipe(method: str) -> list[str]:
    """Overrides of the demo config (written for driveditfit) that give `method` its own paper's recipe:
    the method's default schedule (METHOD_DEFAULTS) and a plain loss, no small-object weighting."""
    return [] if method == "driveditfit" else ["--method.schedule", "null", "--method.lambda_obj", "1.0"]


def finetune(method: str, out: Path, args) -> dict:
    from drivedit.config import load_config
    from drivedit.config.finetune import FinetuneJob
    from drivedit.train.trainer import run_finetune

    job = load_config(FinetuneJob, DEMO_CONFIGS / "finetune.yaml", [
        "--method.name", method, *published_recipe(method),
        "--data.shards", str(out / "shards"),
        "--run.name", method, "--run.storage_path", str(out / "finetune"),
        "--optim.total_steps", str(args.steps), "--optim.warmup_steps", str(min(20, args.steps // 4)),
        "--run.checkpoint_every", str(args.steps), "--sampling.every_steps", "0",
        "--tracking.experiment", "drivedit-bench-methods", "--tracking.registered_model", f"bench-{method}",
    ])
    t = time.perf_counter()
    result = run_finetune(job)
    result["seconds"] = round(time.perf_counter() - t, 1)
    report = Path(result["run_dir"]) / "method" / "report.json"  # what the method trained, counted
    result["trainable_params"] = json.loads(report.read_text())["counts"]["trainable"]
    return result


def generate(method: str, ft: dict, out: Path, scenarios: list[str], args) -> dict:
    from drivedit.config import load_config
    from drivedit.config.generate import GenerateJob
    from drivedit.generate.job import run_generate

    counts = "{" + ", ".join(f"{s}: {args.per_scenario}" for s in scenarios) + "}"
    job = load_config(GenerateJob, DEMO_CONFIGS / "generate.yaml", [
        "--model.ref", ft["bundle_uri"], "--tracking.tracking_uri", ft["tracking_uri"],
        "--tracking.experiment", "drivedit-bench-methods",
        "--spec.balance", "null", "--spec.counts", counts, "--spec.base_seed", str(args.seed),
        "--sampler.steps", str(args.sampler_steps), "--output.uri", str(out / "synthetic" / method),
    ])
    return run_generate(job)


def score(out: Path, methods: list[str], args) -> dict:
    from drivedit.eval.evaluate import evaluate_folders

    clf_dir = out / "eval" / "classifier"
    reports = {}
    for method in methods:
        kwargs = ({"classifier": clf_dir} if (clf_dir / "classifier.json").exists() or reports else
                  {"train_classifier": True, "save_classifier": clf_dir, "classifier_steps": args.classifier_steps})
        reports[method] = evaluate_folders(out / "scenes", out / "synthetic" / method, image_size=32,
                                           kid_subset_size=min(50, args.per_scenario), seed=args.seed, **kwargs)
    return reports


def table(reports: dict, methods: list[str], scenarios: list[str], baseline: str, ours: str) -> str:
    head = f"{'scenario':<14}" + "".join(f" {'FID ' + m:>17}" for m in methods)
    head += "".join(f" {'acc ' + m:>17}" for m in methods) + f" {'FID ' + baseline + '/' + ours:>22}"
    rows = [head]
    for s in scenarios + ["overall"]:
        get = (lambda m: reports[m]["overall"]) if s == "overall" else (lambda m: reports[m]["per_scenario"][s])
        fids = {m: get(m)["fid"] for m in methods}
        accs = {m: get(m)["condition_accuracy"] for m in methods}
        ratio = fids[baseline] / fids[ours] if fids.get(baseline) and fids.get(ours) else float("nan")
        rows.append(f"{s:<14}" + "".join(f" {fids[m]:>17.2f}" for m in methods)
                    + "".join(f" {accs[m]:>17.3f}" for m in methods) + f" {ratio:>22.2f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-methods"), help="everything goes here")
    ap.add_argument("--methods", nargs="+", default=["driveditfit", "bitfit"], choices=METHODS)
    ap.add_argument("--steps", type=int, default=SIZES["full"].finetune_steps, help="the step budget of every method")
    ap.add_argument("--per-scenario", type=int, default=SIZES["full"].per_scenario, help="generated images per scenario")
    ap.add_argument("--sampler-steps", type=int, default=SIZES["full"].sampler_steps)
    ap.add_argument("--num-scenes", type=int, default=SIZES["full"].num_scenes, help="real frames (the demo's)")
    ap.add_argument("--classifier-steps", type=int, default=SIZES["full"].eval_classifier_steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="keep what --out already holds (runs are resumed or reused)")
    args = ap.parse_args(argv)
    import shutil

    import ray

    out = args.out.resolve()
    if out.exists() and not args.reuse:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        step_scenes(out, dataclasses.replace(SIZES["full"], num_scenes=args.num_scenes), args.seed)
        encoded = step_encode(out)
        runs = {m: finetune(m, out, args) for m in args.methods}
        scenarios = list(runs[args.methods[0]]["scenarios"])
        for m in args.methods:
            generate(m, runs[m], out, scenarios, args)
    finally:
        ray.shutdown()
    reports = score(out, args.methods, args)
    ours = "driveditfit" if "driveditfit" in args.methods else args.methods[0]
    baseline = "bitfit" if "bitfit" in args.methods and ours != "bitfit" else args.methods[-1]
    clf = reports[args.methods[0]]["classifier"]
    result = {
        "command": "python bench/methods_fid.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "steps": args.steps, "per_scenario": args.per_scenario, "real_frames": encoded.get("encoded"),
        "classifier_heldout_accuracy": clf["heldout_accuracy"], "chance": clf["chance"],
        "methods": {m: {"trainable_params": runs[m]["trainable_params"], "finetune_seconds": runs[m]["seconds"],
                        "final_loss": runs[m]["metrics"].get("loss"), "overall": reports[m]["overall"],
                        "per_scenario": reports[m]["per_scenario"]} for m in args.methods},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "methods_fid.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{len(args.methods)} methods, {args.steps} steps each, {args.per_scenario} images per scenario; "
          f"classifier held-out accuracy on real frames {clf['heldout_accuracy']:.3f} (chance {clf['chance']:.3f})")
    print(table(reports, args.methods, scenarios, baseline, ours))
    wins = sum(reports[ours]["per_scenario"][s]["fid"] < reports[baseline]["per_scenario"][s]["fid"] for s in scenarios)
    print(f"{ours} has the lower FID in {wins} of {len(scenarios)} scenarios; written to {out / 'methods_fid.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
