"""Benchmark: the two layout branches (controlnet, light) against the layout-free model at the same step budget,
on the demo's data.

Three fine-tuning runs of the shipped tiny DiT on the demo's driving shards with the demo's driveditfit config
(same steps, batch, learning rate, seed, workers): `plain` (no layout branch, the baseline), `controlnet` and
`light` (driveditfit plus the branch, `--layout.kind`). Then, with the jobs users run:

- trainable parameters: counted by each run's method report;
- step time: one driveditfit step (forward, backward, AdamW) of each model on the same latent batch and layout,
  timed in this process round-robin on one thread (process time, so other processes' load does not enter),
  over plain's;
- layout fidelity: a detector trained on the real frames only (`drivedit detect`, the demo's detect config)
  scores the frames each branch generates from the layouts of held-out real frames (`spec.layouts`: every
  frame under every scenario) against their own labels, and the held-out real frames themselves
  (`detect --eval-only`); fidelity = AP50 generated / AP50 real, per scenario and per object size
  (drivedit/eval/fidelity.py, as `drivedit eval --generated-scores --real-scores` reports it);
- condition accuracy and per-scenario FID of each model's frames against the real frames, with one scenario
  classifier trained once on the real frames; `plain` generates as many frames per scenario (`spec.counts`).

    nice -n 5 python bench/layout.py                               # the figures in BENCHMARKS.md (CPU)
    python bench/layout.py --steps 100 --detector-steps 60 --layout-frames 12   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from drivedit.demo import DEMO_CONFIGS, SIZES, step_encode, step_scenes  # noqa: E402

KINDS = ("plain", "controlnet", "light")  # plain: the layout-free baseline
EXPERIMENT = "drivedit-bench-layout"


def fresh_out(path: Path, reuse: bool) -> Path:
    """The benchmark's folder, emptied unless `reuse`."""
    import shutil

    out = path.resolve()
    if out.exists() and not reuse:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def real_data(out: Path, args) -> None:
    """The demo's procedural 128 px scenes (training, `scenes/`; held out, `scenes-val/`) and their shards;
    what --out already holds is kept (a rerun reuses it, the encode job skips complete shards)."""
    from drivedit.data.scenes import write_scenes_dataset

    step_scenes(out, dataclasses.replace(SIZES["full"], num_scenes=args.num_scenes), args.seed)
    if not (out / "scenes-val" / "labels.json").is_file():
        write_scenes_dataset(str(out / "scenes-val"), num=args.val_scenes, size=128, seed=args.seed + 1)
    step_encode(out)


def finetune(kind: str, out: Path, args) -> dict:
    from drivedit.config import load_config
    from drivedit.config.finetune import FinetuneJob
    from drivedit.train.trainer import run_finetune

    layout = ["--layout.kind", "none" if kind == "plain" else kind]
    job = load_config(FinetuneJob, DEMO_CONFIGS / "finetune.yaml", [
        *layout, "--data.shards", str(out / "shards"),
        "--run.name", kind, "--run.storage_path", str(out / "finetune"),
        "--optim.total_steps", str(args.steps), "--optim.warmup_steps", str(min(20, args.steps // 4)),
        "--run.checkpoint_every", str(args.steps), "--sampling.every_steps", "0",
        "--tracking.experiment", EXPERIMENT, "--tracking.registered_model", f"bench-layout-{kind}",
    ])
    t = time.perf_counter()
    result = run_finetune(job)
    result["seconds"] = round(time.perf_counter() - t, 1)
    report = json.loads((Path(result["run_dir"]) / "method" / "report.json").read_text())
    result["trainable_params"] = report["counts"]["trainable"]
    return result


def detector(out: Path, args) -> dict:
    from drivedit.config import load_config
    from drivedit.config.detect import DetectJob
    from drivedit.detect.job import run_detect

    job = load_config(DetectJob, DEMO_CONFIGS / "detect.yaml", [
        "--data.train", json.dumps([{"uri": str(out / "scenes"), "weight": 1.0}]),
        "--data.val", str(out / "scenes-val"),
        "--optim.total_steps", str(args.detector_steps), "--run.checkpoint_every", str(args.detector_steps),
        "--run.storage_path", str(out / "detect"), "--tracking.experiment", EXPERIMENT,
        "--tracking.registered_model", "bench-layout-detector"])
    return run_detect(job)


def detector_scores(det: dict, folder: Path, out: Path) -> str:
    """`drivedit detect --eval-only --data.val folder` with the trained detector: the scores folder's URI."""
    from drivedit.config import load_config
    from drivedit.config.detect import DetectJob
    from drivedit.detect.job import run_detect

    job = load_config(DetectJob, DEMO_CONFIGS / "detect.yaml", [
        "--model.ref", det["detector_uri"], "--data.val", str(folder), "--run.storage_path", str(out / "detect"),
        "--tracking.enabled", "false"])
    return run_detect(job, eval_only=True)["scores_uri"]


def generate(kind: str, ft: dict, out: Path, scenarios: list[str], args) -> dict:
    from drivedit.config import load_config
    from drivedit.config.generate import GenerateJob
    from drivedit.generate.job import run_generate

    if kind == "plain":  # as many frames per scenario as the branches make from the layouts
        spec = ["--spec.counts", json.dumps({s: args.layout_frames for s in scenarios})]
    else:
        spec = ["--spec.layouts", json.dumps({"source": str(out / "scenes-val" / "labels.json"), "scenarios": scenarios,
                                              "variants": 1, "limit": args.layout_frames,
                                              "layout_guidance": args.layout_guidance})]
    job = load_config(GenerateJob, DEMO_CONFIGS / "generate.yaml", [
        "--model.ref", ft["bundle_uri"], "--tracking.tracking_uri", ft["tracking_uri"],
        "--tracking.experiment", EXPERIMENT, "--spec.balance", "null", *spec, "--spec.base_seed", str(args.seed),
        "--sampler.sampler", "ddim", "--sampler.steps", str(args.sampler_steps),
        "--sampler.guidance", str(args.guidance), "--sampler.guidance_interval", json.dumps(args.guidance_interval),
        "--output.uri", str(out / "synthetic" / kind)])
    return run_generate(job)


def step_times(categories: list[str], scenarios: int, args) -> dict:
    """Median process time of one driveditfit step per model, round-robin over the three; trainable counts."""
    import torch

    from drivedit.config.finetune import LayoutSection
    from drivedit.config.method import MethodConfig
    from drivedit.models.adapter_spec import apply_spec, trainable_names
    from drivedit.models.checkpoint import load_dit
    from drivedit.models.control import LayoutSpec
    from drivedit.train.method_adapters import build_spec

    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process time of one thread: what the step costs, whatever else runs beside it
    base = load_dit("builtin:tiny-dit")
    cfg = base.config
    n = args.time_batch
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size)  # (N, C, h, w)
    t = torch.randint(0, 1000, (n,))
    y = torch.randint(0, scenarios, (n,))
    layout = (torch.rand(n, len(categories), cfg.input_size, cfg.input_size) > 0.8).float()  # (N, K, h, w)
    runs = {}
    for kind in KINDS:
        model = copy.deepcopy(base)
        spec_layout = None if kind == "plain" else LayoutSpec(
            kind, LayoutSection(kind=kind).resolved_depth(len(model.blocks)), list(categories))
        spec = build_spec(model, MethodConfig(name="driveditfit", rank=4), scenarios, layout=spec_layout)
        model = apply_spec(model, spec).train()
        names = set(trainable_names(model, spec))
        params = [p for name, p in model.named_parameters() if name in names]
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        runs[kind] = {"model": model, "opt": torch.optim.AdamW(params, lr=1e-4), "times": [],
                      "kwargs": {} if kind == "plain" else {"layout": layout}}

    def step(r) -> float:
        t0 = time.process_time()
        out = r["model"](x, t, y, **r["kwargs"])  # (N, 2C, h, w)
        loss = (out[:, :cfg.in_channels] - x).pow(2).mean()
        loss.backward()
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=True)
        return time.process_time() - t0

    for i in range(args.time_warmup + args.time_steps):
        for r in runs.values():
            dt = step(r)
            if i >= args.time_warmup:
                r["times"].append(dt)
    torch.set_num_threads(threads)
    med = {k: statistics.median(r["times"]) for k, r in runs.items()}
    return {k: {"step_s": med[k], "vs_plain": med[k] / med["plain"]} for k in KINDS}


def score_images(out: Path, args) -> dict:
    from drivedit.eval.evaluate import evaluate_folders

    clf_dir = out / "eval" / "classifier"
    reports = {}
    for kind in KINDS:
        kwargs = ({"classifier": clf_dir} if reports else
                  {"train_classifier": True, "save_classifier": clf_dir, "classifier_steps": args.classifier_steps})
        reports[kind] = evaluate_folders(out / "scenes", out / "synthetic" / kind, image_size=32,
                                         kid_subset_size=min(50, args.layout_frames), seed=args.seed, **kwargs)
    return reports


def _f(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def report(result: dict, scenarios: list[str]) -> str:
    k = result["kinds"]
    lines = [f"{'':<28}" + "".join(f"{kind:>13}" for kind in KINDS)]

    def row(name, get, spec=".3f"):
        lines.append(f"{name:<28}" + "".join(f"{_f(get(kind), spec):>13}" for kind in KINDS))

    row("trainable params", lambda m: k[m]["trainable_params"], ",d")
    row("step time (ms)", lambda m: 1000 * k[m]["step_s"], ".1f")
    row("step time / plain", lambda m: k[m]["step_vs_plain"], ".2f")
    row("layout fidelity", lambda m: (k[m].get("fidelity") or {}).get("fidelity"))
    row("  AP50 generated", lambda m: (k[m].get("fidelity") or {}).get("ap50_generated"))
    row("  boxes to find", lambda m: (k[m].get("fidelity") or {}).get("num_boxes_generated"), "d")
    row("fidelity, all boxes", lambda m: ((k[m].get("fidelity") or {}).get("all_boxes") or {}).get("fidelity"))
    for s in scenarios:
        row(f"  fidelity {s}", lambda m, s=s: ((k[m].get("fidelity") or {}).get("per_scenario", {}).get(s) or {}).get("fidelity"))
    for size in ("small", "medium", "large"):
        row(f"  fidelity {size}", lambda m, z=size: ((k[m].get("fidelity") or {}).get("per_size", {}).get(z) or {}).get("fidelity"))
    row("condition accuracy", lambda m: k[m]["overall"]["condition_accuracy"])
    row("  vs plain", lambda m: k[m]["overall"]["condition_accuracy"] - k["plain"]["overall"]["condition_accuracy"], "+.3f")
    row("FID", lambda m: k[m]["overall"]["fid"], ".2f")
    for s in scenarios:
        row(f"  FID {s}", lambda m, s=s: k[m]["per_scenario"][s]["fid"], ".2f")
        row(f"  cond. acc. {s}", lambda m, s=s: k[m]["per_scenario"][s]["condition_accuracy"])
    lines.append(f"detector AP50 on {result['real_frames_val']} held-out real frames: {_f(result['ap50_real'])}; "
                 f"scenario classifier held-out accuracy {_f(result['classifier_heldout_accuracy'])}")
    return "\n".join(lines)


def shared_args(ap: argparse.ArgumentParser) -> None:
    """The options this benchmark and bench/transfer_strength.py share: what they build in --out, and how."""
    ap.add_argument("--out", type=Path, default=Path("runs/bench-layout"),
                    help="everything goes here (bench/layout.py and bench/transfer_strength.py share it)")
    ap.add_argument("--reuse", action="store_true", help="keep what --out already holds (runs resume or are reused)")
    ap.add_argument("--steps", type=int, default=500, help="fine-tuning steps of every model (the same budget)")
    ap.add_argument("--detector-steps", type=int, default=300, help="training steps of the real-only detector")
    ap.add_argument("--num-scenes", type=int, default=600, help="real training frames")
    ap.add_argument("--val-scenes", type=int, default=100, help="held-out real frames (detector validation)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--sampler-steps", type=int, default=25, help="DDIM steps (SDEdit runs the last s of them)")
    ap.add_argument("--classifier-steps", type=int, default=SIZES["full"].eval_classifier_steps)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    ap.add_argument("--seed", type=int, default=0)


def start(args) -> tuple[Path, float]:
    """Threads, the --out folder and a local Ray for the jobs: (out, start time)."""
    import ray
    import torch

    torch.set_num_threads(args.threads)
    out = fresh_out(args.out, args.reuse)
    t0 = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False)
    return out, t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared_args(ap)
    ap.add_argument("--layout-frames", type=int, default=24,
                    help="held-out frames whose layouts each branch renders under every scenario")
    ap.add_argument("--layout-guidance", type=float, default=2.0,
                    help="2: what BENCHMARKS.md's tables recorded (the generate job's default is 4 since)")
    ap.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="guide only the steps with sigma in (LO, HI] (sampler.guidance_interval); default: every step")
    ap.add_argument("--time-steps", type=int, default=10, help="timed steps per model (median)")
    ap.add_argument("--time-warmup", type=int, default=2)
    ap.add_argument("--time-batch", type=int, default=16)
    args = ap.parse_args(argv)
    import ray

    from drivedit.data.shards import read_shard_metadata
    from drivedit.eval.fidelity import dataset_ignore_under, layout_fidelity

    out, t0 = start(args)
    try:
        real_data(out, args)
        runs = {kind: finetune(kind, out, args) for kind in KINDS}
        scenarios = list(runs["plain"]["scenarios"])
        for kind in KINDS:
            generate(kind, runs[kind], out, scenarios, args)
        det = detector(out, args)
        real_scores = detector_scores(det, out / "scenes-val", out)
        gen_scores = {kind: detector_scores(det, out / "synthetic" / kind, out) for kind in KINDS[1:]}
    finally:
        ray.shutdown()
    timing = step_times(read_shard_metadata(str(out / "shards")).box_categories, len(scenarios), args)
    images = score_images(out, args)
    fidelity = {kind: layout_fidelity(gen_scores[kind], real_scores,
                                      dataset_ignore_under(str(out / "synthetic" / kind), gen_scores[kind]))
                for kind in KINDS[1:]}
    clf = images["plain"]["classifier"]
    result = {
        "command": "python bench/layout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "steps": args.steps, "detector_steps": args.detector_steps, "layout_frames": args.layout_frames,
        "real_frames_val": args.val_scenes, "ap50_real": fidelity["light"]["ap50_real"],
        "classifier_heldout_accuracy": clf["heldout_accuracy"],
        "kinds": {kind: {"trainable_params": runs[kind]["trainable_params"], "finetune_seconds": runs[kind]["seconds"],
                         "final_loss": runs[kind]["metrics"].get("loss"), "step_s": timing[kind]["step_s"],
                         "step_vs_plain": timing[kind]["vs_plain"], "fidelity": fidelity.get(kind),
                         "overall": images[kind]["overall"], "per_scenario": images[kind]["per_scenario"]}
                  for kind in KINDS},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "layout.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{args.steps} fine-tuning steps each; {args.layout_frames} held-out layouts x {len(scenarios)} scenarios "
          f"per model; detector {args.detector_steps} steps on real frames only; {result['seconds']:.0f} s")
    print(report(result, scenarios))
    for kind in KINDS[1:]:
        f, a = fidelity[kind]["fidelity"], fidelity[kind]["all_boxes"]["fidelity"]
        print(f"{kind}: layout fidelity {_f(f)} on the boxes it labels as objects (under "
              f"{fidelity[kind]['ignore_under']:g} px: ignore regions), {_f(a)} on every layout box (goal >= 0.8: "
              f"{'met' if f is not None and f >= 0.8 else 'missed'}, {'met' if a is not None and a >= 0.8 else 'missed'})")
    print(f"written to {out / 'layout.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
