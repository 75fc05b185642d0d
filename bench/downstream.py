"""Does synthetic data help a detector? The rare-scenario experiment, end to end, against the real-only baseline.

1. Real data: procedural 128 px scenes in which the rare scenarios (night, snowy) are ~5 % each of the
   training frames, and held-out frames of every scenario for scoring (`drivedit scenes`).
2. The generator: the demo's encode and fine-tune (scenario adapter + a layout branch) on the real
   training frames only (drivedit.demo.step_encode / step_finetune).
3. Synthetic labelled frames of the rare scenarios with the generate job (configs/demo/generate.yaml):
   the layouts of real common-scenario training frames rendered under each rare scenario (spec.layouts)
   and / or those frames re-rendered into it by SDEdit (spec.transfer), as the config chooses.
4. The demo detector (configs/demo/detect.yaml) per seed in two arms, the baseline `real` and `mixed`:
   the same optimizer steps and schedule, and every step's batch holds the same real frames in both arms
   (the detect job's `per_step` counts draw each dataset from its own random stream); the mixed arm's
   batch holds the synthetic frames on top. So both arms see the real data for the same number of
   epochs (Dream4Drive's point): each run records its steps and images drawn per dataset, and the table
   shows them. Optional control arms (`detector.controls`) put as many more *real* frames in the batch
   instead (of every scenario, or of the rare ones only: oversampling), so the mixed arm's gain can be told
   from a larger batch's and from repeating the rare frames one has.
5. Scores on the held-out real frames: AP and AP50 per scenario and per object size, mean ± sd over seeds,
   mixed - real per seed with a 95 % t-interval over the paired seeds; all runs in one MLflow
   experiment (tagged by arm and seed) and the markdown table in <out>/table.md.

    python bench/downstream.py --config configs/bench/downstream.yaml [--section.field VALUE ...]

Every stage resumes: rerunning with the same `out` reuses the datasets and finished runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts its workers at nice 15 on top of ours; the detector runs are the long part, so they run at our
# priority (`nice -n 5 python bench/downstream.py`), not at the bottom of a shared machine's queue
os.environ.setdefault("RAY_worker_niceness", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivedit.config.base import ConfigError, field_help_lines, load_config  # noqa: E402
from drivedit.config.downstream import SCENE_CATEGORIES, DownstreamBench  # noqa: E402
from drivedit.eval.downstream import CONTROL_PREFIX  # noqa: E402

TABLE_FILE = "table.md"
RARE_LABELS = "rare.json"  # the real training frames of the rare scenarios, beside scenes/labels.json
SUMMARY_FILE = "downstream.json"


def _log(msg: str) -> None:
    print(f"\n=== downstream: {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. real scenes


def _scene_kwargs(scenario: str, weathers: list[str]) -> dict:
    """How the scene renderer draws one scenario: night is any weather at night, the others a daytime weather."""
    if scenario == "night":
        return {"weathers": weathers, "timesofday": ["night"]}
    return {"weathers": [scenario], "timesofday": ["daytime", "dawn/dusk"]}


def write_split(out: Path, counts: dict[str, int], seed: int) -> list:
    """A BDD100K-format folder with `counts[scenario]` frames of each scenario (each rendered with its own
    seed, into the same images/); returns its frames, interleaved across scenarios."""
    from drivedit.data.bdd100k import load_label_file, write_label_file
    from drivedit.data.scenes import write_scenes_dataset

    if (out / "labels.json").is_file():
        return list(load_label_file(str(out / "labels.json")))
    weathers = [s for s in counts if s != "night"] or ["clear"]
    parts = []
    for k, (scenario, n) in enumerate(counts.items()):
        write_scenes_dataset(str(out), n, size=128, seed=seed * 100 + k, **_scene_kwargs(scenario, weathers))
        parts.append(list(load_label_file(str(out / "labels.json"))))  # each call rewrites labels.json
    frames = [p[i] for i in range(max(counts.values())) for p in parts if i < len(p)]  # round robin
    write_label_file(frames, str(out / "labels.json"))
    return frames


def stage_scenes(cfg: DownstreamBench, out: Path) -> dict:
    from drivedit.data.bdd100k import write_label_file

    s = cfg.scenes
    rare_n = cfg.rare_frames()
    train_counts = {**{c: s.common_per_scenario for c in s.common}, **{r: rare_n for r in s.rare}}
    _log(f"1/5 real scenes: training {train_counts}; held out {s.heldout_per_scenario} of each scenario")
    train = write_split(out / "scenes", train_counts, s.seed)
    heldout = write_split(out / "heldout", {x: s.heldout_per_scenario for x in [*s.common, *s.rare]}, s.seed + 1)
    # the synthetic frames start from the common-scenario training frames (their layouts or their pixels)
    common = [f for f in train if (f.weather in s.common and f.timeofday != "night")]
    write_label_file(common, str(out / "scenes" / "common.json"))
    # the rare-real control arm oversamples the rare-scenario training frames
    names = {f.name for f in common}
    write_label_file([f for f in train if f.name not in names], str(out / "scenes" / RARE_LABELS))
    total = len(train)
    return {"train": str(out / "scenes"), "heldout": str(out / "heldout"), "train_frames": total,
            "train_counts": train_counts, "rare_share": {r: rare_n / total for r in s.rare},
            "heldout_frames": len(heldout), "common_source": str(out / "scenes" / "common.json")}


# ----------------------------------------------------------------------------- 2. generator


def stage_generator(cfg: DownstreamBench, out: Path, tracking_uri: str) -> dict:
    from drivedit.demo import SIZES, step_encode, step_finetune

    g = cfg.generator
    _log(f"2/5 the generator: encode the real training frames, fine-tune adapter + {g.layout_kind} layout branch")
    step_encode(out, ["--data.object_categories", json.dumps(SCENE_CATEGORIES)])
    size = dataclasses.replace(SIZES["full"], finetune_steps=g.steps, checkpoint_every=g.steps, grid_every=0)
    return step_finetune(out, size, ["--layout.kind", g.layout_kind, "--tracking.tracking_uri", tracking_uri,
                                     "--tracking.experiment", cfg.experiment,
                                     "--tracking.registered_model", "drivedit-downstream-generator",
                                     *cfg.as_overrides(g.overrides)])


# ----------------------------------------------------------------------------- 3. synthetic frames


def stage_synthetic(cfg: DownstreamBench, out: Path, scenes: dict, model_uri: str, tracking_uri: str) -> list[dict]:
    from drivedit.config.generate import GenerateJob
    from drivedit.demo import DEMO_CONFIGS
    from drivedit.generate.job import run_generate

    y, rare = cfg.synthetic, cfg.scenes.rare
    modes = ["layouts", "transfer"] if y.mode == "both" else [y.mode]
    done = []
    for mode in modes:
        _log(f"3/5 generate {y.per_scenario} labelled frames per rare scenario {rare} by {mode}")
        if mode == "layouts":
            spec = {"source": scenes["common_source"], "images": str(Path(scenes["train"]) / "images"),
                    "scenarios": rare, "limit": y.per_scenario, "layout_guidance": y.layout_guidance}
        else:
            spec = {"source": scenes["train"], "labels": scenes["common_source"], "targets": rare,
                    "strength": y.strength, "max_frames": y.per_scenario,
                    "layout_guidance": y.transfer_layout_guidance, "start": y.start}
        uri = str(out / synthetic_name(cfg, mode))
        job = load_config(GenerateJob, DEMO_CONFIGS / "generate.yaml", [
            "--model.ref", model_uri, "--tracking.tracking_uri", tracking_uri, "--tracking.experiment", cfg.experiment,
            "--spec.balance", "null", f"--spec.{mode}", json.dumps(spec), "--sampler.sampler", y.sampler,
            "--sampler.steps", str(y.sampler_steps), "--sampler.guidance", str(y.guidance),
            "--sampler.guidance_interval", json.dumps(y.guidance_interval), "--output.uri", uri])
        result = run_generate(job)
        done.append({"mode": mode, "uri": uri, "images": _count_frames(uri), "result": result})
    return done


def synthetic_name(cfg: DownstreamBench, mode: str) -> str:
    """A synthetic dataset's folder, named by what makes it, so variants of the experiment sit side by side."""
    y = cfg.synthetic
    how = f"s{y.strength:g}" if mode == "transfer" else f"lg{y.layout_guidance:g}"
    if mode == "transfer" and y.transfer_layout_guidance is not None:
        how += f"-lg{y.transfer_layout_guidance:g}"
    if mode == "transfer" and y.start == "inversion":
        how += "-inv"
    if y.guidance_interval is not None:
        how += f"-gi{y.guidance_interval[0]:g}-{y.guidance_interval[1]:g}"
    return f"synthetic-{mode}-{how}-n{y.per_scenario}-{y.sampler}{y.sampler_steps}-g{y.guidance:g}"


def arm_name(cfg: DownstreamBench, arm: str, seed: int) -> str:
    """A detector run's name: the real-only arm depends on the real data and detector alone, so variants of the
    synthetic data share it; the mixed arm's name says which synthetic data and how much of it per step."""
    if arm == "real":
        return f"real-seed{seed}"
    if arm.startswith(CONTROL_PREFIX):  # real frames alone: the synthetic data's settings do not enter
        return f"{arm}-x{cfg.detector.synthetic_per_step}-seed{seed}"
    modes = ["layouts", "transfer"] if cfg.synthetic.mode == "both" else [cfg.synthetic.mode]
    data = "_".join(synthetic_name(cfg, m)[len("synthetic-"):] for m in modes)
    d = cfg.detector
    ignore = (f"-ign{d.synthetic_ignore_under:g}" if d.synthetic_ignore_under else "") + \
        (f"-teach{d.teacher_score:g}" if d.teacher_score is not None else "") + \
        ("" if d.synthetic_background else "-nobg")
    return f"mixed-{data}-x{cfg.detector.synthetic_per_step}{ignore}-seed{seed}"


def _count_frames(uri: str) -> int:
    from drivedit.data.bdd100k import load_label_file

    return len(list(load_label_file(str(Path(uri) / "labels.json"))))


# ----------------------------------------------------------------------------- 4. detector arms


def teacher_labels(cfg: DownstreamBench, seed: int) -> str | None:
    """The synthetic datasets' label file of a seed's mixed arm: with `detector.teacher_score`, the one
    mark_teacher writes beside labels.json."""
    t = cfg.detector.teacher_score
    return f"labels-teacher{t:g}-seed{seed}.json" if t is not None else None


def detect_job(cfg: DownstreamBench, out: Path, arm: str, seed: int, synthetic: list[dict], tracking_uri: str):
    from drivedit.config.detect import DetectJob
    from drivedit.demo import DEMO_CONFIGS

    d = cfg.detector
    train = [{"uri": str(out / "scenes"), "per_step": d.real_per_step}]
    if arm == "mixed":
        train += [{"uri": s["uri"], "per_step": d.synthetic_per_step // len(synthetic),
                   "ignore_under": d.synthetic_ignore_under, "labels_file": teacher_labels(cfg, seed),
                   "learn_background": d.synthetic_background}
                  for s in synthetic]
    elif arm.startswith(CONTROL_PREFIX):  # a second stream of real frames in place of the synthetic ones
        extra = {"more-real": None, "rare-real": RARE_LABELS}[arm[len(CONTROL_PREFIX):]]
        train.append({"uri": str(out / "scenes"), "per_step": d.synthetic_per_step, "labels_file": extra})
    return load_config(DetectJob, DEMO_CONFIGS / "detect.yaml", [
        "--data.train", json.dumps(train), "--data.val", str(out / "heldout"),
        "--data.categories", json.dumps(d.categories),
        "--optim.total_steps", str(d.steps), "--optim.global_batch_size", str(sum(t["per_step"] for t in train)),
        "--optim.lr", str(d.lr), "--optim.warmup_steps", str(d.warmup_steps), "--optim.seed", str(seed),
        "--scaling.num_workers", str(d.num_workers), "--run.name", arm_name(cfg, arm, seed),
        # a worker lost to a shared machine's memory pressure restarts from the last third, not from step 0
        "--run.storage_path", str(out / "detect"), "--run.checkpoint_every", str(max(1, d.steps // 3)),
        "--run.max_failures", "3",
        "--run.log_every", str(max(1, d.steps // 8)), "--tracking.tracking_uri", tracking_uri,
        "--tracking.experiment", cfg.experiment, "--tracking.registered_model", "drivedit-downstream-detector",
        *cfg.as_overrides(d.overrides)])


def stage_detectors(cfg: DownstreamBench, out: Path, synthetic: list[dict], tracking_uri: str) -> list[dict]:
    from drivedit import tracking
    from drivedit.detect.job import run_detect

    runs = []
    for seed in cfg.detector.seeds:
        for arm in ("real", "mixed", *(CONTROL_PREFIX + c for c in cfg.detector.controls)):
            _log(f"4/5 detector, arm {arm}, seed {seed}")
            if arm == "mixed" and cfg.detector.teacher_score is not None:
                mark_teacher(cfg, seed, runs[-1]["run_dir"], synthetic)
            job = detect_job(cfg, out, arm, seed, synthetic, tracking_uri)
            result = run_detect(job)
            if result.get("mlflow_run_id"):
                tracking.TrackedRun(tracking_uri, result["mlflow_run_id"], "").set_tags({
                    "drivedit.downstream.arm": arm, "drivedit.downstream.seed": seed,
                    "drivedit.downstream.synthetic": cfg.synthetic.mode})
            runs.append(run_record(arm, seed, result))
    return runs


def mark_teacher(cfg: DownstreamBench, seed: int, real_run_dir: str, synthetic: list[dict]) -> None:
    """Write each synthetic dataset's teacher label file of this seed: its labels plus, as ignore regions, the
    confident detections of the seed's real-only detector that no label explains."""
    from drivedit.detect.detector import load_detector
    from drivedit.detect.unlabelled import mark_unlabelled

    name = teacher_labels(cfg, seed)
    detector, spec = load_detector(str(Path(real_run_dir) / "detector"))
    for s in synthetic:
        if (Path(s["uri"]) / name).is_file():
            continue
        r = mark_unlabelled(detector, spec, s["uri"], out_file=name, score=cfg.detector.teacher_score,
                            marked_by=f"real-seed{seed}")
        _log(f"4/5 teacher real-seed{seed}: {r['marked_boxes']} unlabelled detections in {r['frames_marked']} of "
             f"{r['frames']} frames of {Path(s['uri']).name} -> {name}")


def run_record(arm: str, seed: int, result: dict) -> dict:
    """What a finished detector run recorded (its result.json and scores), as the comparison reads it."""
    metrics = json.loads((Path(result["scores_uri"]) / "metrics.json").read_text())
    seen = result["data_seen"]
    steps = result["step"]
    return {"arm": arm, "seed": seed, "run_dir": result["run_dir"], "mlflow_run_id": result.get("mlflow_run_id"),
            "steps": steps, "real_epochs": seen[0]["epochs"], "real_images": seen[0]["images"],
            "images_per_step": [s["images"] // steps for s in seen], "data_seen": seen, "metrics": metrics}


# ----------------------------------------------------------------------------- 5. the table


def _setup_line(cfg: DownstreamBench, summary: dict) -> str:
    """What the table was measured on, in one sentence."""
    s, y, sc = cfg.scenes, cfg.synthetic, summary["scenes"]
    how = {"layouts": f"layouts (layout guidance {y.layout_guidance:g})",
           "transfer": f"transfer (SDEdit strength {y.strength:g}"
                       + (", DDIM-inverted start" if y.start == "inversion" else "")
                       + (f", layout-guided {y.transfer_layout_guidance:g})" if y.transfer_layout_guidance else ")"),
           "both": f"layouts and transfer (strength {y.strength:g})"}[y.mode]
    synth = " + ".join(str(x["images"]) for x in summary["synthetic"])
    counts = ", ".join(f"{k} {v}" for k, v in sc["train_counts"].items())
    return (f"Real training frames: {sc['train_frames']} ({counts});"
            f" held out: {sc['heldout_frames']} ({s.heldout_per_scenario} per scenario). Synthetic: {synth} frames of "
            f"{', '.join(s.rare)} by {how}, {y.sampler.upper()} {y.sampler_steps} steps, guidance {y.guidance:g}; "
            f"generator fine-tuned {cfg.generator.steps} steps with a {cfg.generator.layout_kind} layout branch; "
            f"detector: {', '.join(cfg.detector.categories)}, {cfg.detector.steps} steps"
            + (f"; synthetic boxes under {cfg.detector.synthetic_ignore_under:g} px are ignore regions"
               if cfg.detector.synthetic_ignore_under else "")
            + (f"; the real-only detector's unlabelled detections (score >= {cfg.detector.teacher_score:g}) in the "
               "synthetic frames are ignore regions" if cfg.detector.teacher_score is not None else "")
            + ("; the synthetic frames teach no background" if not cfg.detector.synthetic_background else "")
            + "".join(f"; control arm {CONTROL_PREFIX}{c}: {cfg.detector.synthetic_per_step} more real frames per "
                      f"step{' of the rare scenarios' if c == 'rare-real' else ''} instead of the synthetic ones"
                      for c in cfg.detector.controls) + ".")


def stage_table(cfg: DownstreamBench, out: Path, runs: list[dict], summary: dict, tracking_uri: str) -> str:
    from drivedit import tracking
    from drivedit.eval.downstream import compare, control_arms, fairness_table, markdown_table, table_keys, verdict

    _log("5/5 the comparison")
    s, g = cfg.scenes, cfg.goal
    keys = table_keys(s.rare, s.common)
    comparisons = compare(runs, [k for _, k in keys])
    rows = [(label, c) for (label, _), c in zip(keys, comparisons)]
    v = verdict(comparisons[0], comparisons[1], g.rare_gain, g.common_cost)
    # each control against the real-only arm and the mixed arm against it, once, for the table and the summary
    controls = {arm: (compare(runs, [k for _, k in keys], "real", arm), compare(runs, [k for _, k in keys], arm, "mixed"))
                for arm in control_arms(runs)}
    seeds = len(cfg.detector.seeds)
    lines = [
        _setup_line(cfg, summary),
        "", markdown_table(rows, seeds), "",
        "AP points = COCO AP x 100 on the held-out real frames; rare / common rows are the mean over their "
        "scenarios; ± is the sd over seeds; the interval is the 95 % t-interval of the mean paired (same seed) "
        f"difference over {seeds} seeds.", "",
        *control_lines(controls, keys, seeds),
        fairness_table(runs), "",
        f"Goal: rare AP50 +{g.rare_gain:g} with the interval above 0, common AP50 cost <= {g.common_cost:g}: "
        f"rare {v['rare_gain']:+.1f} (interval low {v['rare_gain_ci_low']:+.1f}), common {v['common_change']:+.1f} -> "
        f"**{'met' if v['met'] else 'not met'}**.",
    ]
    table = "\n".join(lines) + "\n"
    (out / TABLE_FILE).write_text(table)
    summary.update(comparison=[c.as_dict() for c in comparisons], verdict=v,
                   controls={arm: {"vs_real": [c.as_dict() for c in vs_real], "mixed_vs": [c.as_dict() for c in mixed_vs]}
                             for arm, (vs_real, mixed_vs) in controls.items()},
                   runs=[{k: r[k] for k in r if k != "metrics"} for r in runs])
    tracked = tracking.start_run(tracking_uri, cfg.experiment, "downstream-comparison",
                                 tags={"drivedit.job": "downstream", "drivedit.downstream.synthetic": cfg.synthetic.mode})
    tracked.log_metrics({"rare_AP50_gain": v["rare_gain"], "common_AP50_change": v["common_change"]}, 0)
    tracked.log_artifact(out / TABLE_FILE)
    tracked.log_dict(summary, SUMMARY_FILE)
    tracked.end("FINISHED")
    return table


def control_lines(controls: dict, keys: list[tuple[str, str]], seeds: int) -> list[str]:
    """A table per control arm, its AP50 rows: controls[arm] = (the control against the real-only arm, the mixed
    arm against the control), one Comparison per key of `keys`."""
    from drivedit.eval.downstream import control_table

    lines = []
    for arm, (vs_real, mixed_vs) in controls.items():
        rows = [(label, a, b) for (label, key), a, b in zip(keys, vs_real, mixed_vs) if key.endswith("AP50")]
        lines += [f"Control arm `{arm}`:", "", control_table(rows, arm, seeds), ""]
    return lines


# ----------------------------------------------------------------------------- the experiment


def run_downstream(cfg: DownstreamBench) -> dict:
    from drivedit.demo import local_ray

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    t0 = time.time()
    summary: dict = {"config": cfg.model_dump(mode="json"), "out": str(out), "tracking_uri": tracking_uri}
    seconds: dict = {}
    with local_ray(cfg.num_cpus):
        t = time.time()
        summary["scenes"] = stage_scenes(cfg, out)
        seconds["scenes"] = time.time() - t
        t = time.time()
        ft = stage_generator(cfg, out, tracking_uri)
        summary["generator"] = {k: ft.get(k) for k in ("model_uri", "bundle_uri", "mlflow_run_id", "step")}
        seconds["generator"] = time.time() - t
        t = time.time()
        summary["synthetic"] = [{k: v for k, v in s.items() if k != "result"}
                                for s in stage_synthetic(cfg, out, summary["scenes"], ft["model_uri"], tracking_uri)]
        seconds["synthetic"] = time.time() - t
        t = time.time()
        runs = stage_detectors(cfg, out, summary["synthetic"], tracking_uri)
        seconds["detectors"] = time.time() - t
    summary["seconds"] = {k: round(v, 1) for k, v in {**seconds, "total": time.time() - t0}.items()}
    summary["load_average"] = os.getloadavg()
    table = stage_table(cfg, out, runs, summary, tracking_uri)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str))
    print("\n" + table, flush=True)
    print(f"stage seconds {summary['seconds']}; load average {summary['load_average'][0]:.1f}; everything under {out}; "
          f"mlflow ui --backend-store-uri {tracking_uri}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/downstream.py", add_help=False, description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML (configs/bench/downstream.yaml)")
    ap.add_argument("-h", "--help", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    if args.help:
        print(ap.format_help())
        print("\n".join(field_help_lines(DownstreamBench)))
        return 0
    try:
        cfg = load_config(DownstreamBench, args.config, overrides)
    except ConfigError as e:
        print(f"bench/downstream.py: {e}", file=sys.stderr)
        return 2
    run_downstream(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
