"""What the SDEdit strength s of a condition transfer does to label survival and to condition accuracy, in the
128 px tiny-VAE world, with the jobs users run.

Held-out real frames (procedural 128 px scenes with boxes) are re-rendered by the generate job's
`spec.transfer` into target scenarios at each strength s, by the layout-free driveditfit model that
bench/layout.py fine-tunes on the demo's data (this script trains it, or reuses it from the same --out):

- label survival: a detector trained on the real frames only (`drivedit detect`) scores the transferred frames
  against their carried labels and the original frames against theirs (`detect --eval-only`); survival =
  AP50 transferred / AP50 original (drivedit/eval/survival.py, as `drivedit eval --transferred-scores` reports);
- condition accuracy: the share of transferred frames a scenario classifier trained on the real frames
  assigns to the target; the baseline, in the same run, is plain sampling of the same targets (`spec.counts`,
  same seeds, sampler and guidance), whose accuracy each strength's is divided by.

Layout-guided transfer (`--model light --layout-guidance 4`): the same strengths by a model with a layout branch
(bench/layout.py's `light` or `controlnet` run), steered by the branch on each source frame's carried boxes
(`spec.transfer.layout_guidance`). Every run also scores the named baselines in the same process: plain SDEdit by
the layout-free model (arm `plain`) and, with --model, by the branch model with its branch silent.

    nice -n 5 python bench/transfer_strength.py --out runs/bench-layout --reuse    # after bench/layout.py
    nice -n 5 python bench/transfer_strength.py --out runs/bench-layout --reuse --model light --layout-guidance 4
    python bench/transfer_strength.py --strengths 0.2 0.6 1.0 --frames 12           # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.layout import (EXPERIMENT, KINDS, detector, detector_scores, finetune, real_data,  # noqa: E402
                          shared_args, start)
from drivedit.demo import DEMO_CONFIGS  # noqa: E402


def source_subset(out: Path, frames: int) -> Path:
    """The first `frames` held-out frames as their own BDD100K folder (the originals survival divides by)."""
    from drivedit.data.bdd100k import load_label_file, write_label_file

    folder = out / f"transfer-sources-{frames}"
    if not (folder / "labels.json").is_file():
        chosen = [f for f in load_label_file(str(out / "scenes-val" / "labels.json")) if f.boxes][:frames]
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for f in chosen:
            shutil.copy(out / "scenes-val" / "images" / f.name, folder / "images" / f.name)
        write_label_file(chosen, str(folder / "labels.json"))
    return folder


def generate(ft: dict, out: Path, name: str, spec: list[str], args) -> Path:
    from drivedit.config import load_config
    from drivedit.config.generate import GenerateJob
    from drivedit.generate.job import run_generate

    uri = out / "transfer" / name
    job = load_config(GenerateJob, DEMO_CONFIGS / "generate.yaml", [
        "--model.ref", ft["bundle_uri"], "--tracking.tracking_uri", ft["tracking_uri"],
        "--tracking.experiment", EXPERIMENT, "--spec.balance", "null", *spec, "--spec.base_seed", str(args.seed),
        "--sampler.sampler", "ddim", "--sampler.steps", str(args.sampler_steps),
        "--sampler.guidance", str(args.guidance), "--sampler.guidance_interval", "null",  # as BENCHMARKS.md recorded
        "--output.uri", str(uri)])
    run_generate(job)
    return uri


def condition_accuracy(out: Path, folder: Path, args) -> tuple[float, float]:
    """(share of the folder's frames the scenario classifier assigns to the scenario they were made for, the
    classifier's held-out accuracy): drivedit eval's classifier, trained once on the real frames and kept."""
    from drivedit.eval.evaluate import evaluate_folders

    clf_dir = out / "eval" / "classifier"
    kwargs = ({"classifier": clf_dir} if (clf_dir / "classifier.json").is_file() else
              {"train_classifier": True, "save_classifier": clf_dir, "classifier_steps": args.classifier_steps})
    report = evaluate_folders(out / "scenes", folder, image_size=32, kid_subset_size=min(50, args.frames),
                              seed=args.seed, **kwargs)
    return report["overall"]["condition_accuracy"], report["classifier"]["heldout_accuracy"]


def arms(args) -> list[tuple[str, str, float | None, str]]:
    """(arm name, fine-tuning run, layout guidance or None, start): the layout-free baseline first, then, with
    --model, the branch model's plain SDEdit and its guided transfers; each with every --starts (an inversion arm's
    name ends in -inv). Arm `plain`'s folders keep their old names."""
    out = [("plain", "plain", None)]
    if args.model != "plain":
        out.append((args.model, args.model, None))
        out += [(f"{args.model}-lg{g:g}", args.model, g) for g in args.layout_guidance]
    return [(name + ("-inv" if begin == "inversion" else ""), kind, lg, begin)
            for begin in args.starts for name, kind, lg in out]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared_args(ap)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    ap.add_argument("--targets", nargs="+", default=["rainy", "snowy", "night"])
    ap.add_argument("--frames", type=int, default=24, help="held-out source frames (each into every target)")
    ap.add_argument("--model", choices=KINDS, default="plain",
                    help="the fine-tuning run (bench/layout.py's) whose transfers are measured beside the layout-free "
                         "baseline: a layout-branch model (light, controlnet) with --layout-guidance")
    ap.add_argument("--layout-guidance", type=float, nargs="*", default=[],
                    help="spec.transfer.layout_guidance values to measure with --model's layout branch")
    ap.add_argument("--starts", nargs="+", choices=["noise", "inversion"], default=["noise"],
                    help="spec.transfer.start values to measure (noise: SDEdit's q_sample; inversion: DDIM inversion)")
    ap.add_argument("--bootstrap", type=int, default=200,
                    help="draws of the bootstrap interval of survival over the source frames, for the rows where "
                         "condition accuracy reaches the goal's 0.8 (0: none)")
    ap.add_argument("--generate-only", action="store_true",
                    help="stop after generating (e.g. while bench/layout.py still trains the detector this reuses)")
    args = ap.parse_args(argv)
    if args.layout_guidance and args.model == "plain":
        ap.error("--layout-guidance needs --model light or controlnet (the layout-free model has no branch)")
    import ray

    from drivedit.eval.fidelity import dataset_ignore_under
    from drivedit.eval.survival import label_survival_from_scores, survival_interval, transfer_sources

    out, t0 = start(args)
    counts = ["--spec.counts", json.dumps({t: args.frames for t in args.targets})]
    try:
        real_data(out, args)
        kinds = dict.fromkeys(k for _, k, _, _ in arms(args))
        runs = {kind: finetune(kind, out, args) for kind in kinds}  # a finished run is returned as it is
        sources = source_subset(out, args.frames)
        plain = {kind: generate(ft, out, "plain" if kind == "plain" else f"{kind}-plain", counts, args)
                 for kind, ft in runs.items()}
        folders = {}
        for arm, kind, lg, begin in arms(args):
            for s in args.strengths:
                spec = {"source": str(sources), "targets": args.targets, "strength": s,
                        **({"layout_guidance": lg} if lg is not None else {}),
                        **({"start": begin} if begin != "noise" else {})}
                name = f"s{s:g}" if arm == "plain" else f"{arm}-s{s:g}"
                folders[arm, s] = generate(runs[kind], out, name, ["--spec.transfer", json.dumps(spec)], args)
        if args.generate_only:
            print(f"generated {len(folders)} transferred sets and {len(plain)} plain ones under {out / 'transfer'}; "
                  f"rerun with --reuse to score them")
            return 0
        det = detector(out, args)
        original_scores = detector_scores(det, sources, out)
        transferred = {key: (folder, detector_scores(det, folder, out)) for key, folder in folders.items()}
    finally:
        ray.shutdown()
    base = {}
    for kind, folder in plain.items():
        base[kind], heldout = condition_accuracy(out, folder, args)
    rows = []
    for (arm, s), (folder, scores) in transferred.items():
        kind, lg, begin = next((k, g, st) for a, k, g, st in arms(args) if a == arm)
        under = dataset_ignore_under(str(folder), scores)
        sv = label_survival_from_scores(scores, original_scores, under)
        acc, _ = condition_accuracy(out, folder, args)
        spread = (survival_interval(scores, original_scores, transfer_sources(str(folder)), under, args.bootstrap,
                                    seed=args.seed) if args.bootstrap and acc >= 0.8 else None)
        rows.append({"arm": arm, "model": kind, "layout_guidance": lg, "start": begin, "strength": s, "condition_accuracy": acc,
                     "vs_plain": acc / base[kind] if base[kind] > 0 else None, "survival": sv["survival"],
                     "ap50_transferred": sv["ap50_transferred"], "ap50_original": sv["ap50_original"],
                     "ignore_under": sv["ignore_under"], "survival_all_boxes": sv["survival_all_boxes"],
                     "survival_interval": spread})
    result = {"command": "python bench/transfer_strength.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "frames": args.frames, "targets": args.targets, "plain_condition_accuracy": base,
              "classifier_heldout_accuracy": heldout, "models": {k: ft["bundle_uri"] for k, ft in runs.items()},
              "detector": det["detector_uri"], "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    name = "transfer_strength.json" if args.model == "plain" else f"transfer_strength-{args.model}.json"
    if args.starts != ["noise"]:
        name = name.replace(".json", "-" + "-".join(args.starts) + ".json")
    (out / name).write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{args.frames} held-out frames x targets {', '.join(args.targets)}; DDIM {args.sampler_steps} steps, "
          f"guidance {args.guidance}; classifier held-out accuracy {heldout:.3f}; detector AP50 on the "
          f"originals {rows[0]['ap50_original']:.3f}; plain sampling of the targets: condition accuracy "
          + ", ".join(f"{base[k]:.3f} ({k})" for k in base))
    print("survival: of the boxes the transfer labels as objects (those under one token are ignore regions, on the "
          "originals too); all boxes: of every carried box")
    print(f"survival's 95 % interval: a bootstrap over the {args.frames} source frames ({args.bootstrap} draws), where "
          f"condition accuracy >= 0.8")
    print(f"{'arm':<16}{'s':>5}{'survival':>10}{'95 % interval':>16}{'all boxes':>11}{'AP50':>8}{'cond.acc':>10}"
          f"{'/ plain':>9}")
    for r in rows:
        ci = r["survival_interval"]
        ci = f"[{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""
        print(f"{r['arm']:<16}{r['strength']:>5.2f}{r['survival']:>10.3f}{ci:>16}{r['survival_all_boxes']:>11.3f}"
              f"{r['ap50_transferred']:>8.3f}{r['condition_accuracy']:>10.3f}{(r['vs_plain'] or float('nan')):>9.2f}")
    for arm, *_ in arms(args):
        ok = [r["strength"] for r in rows
              if r["arm"] == arm and r["survival"] >= 0.9 and r["condition_accuracy"] >= 0.8]
        print(f"{arm}: goal (survival >= 0.9 where condition accuracy >= 0.8) "
              f"{'met at s = ' + str(ok) if ok else 'missed'}")
    print(f"{result['seconds']:.0f} s; written to {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
