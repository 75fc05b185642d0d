"""Guidance in a limited interval on the layout benchmark: layout fidelity of one layout branch's frames guided at
every step vs only where sigma lies in (lo, hi].

bench/layout.py's own pieces, for one branch kind: the demo's procedural scenes and shards (`real_data`), the
branch fine-tuned on them (`finetune`, driveditfit + `--kind`), its frames of the held-out layouts under every
scenario (`generate`: DDIM `--sampler-steps`, guidance 4, `--layout-guidance`), once per interval, the real-only
detector (`detector`) scoring each set and the held-out real frames, and the scenario classifier plus the scene
check on each set. The first interval (`none`: every step) is the baseline.

    python bench/guidance_interval_layouts.py --out runs/bench-gi-layouts --steps 2000 --layout-guidance 4 \
        --intervals none 0.28,5.42 0.28,3

Writes <out>/guidance_interval.json and prints the table BENCHMARKS.md records. `--reuse` keeps what --out holds
(scenes, shards, the fine-tune and the detector resume or are reused).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.guidance_interval import parse_interval  # noqa: E402
from bench.layout import (KINDS, _f, detector, detector_scores, finetune, generate, real_data,  # noqa: E402
                          shared_args, start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared_args(ap)
    ap.add_argument("--kind", choices=KINDS[1:], default="light", help="the layout branch")
    ap.add_argument("--layout-frames", type=int, default=24,
                    help="held-out frames whose layouts the branch renders under every scenario")
    ap.add_argument("--layout-guidance", type=float, default=4.0)
    ap.add_argument("--intervals", nargs="+", default=["none", "0.28,5.42"],
                    help="LO,HI in sigma, or `none` (every step); the first is the baseline")
    args = ap.parse_args(argv)
    import ray

    from drivedit.eval.evaluate import evaluate_folders
    from drivedit.eval.fidelity import dataset_ignore_under, layout_fidelity

    out, t0 = start(args)
    arms = {f"{args.kind}-{name.replace(',', '-')}": parse_interval(name) for name in args.intervals}
    seconds = {}
    try:
        real_data(out, args)
        ft = finetune(args.kind, out, args)
        scenarios = list(ft["scenarios"])
        for arm, interval in arms.items():
            ray.shutdown()  # a fresh Ray per arm: each starts its sampler actors cold (the first would, alone)
            ray.init(num_cpus=4, include_dashboard=False)
            t = time.perf_counter()
            generate(arm, ft, out, scenarios, argparse.Namespace(**{**vars(args), "guidance_interval": interval}))
            seconds[arm] = time.perf_counter() - t
        det = detector(out, args)
        real_scores = detector_scores(det, out / "scenes-val", out)
        gen_scores = {arm: detector_scores(det, out / "synthetic" / arm, out) for arm in arms}
    finally:
        ray.shutdown()
    clf = out / "eval" / "classifier"
    rows = {}
    for i, arm in enumerate(arms):
        fid = layout_fidelity(gen_scores[arm], real_scores,
                              dataset_ignore_under(str(out / "synthetic" / arm), gen_scores[arm]))
        kwargs = ({"classifier": clf} if i else
                  {"train_classifier": True, "save_classifier": clf, "classifier_steps": args.classifier_steps})
        images = evaluate_folders(out / "scenes", out / "synthetic" / arm, image_size=32, seed=args.seed,
                                  kid_subset_size=min(50, args.layout_frames), **kwargs)
        rows[arm] = {"interval": arms[arm], "generate_seconds": round(seconds[arm], 1), "fidelity": fid,
                     "overall": images["overall"], "per_scenario": images["per_scenario"], "scene": images.get("scene")}
    result = {"command": "python bench/guidance_interval_layouts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "finetune_seconds": ft["seconds"], "arms": rows, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "guidance_interval.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(rows, scenarios))
    return 0


def table(rows: dict, scenarios: list[str]) -> str:
    f = _f
    base = next(iter(rows.values()))["generate_seconds"]
    lines = ["| | " + " | ".join("every step" if r["interval"] is None else f"({r['interval'][0]:g}, {r['interval'][1]:g}]"
                                  for r in rows.values()) + " |", "|---" * (len(rows) + 1) + "|"]

    def row(name, get):
        lines.append(f"| {name} | " + " | ".join(get(r) for r in rows.values()) + " |")

    row("generate (s, vs the first)", lambda r: f"{r['generate_seconds']:.1f} ({r['generate_seconds'] / base:.2f}x)")
    row("layout fidelity, labelled boxes", lambda r: f(r["fidelity"]["fidelity"]))
    row("– medium / large", lambda r: " / ".join(f((r["fidelity"]["per_size"].get(z) or {}).get("fidelity"))
                                                  for z in ("medium", "large")))
    row("fidelity, every layout box", lambda r: f(r["fidelity"]["all_boxes"]["fidelity"]))
    row("– small / medium / large", lambda r: " / ".join(
        f((r["fidelity"]["all_boxes"].get("per_size", {}).get(z) or {}).get("fidelity")) for z in ("small", "medium", "large")))
    row("– per scenario", lambda r: ", ".join(f((r["fidelity"]["per_scenario"].get(s) or {}).get("fidelity"), ".2f")
                                               for s in scenarios))
    row("condition accuracy", lambda r: f(r["overall"]["condition_accuracy"]))
    row("FID (classifier features)", lambda r: f(r["overall"]["fid"], ".2f"))
    row("– clear acc / FID", lambda r: f"{f(r['per_scenario']['clear']['condition_accuracy'], '.2f')} / "
                                       f"{f(r['per_scenario']['clear']['fid'], '.1f')}" if "clear" in r["per_scenario"] else "-")
    row("layout agreement / layout FD", lambda r: f"{f((r['scene'] or {}).get('layout_agreement'))} / "
                                                  f"{f((r['scene'] or {}).get('layout_fd'), '.2f')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
