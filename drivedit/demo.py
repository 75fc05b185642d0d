"""`make demo` / `drivedit demo`: the whole platform on one machine, end to end.

scenes -> encode (Ray Data) -> fine-tune the shipped tiny DiT with driveditfit and a light layout branch
(Ray Train, DDP over two one-thread workers) -> registered bundle in MLflow -> generate a labelled dataset from the
real frames' layouts under every scenario (Ray Data) -> serve it (Ray Serve) and ask for one sample per scenario,
drawn to a real frame's boxes, while the generated set is evaluated against the real frames beside it.

Every step is the same job a user runs from its config in configs/demo/; the demo only points all
of their paths under one output directory and shares one local Ray between them.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from drivedit.logs import quiet_ray_noise, setup_logging
from drivedit.raylocal import start_local_ray

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = REPO / "configs" / "demo"


STEPS = ("scenes", "encode", "fine-tune", "generate", "serve", "eval")  # in the order they start
SIDE_BY_SIDE = ("serve", "eval")  # the steps that run at the same time


@dataclass(frozen=True)
class DemoSize:
    """How big each step is. `full` is `make demo`; `small` is the version `make test` runs."""

    num_scenes: int
    finetune_steps: int
    checkpoint_every: int
    grid_every: int
    per_scenario: int
    sampler_steps: int
    eval_classifier_steps: int
    sampler_actors: int | None  # None: configs/demo/generate.yaml's (one per core); the small demo's 18 frames: one


SIZES = {
    "full": DemoSize(num_scenes=900, finetune_steps=750, checkpoint_every=500, grid_every=0, per_scenario=30,
                     sampler_steps=50, eval_classifier_steps=400, sampler_actors=None),
    "small": DemoSize(num_scenes=120, finetune_steps=12, checkpoint_every=6, grid_every=0, per_scenario=3,
                      sampler_steps=5, eval_classifier_steps=60, sampler_actors=1),
}


def _log(msg: str) -> None:
    print(f"\n=== demo: {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_scenes(out: Path, size: DemoSize, seed: int) -> dict:
    from drivedit.data.scenes import write_scenes_dataset

    _log(f"1/6 procedural driving dataset: {size.num_scenes} frames -> {out / 'scenes'}")
    if (out / "scenes" / "labels.json").is_file():
        print("already written; reusing it")
        return {"out_dir": str(out / "scenes"), "reused": True}
    return write_scenes_dataset(str(out / "scenes"), num=size.num_scenes, size=128, seed=seed)


def step_encode(out: Path, extra: Sequence[str] = ()) -> dict:
    from drivedit.config import load_config
    from drivedit.config.encode import EncodeJob
    from drivedit.data.encode import run_encode

    _log(f"2/6 encode with Ray Data -> {out / 'shards'}")
    job = load_config(EncodeJob, DEMO_CONFIGS / "encode.yaml", [
        "--data.input", str(out / "scenes"), "--data.output", str(out / "shards"), *extra])
    return run_encode(job)


def step_finetune(out: Path, size: DemoSize, extra: Sequence[str] = ()) -> dict:
    from drivedit.config import load_config
    from drivedit.config.finetune import FinetuneJob
    from drivedit.train.trainer import run_finetune

    _log("3/6 fine-tune the shipped tiny DiT with driveditfit and a layout branch on Ray Train")
    job = load_config(FinetuneJob, DEMO_CONFIGS / "finetune.yaml", [
        "--data.shards", str(out / "shards"),
        "--run.storage_path", str(out / "finetune"),
        "--optim.total_steps", str(size.finetune_steps),
        "--optim.warmup_steps", str(min(20, size.finetune_steps // 4)),
        "--run.checkpoint_every", str(size.checkpoint_every),
        "--sampling.every_steps", str(size.grid_every),
        "--sampling.steps", str(size.sampler_steps),  # the grids' sampler, as the generated set's
        "--run.log_every", str(max(1, min(20, size.finetune_steps // 4))),
        *extra,
    ])
    return run_finetune(job)


def step_generate(out: Path, size: DemoSize, model_uri: str, tracking_uri: str, scenarios: list[str]) -> dict:
    from drivedit.config import load_config
    from drivedit.config.generate import GenerateJob
    from drivedit.generate.job import run_generate

    total = size.per_scenario * len(scenarios)
    _log(f"4/6 generate {total} labelled images with Ray Data: the boxes of {size.per_scenario} real frames drawn "
         f"under each of the {len(scenarios)} scenarios")
    layouts = {"source": str(out / "scenes" / "labels.json"), "images": str(out / "scenes" / "images"),
               "scenarios": scenarios, "limit": size.per_scenario}
    job = load_config(GenerateJob, DEMO_CONFIGS / "generate.yaml", [
        "--model.ref", model_uri,
        "--tracking.tracking_uri", tracking_uri,
        "--spec.balance", "null",
        "--spec.layouts", json.dumps(layouts),
        "--sampler.steps", str(size.sampler_steps),
        "--output.uri", str(out / "synthetic"),
        *(["--scaling.num_workers", str(size.sampler_actors)] if size.sampler_actors else []),
    ])
    result = run_generate(job)
    # the picture to look at: the first frames of each scenario with their labels drawn (also in MLflow)
    from drivedit.generate.report import preview_grid

    result["preview"] = str(preview_grid(str(out / "synthetic"), out / "synthetic-preview.png"))
    return result


def layout_request(frame, categories: list[str], image_size: tuple[int, int]) -> dict:
    """The `layout` of a `POST /v1/samples` body from a real frame's boxes (those of the served categories)."""
    w, h = image_size
    boxes = [{"category": b.category, "x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2}
             for b in frame.boxes if b.category in categories]
    return {"width": w, "height": h, "boxes": boxes}


def step_serve(out: Path, size: DemoSize, model_uri: str, tracking_uri: str, scenarios: list[str]) -> dict:
    from PIL import Image
    from ray import serve

    from drivedit.config import load_config
    from drivedit.config.serve import ServeApp
    from drivedit.data.bdd100k import load_label_file
    from drivedit.serve.app import build_app

    port = _free_port()
    _log(f"5/6 Ray Serve on 127.0.0.1:{port}: one sample per scenario, drawn to a real frame's boxes")
    cfg = load_config(ServeApp, DEMO_CONFIGS / "serve.yaml", [
        "--model.ref", model_uri, "--model.tracking_uri", tracking_uri, "--http.port", str(port)])
    serve.start(http_options={"host": cfg.http.host, "port": port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.http.route_prefix)
    samples_dir = out / "served"
    samples_dir.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    written, labels = {}, {}
    frame = next(iter(load_label_file(str(out / "scenes" / "labels.json"))))
    with Image.open(out / "scenes" / "images" / frame.name) as im:
        frame_size = im.size
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=60) as r:
            health = json.loads(r.read())
        layout = layout_request(frame, health["box_categories"], frame_size) if health["box_categories"] else None
        for i, scenario in enumerate(scenarios):
            ask = {"scenario": scenario, "seed": 1000 + i, "steps": size.sampler_steps, "sampler": "ddpm"}
            req = urllib.request.Request(f"{base}/v1/samples", data=json.dumps({**ask, "layout": layout}).encode()
                                         if layout else json.dumps(ask).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=300) as r:
                answer = r.read()
                kind = r.headers.get("Content-Type")
            # with a layout the answer is JSON: the image and its labels (the layout's boxes in its pixels)
            png = base64.b64decode(json.loads(answer)["images"][0]["png_base64"]) if layout else answer
            if kind != ("application/json" if layout else "image/png") or not png.startswith(b"\x89PNG"):
                raise RuntimeError(f"the endpoint did not answer {'JSON with a PNG' if layout else 'a PNG'} "
                                   f"for {scenario}")
            path = samples_dir / f"{scenario.replace(' ', '_')}.png"
            path.write_bytes(png)
            written[scenario] = str(path)
            if layout:
                labels[scenario] = json.loads(answer)["labels"]
                path.with_suffix(".json").write_text(json.dumps(labels[scenario], indent=1))
            print(f"POST /v1/samples {{scenario: {scenario!r}" + (f", layout: {len(layout['boxes'])} boxes of "
                  f"{frame.name}" if layout else "") + f"}} -> {path} ({len(png)} bytes)")
    finally:
        serve.shutdown()
    return {"health": health, "samples": written, "labels": labels, "layout": layout,
            "layout_frame": frame.name if layout else None}


def step_eval(out: Path, size: DemoSize) -> dict:
    from drivedit.eval.evaluate import evaluate_folders

    report = evaluate_folders(out / "scenes", out / "synthetic", train_classifier=True,
                              save_classifier=out / "eval" / "classifier", image_size=32,
                              classifier_steps=size.eval_classifier_steps, kid_subset_size=50,
                              log=lambda line: print(f"eval: {line}", flush=True))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def scenario_table(report: dict, scenarios: list[str]) -> str:
    rows = [f"{'scenario':<14} {'generated':>9} {'cond. acc':>9} {'FID':>9} {'layout agr':>10} {'layout FD':>9}"]
    for s in scenarios:
        m = report["per_scenario"].get(s, {})
        rows.append(f"{s:<14} {m.get('num_fake', 0):>9} {_fmt(m.get('condition_accuracy')):>9} "
                    f"{_fmt(m.get('fid'), '.2f'):>9} {_fmt(m.get('layout_agreement')):>10} {_fmt(m.get('layout_fd'), '.2f'):>9}")
    o, scene = report["overall"], report.get("scene") or {}
    rows.append(f"{'overall':<14} {o.get('num_fake', 0):>9} {_fmt(o.get('condition_accuracy')):>9} "
                f"{_fmt(o.get('fid'), '.2f'):>9} {_fmt(scene.get('layout_agreement')):>10} {_fmt(scene.get('layout_fd'), '.2f'):>9}")
    return "\n".join(rows)


@contextmanager
def local_ray(num_cpus: int = 4) -> Iterator[None]:
    """One local Ray for every step (with quiet workers), unless the caller already runs one."""
    import ray

    setup_logging()
    started = not ray.is_initialized()
    if started:
        quiet_ray_noise()
        start_local_ray(num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_demo(out: str | Path = "runs/demo", size: str = "full", seed: int = 0, fresh: bool = False,
             base: str | None = None) -> dict:
    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    sz = SIZES[size]
    t0 = time.time()
    summary: dict = {"out": str(out)}

    started: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.time()
        started[name] = round(start - t0, 1)
        result = fn(*args)
        seconds[name] = round(time.time() - start, 1)  # where the demo's minutes go
        return result

    with local_ray(4):
        timed("scenes", step_scenes, out, sz, seed)
        summary["encode"] = timed("encode", step_encode, out)
        ft = timed("fine-tune", step_finetune, out, sz, ["--model.source", base] if base else ())
        summary["finetune"] = ft
        scenarios = list(ft["scenarios"])
        summary["generate"] = timed("generate", step_generate, out, sz, ft["model_uri"], ft["tracking_uri"], scenarios)
        # serving needs the bundle, evaluating the generated set: neither needs the other, so they run side by
        # side. The endpoint spends most of its step starting a process (importing torch and diffusers, loading
        # the bundle) on one core; the evaluation's torch work takes the other.
        _log("5/6 and 6/6 side by side: serve the model, and evaluate the generated set against the real frames "
             "(the evaluation's lines start with eval:)")
        with ThreadPoolExecutor(1, thread_name_prefix="demo-eval") as pool:
            evaluation = pool.submit(timed, "eval", step_eval, out, sz)
            summary["serve"] = timed("serve", step_serve, out, sz, ft["model_uri"], ft["tracking_uri"], scenarios)
            summary["eval"] = evaluation.result()
    summary["step_seconds"] = {name: seconds[name] for name in STEPS}
    summary["step_started"] = {name: started[name] for name in STEPS}  # seconds after the demo started
    summary["side_by_side"] = [list(SIDE_BY_SIDE)]
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_where(summary, scenarios)
    return summary


def _print_where(summary: dict, scenarios: list[str]) -> None:
    ft, ev = summary["finetune"], summary["eval"]
    grids = sorted(Path(ft["run_dir"]).rglob("*.png")) if ft.get("run_dir") else []
    clf = ev.get("classifier") or {}
    print("\n" + "=" * 72)
    sec = summary["step_seconds"]
    steps = ", ".join(f"{name} {sec[name]:.0f}" for name in STEPS if name not in SIDE_BY_SIDE)
    both = " and ".join(f"{name} {sec[name]:.0f}" for name in SIDE_BY_SIDE)
    print(f"drivedit demo finished in {summary['seconds']:.0f} s ({steps} s, then {both} s side by side). "
          f"Everything is under {summary['out']}:")
    print(f"  real frames        {summary['out']}/scenes")
    print(f"  latent shards      {summary['encode']['output']}")
    print(f"  adapter bundle     {ft['bundle_uri']}")
    print(f"  registered model   {ft['model_uri']}")
    print(f"  MLflow             {ft['tracking_uri']}  (run {ft['mlflow_run_id']})")
    print(f"                     mlflow ui --backend-store-uri {ft['tracking_uri']}")
    if grids:
        print(f"  sample grid        {grids[-1]}")
    print(f"  generated dataset  {summary['generate'].get('output', summary['out'] + '/synthetic')}")
    if summary["generate"].get("preview"):
        print(f"  labelled frames    {summary['generate']['preview']}  (boxes drawn: objects green, ignore "
              "regions magenta)")
    print(f"  served samples     {summary['out']}/served")
    print(f"  evaluation         {summary['out']}/eval/report.json")
    acc = clf.get("heldout_accuracy")
    chance = 1.0 / len(scenarios)
    print(f"\nScenario classifier held-out accuracy on real frames: {_fmt(acc)} (chance {chance:.3f})")
    print("Scene check (no classifier): layout agreement of the generated images' luminance mean / std maps with "
          "the real frames' (1 = the same layout, ~0 = none) and layout FD (0 = the same per-image layout)\n")
    print(scenario_table(ev, scenarios))
    print("\nDoes the synthetic data help a detector? `make demo-downstream` trains the same detector on real frames "
          "with rare night and snow, and on them plus generated night and snow frames, and compares them on "
          "held-out frames (one seed; bench/downstream.py runs three).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drivedit demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="where everything goes")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="full (make demo) or small (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete --out first (otherwise completed steps resume)")
    p.add_argument("--base", help="the DiT-T/4 base to fine-tune (default builtin:tiny-dit; e.g. a candidate "
                                  "pre-trained by bench/pretrain_context.py)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_demo(args.out, size=args.size, seed=args.seed, fresh=args.fresh, base=args.base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
