"""Benchmark: the method table. All six methods on equal footing, seeds, a learning-rate sweep, and the
ablations of every DriveDiTFit component, on the demo's 128 px world.

Every arm fine-tunes the shipped tiny DiT on the same real frames (the demo's procedural scenes through
the tiny VAE) with the fine-tuning job's own per-worker loop run in-process (drivedit/train/inprocess.py:
the job's methods, semantic init, gap selection, schedules, EMA, object weighting; no Ray, so it also
runs on a bare GPU machine). Same steps, batch, data order per seed and generation seeds for every arm.
Every method trains its scenario table (a method that cannot move its scenario rows says nothing about how
it adapts); `bitfit-published` is BitFit as published (biases only, the table frozen at its init).
Each method keeps its paper's recipe otherwise (DiffFit's 10x learning rate, linear schedule and plain loss
for the baselines, DriveDiTFit's progressive schedule and lambda_obj 2); every method gets the same
learning-rate sweep (--lrs) and is reported at its best sweep value (by mean overall FID).

Ablations (driveditfit, its best lr, same seeds): module selection paper / gap / random at the same
parameter count; scenario init denoise / text / random; progressive / linear schedule; lambda_obj 2 / 1.

Per arm: trainable parameters, step time and peak memory (each method timed alone), the held-out
denoising loss on real frames not trained on (whole latent and inside object boxes, at fixed noise levels),
and on generated images (per scenario, same seeds for every arm): FID, KID, precision, recall and condition
accuracy in the scenario classifier's feature space, and a second FID in a feature space trained without
scenario labels (the tiny VAE encoder's posterior mean, pooled to 4x8x8). Tables give mean +- std over seeds.

    python bench/methods_table.py prepare --data runs/methods-data          # scenes, shards, classifier
    python bench/methods_table.py run --data runs/methods-data --out runs/bench-methods-table
    python bench/methods_table.py report --out runs/bench-methods-table      # the markdown tables
    python bench/methods_table.py mlflow --out runs/bench-methods-table      # one MLflow run per arm

`run` works arm after arm in --jobs worker processes (one GPU is shared by them; on CPU use 1-2), writes
each arm's result to results.jsonl as soon as it is measured, and stops starting arms once --budget-s is
near, so a cut run still reports every arm it finished.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEMO = ROOT / "configs" / "demo"
METHODS = ("full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit")
# arm -> (method, overrides); the main table first, then driveditfit's ablations
MAIN_ARMS = {m: (m, ["--method.train_table", "true"]) for m in METHODS}
MAIN_ARMS["bitfit-published"] = ("bitfit", ["--method.train_table", "false"])
ABLATIONS = {
    "ddf-select-gap": ("driveditfit", ["--method.select", "gap"]),
    "ddf-select-random": ("driveditfit", ["--method.select", "random"]),
    "ddf-init-text": ("driveditfit", ["--method.scenario_init", "text"]),
    "ddf-init-random": ("driveditfit", ["--method.scenario_init", "random"]),
    "ddf-linear": ("driveditfit", ["--method.schedule", "linear"]),
    "ddf-lambda1": ("driveditfit", ["--method.lambda_obj", "1.0"]),
}
ABLATION_OF = {"ddf-select-gap": "selection", "ddf-select-random": "selection", "ddf-init-text": "scenario init",
               "ddf-init-random": "scenario init", "ddf-linear": "schedule", "ddf-lambda1": "object weight"}
HELDOUT_ALPHA_BARS = (0.8, 0.5, 0.2, 0.05)  # noise levels of the held-out loss, matched per arm's schedule
HELDOUT_EVERY = 7  # every 7th real frame of each scenario is held out of training


def recipe(method: str) -> list[str]:
    """The paper's recipe: driveditfit as the demo config has it; the others DiT's linear schedule (the
    method default) and a plain loss."""
    if method == "driveditfit":  # the paper's progressive schedule, as recorded (the method default is now linear)
        return ["--method.schedule", "progressive"]
    return ["--method.schedule", "null", "--method.lambda_obj", "1.0"]


# ----------------------------------------------------------------------------- data, once


def prepare(data: Path, num_scenes: int, classifier_steps: int, seed: int = 0, device: str = "cpu") -> dict:
    """Scenes -> shards (the encode job's stages in this process) split into train / heldout folders,
    the scenario classifier trained on the real frames, and the real frames' features in both spaces."""
    import pyarrow.parquet as pq

    from bench.encode import plain_loop
    from drivedit.config import load_config
    from drivedit.config.encode import EncodeJob
    from drivedit.data.scenes import write_scenes_dataset
    from drivedit.data.shards import shard_files
    from drivedit.eval.classifier import train_scenario_classifier
    from drivedit.eval.folders import index_folder, vocabulary_for

    data.mkdir(parents=True, exist_ok=True)
    done = data / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    write_scenes_dataset(str(data / "scenes"), num=num_scenes, size=128, seed=seed)
    job = load_config(EncodeJob, DEMO / "encode.yaml", ["--data.input", str(data / "scenes"),
                                                       "--data.output", str(data / "all")])
    rows = plain_loop(job)
    for part in ("train", "heldout"):
        (data / part).mkdir(exist_ok=True)
    counts, seen = {"train": 0, "heldout": 0}, {}
    for f in shard_files(str(data / "all")):
        table = pq.read_table(f)
        scen = table.column("scenario").to_numpy()
        rank = np.zeros(len(scen), dtype=np.int64)  # each row's index among its scenario's rows so far
        for s in np.unique(scen):
            rank[scen == s] = seen.get(s, 0) + np.arange((scen == s).sum())
            seen[s] = seen.get(s, 0) + int((scen == s).sum())
        held = rank % HELDOUT_EVERY == 3  # the 4th, 11th, ... frame of each scenario
        for part, keep in (("train", ~held), ("heldout", held)):
            pq.write_table(table.filter(keep), str(data / part / Path(f).name), compression="zstd")
            counts[part] += int(keep.sum())
    real = index_folder(str(data / "scenes"), vocabulary_for(_scenarios(data)))
    images = real.load(128)  # (N, 128, 128, 3) uint8
    clf, acc = train_scenario_classifier(images, real.scenarios, real.vocabulary, image_size=128,
                                         steps=classifier_steps, seed=seed, device=device, log=print)
    clf.save(data / "classifier")
    np.savez(data / "real_features.npz", classifier=clf(images), vae=vae_features(images, device),
             scenario=real.scenarios)
    info = {"scenes": num_scenes, "encoded": rows, **counts, "classifier_heldout_accuracy": acc,
            "classifier_chance": 1 / len(real.vocabulary), "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(info, indent=1))
    return info


def _scenarios(data: Path) -> list[str]:
    from drivedit.data.shards import read_shard_metadata

    return list(read_shard_metadata(str(data / "train")).scenarios)


_VAE = {}


def _codec(device: str = "cpu"):
    from drivedit.models.codec import load_codec

    if device not in _VAE:
        _VAE[device] = load_codec("autoencoder_kl", "builtin:tiny-vae").to(device)
    return _VAE[device]


@torch.no_grad()
def vae_features(images: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The second feature space, learned without scenario labels: the tiny VAE encoder's posterior mean
    (4, 32, 32) of each 128 px image, average-pooled to (4, 8, 8) -> 256 numbers (colour and layout
    at 16 px cells)."""
    codec = _codec(device)
    vae, scale = codec.vae, codec.scale_factor  # scaled like the DiT's latents (unit variance)
    out = []
    for i in range(0, len(images), 64):
        x = torch.from_numpy(images[i:i + 64]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        mean = vae.encode(x).latent_dist.mean * scale                                          # (B, 4, 32, 32)
        out.append(torch.nn.functional.adaptive_avg_pool2d(mean, 8).flatten(1).cpu().numpy())  # (B, 256)
    return np.concatenate(out)


# ----------------------------------------------------------------------------- one arm


def arms(seeds: list[int], lrs: list[float], names: list[str]) -> list[dict]:
    """Every (arm, lr, seed) of the main table, then the ablations (at driveditfit's first lr; `run` moves
    them to its best one when the sweep has finished), in the order they are worth having if time runs out."""
    table = {**MAIN_ARMS, **ABLATIONS}
    main = [a for a in names if a in MAIN_ARMS]
    out = [dict(arm=a, method=table[a][0], lr=lr, seed=s) for s in seeds for lr in lrs for a in main]
    out += [dict(arm=a, method=table[a][0], lr=None, seed=s) for s in seeds for a in names if a in ABLATIONS]
    return out


def build_job(spec: dict, data: Path, args, steps: int | None = None, lr: float | None = None):
    from drivedit.config import load_config
    from drivedit.config.finetune import FinetuneJob

    method, overrides = {**MAIN_ARMS, **ABLATIONS}[spec["arm"]]
    steps = steps or args.steps
    return load_config(FinetuneJob, DEMO / "finetune.yaml", [
        # every arm at the init the recorded table used (denoise), the init ablations excepted; the default
        # is now `auto` (text here) because those ablations showed denoise never ahead
        "--method.name", method, "--method.scenario_init", "denoise", "--layout.kind", "none", *recipe(method), *overrides,
        "--data.shards", str(data / "train"), "--data.materialize", "false",
        "--optim.total_steps", str(steps), "--optim.global_batch_size", str(args.batch),
        "--optim.lr", str(lr if lr is not None else spec["lr"]), "--optim.seed", str(spec["seed"]),
        "--optim.warmup_steps", str(min(20, steps // 4)),
        "--run.checkpoint_every", str(steps), "--run.log_every", str(max(1, steps // 2)),
        "--sampling.every_steps", "0", "--sampling.at_end", "false",
    ])


@torch.no_grad()
def heldout_loss(model, betas: np.ndarray, data: Path, device: torch.device) -> dict:
    """eps-MSE on the held-out real frames at fixed noise levels (alpha-bar matched in each arm's own
    schedule, so every arm is asked to denoise the same noisy inputs), over the whole latent and inside the
    object boxes (the shards' object mask)."""
    from drivedit.data.shards import read_shard_metadata, training_batch
    from drivedit.train.inprocess import ShardEpochs

    meta = read_shard_metadata(str(data / "heldout"))
    rows = ShardEpochs(data / "heldout", ["scenario", "moments", "moments_flip", "object_mask"], 1, 0).table
    batch = {c: rows.column(c).to_numpy() if c == "scenario" else
             np.stack(rows.column(c).to_numpy(zero_copy_only=False)) for c in rows.column_names}
    g = torch.Generator().manual_seed(1234)
    b = training_batch(batch, meta, g)
    x0, y, mask = b["latents"].to(device), b["scenario"].to(device), b["object_mask"].to(device)  # (N,C,h,w) (N,) (N,1,h,w)
    noise = torch.randn(x0.shape, generator=g).to(device)
    abar = torch.from_numpy(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    C = x0.shape[1]
    total, inside = [], []
    for target in HELDOUT_ALPHA_BARS:
        t = int(torch.argmin((abar - target).abs()))
        a = float(abar[t])
        xt = a ** 0.5 * x0 + (1 - a) ** 0.5 * noise
        tt = torch.full((len(x0),), t, device=device, dtype=torch.long)
        err = torch.cat([((model(xt[i:i + 128], tt[i:i + 128], y[i:i + 128])[:, :C] - noise[i:i + 128]) ** 2)
                         .mean(1, keepdim=True) for i in range(0, len(x0), 128)])  # (N, 1, h, w)
        total.append(float(err.mean()))
        inside.append(float((err * mask).sum() / mask.sum().clamp(min=1)))
    return {"heldout_mse": float(np.mean(total)), "heldout_mse_objects": float(np.mean(inside)),
            "heldout_frames": int(len(x0))}


def score_samples(model, betas, scenarios: list[str], data: Path, device: torch.device, args, grid: Path | None) -> dict:
    from drivedit.eval.classifier import ScenarioClassifier
    from drivedit.eval.evaluate import distribution_metrics
    from drivedit.generate.images import decode_to_uint8
    from drivedit.generate.sampler import DiTSampler, SamplerSettings

    n = args.per_scenario
    labels = torch.arange(len(scenarios)).repeat_interleave(n)                # (S*n,)
    sampler = DiTSampler(model, betas, device)
    # FineDiffusion's tiered table has no null row: it guides each scenario against its superclass
    superclass_of = getattr(model.y_embedder, "superclass_of", None)
    settings = SamplerSettings(sampler=args.sampler, steps=args.sampler_steps, guidance=args.guidance,
                               guidance_kind="superclass" if superclass_of is not None else "cfg")
    latents = torch.cat([sampler.sample(labels[i:i + 256], list(range(i, min(i + 256, len(labels)))), settings,
                                        uncond_labels=superclass_of(labels[i:i + 256]) if superclass_of else None)
                         for i in range(0, len(labels), 256)])               # (S*n, C, h, w)
    images = decode_to_uint8(_codec(str(device)), latents)                   # (S*n, 128, 128, 3)
    if grid is not None:
        from drivedit.generate.grid import save_grid

        pick = np.concatenate([np.arange(s * n, s * n + min(n, 8)) for s in range(len(scenarios))])
        save_grid(images[pick], grid, nrow=min(n, 8), labels=scenarios)
    clf = ScenarioClassifier.load(data / "classifier", device=str(device))
    feats, pred = clf.embed(images)
    vae = vae_features(images, str(device))
    real = np.load(data / "real_features.npz")
    y = labels.numpy()
    out = {"overall": distribution_metrics(real["classifier"], feats, kid_subset_size=min(100, len(y)))}
    out["overall"]["condition_accuracy"] = float((pred == y).mean())
    out["overall"]["fid_vae"] = distribution_metrics(real["vae"], vae, kid_subsets=1, kid_subset_size=2)["fid"]
    out["per_scenario"] = {}
    for s, name in enumerate(scenarios):
        r, f = real["scenario"] == s, y == s
        m = distribution_metrics(real["classifier"][r], feats[f], kid_subset_size=min(50, int(f.sum())))
        m["condition_accuracy"] = float((pred[f] == s).mean())
        m["fid_vae"] = distribution_metrics(real["vae"][r], vae[f], kid_subsets=1, kid_subset_size=2)["fid"]
        out["per_scenario"][name] = {k: v for k, v in m.items() if k != "notes"}
    out["overall"].pop("notes", None)
    return out


def run_arm(spec: dict, data: Path, out: Path, args) -> dict:
    """Train one arm and measure it; the result line written to results.jsonl."""
    from drivedit.train.inprocess import run_in_process

    device = torch.device(args.device)
    job = build_job(spec, data, args)
    t0 = time.perf_counter()
    loop = run_in_process(job, _base_path(), device)
    train_s = time.perf_counter() - t0
    with loop._bundle_weights() as model:
        betas = loop.schedule.final_betas()
        table = model.y_embedder.embedding_table.weight.detach().float().cpu()
        moved = float((table - loop.initial_table).abs().max())
        held = heldout_loss(model, betas, data, device)
        grid = out / "grids" / f"{spec['arm']}-lr{spec['lr']:g}.png" if spec["seed"] == args.seeds[0] else None
        if grid is not None:
            grid.parent.mkdir(parents=True, exist_ok=True)
        scores = score_samples(model, betas, list(loop.meta.scenarios), data, device, args, grid)
    counts = loop.result.counts()
    return {**spec, "steps": loop.step, "images_seen": loop.rows_read, "epochs": loop.data["epoch"],
            "global_batch": job.optim.global_batch_size, "trainable_params": counts["trainable"],
            "groups": counts.get("groups"), "table_trained": "y_embedder.embedding_table.weight" in loop.trainable,
            "table_max_change": moved, "final_loss": loop.last_metrics.get("loss"),
            "train_seconds": round(train_s, 1), "device": str(device), **held, **scores,
            "settings": {k: getattr(args, k) for k in ("steps", "batch", "per_scenario", "sampler", "sampler_steps",
                                                       "guidance")}}


def _base_path() -> str:
    from drivedit.models.checkpoint import resolve_model_source

    return str(resolve_model_source("builtin:tiny-dit"))


def step_times(data: Path, args, steps: int = 40) -> dict:
    """Seconds per optimizer step and peak memory of each method, each run alone in this process (the arms
    themselves share the machine with other workers, so their own timings are not comparable)."""
    from drivedit.train.inprocess import run_in_process

    out = {}
    for arm in [a for a in MAIN_ARMS if a in args.arms]:
        spec = dict(arm=arm, method=MAIN_ARMS[arm][0], lr=args.lrs[0], seed=0)
        job = build_job(spec, data, args, steps=steps)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        loop = run_in_process(job, _base_path(), torch.device(args.device))
        m = loop.last_metrics  # the second half of the steps: the first (allocations, warm-up) is not in it
        out[arm] = {"step_seconds": job.optim.global_batch_size / m["images_per_s"], "images_per_s": m["images_per_s"],
                    "peak_mem_gib": m["peak_mem_gib"], "trainable_params": loop.result.counts()["trainable"]}
        print(f"timing {arm}: {out[arm]['step_seconds'] * 1000:.1f} ms/step, {m['peak_mem_gib']:.3f} GiB", flush=True)
    return out


# ----------------------------------------------------------------------------- the run


class InProcess:
    """--jobs 0: the arms one after another in this process (tests; no process start-up)."""

    def __init__(self, data: Path, out: Path, args):
        import queue

        self.queue, self.results, self.args = self, queue.Queue(), (data, out, args)

    def put(self, spec: dict) -> None:
        data, out, args = self.args
        try:
            self.results.put({**run_arm(spec, data, out, args), "started": spec["started"]})
        except Exception as e:
            self.results.put({**spec, "error": f"{type(e).__name__}: {e}"})

    def close(self) -> None:
        pass


def _worker(queue, results, data: Path, out: Path, args) -> None:
    torch.set_num_threads(args.threads)
    while True:
        spec = queue.get()
        if spec is None:
            return
        try:
            row = run_arm(spec, data, out, args)
        except Exception as e:  # one arm's failure is reported, the others go on
            row = {**spec, "error": f"{type(e).__name__}: {e}"}
        results.put(row)


def best_lr(rows: list[dict], arm: str) -> float | None:
    """The sweep value with the lowest mean overall FID of `arm` (None before any of its rows exists)."""
    by: dict[float, list[float]] = {}
    for r in rows:
        if r.get("arm") == arm and "error" not in r and r["overall"]["fid"] is not None:
            by.setdefault(r["lr"], []).append(r["overall"]["fid"])
    return min(by, key=lambda lr: statistics.mean(by[lr])) if by else None


class Pool:
    """--jobs worker processes taking arms from a queue; results come back in the order they finish."""

    def __init__(self, data: Path, out: Path, args):
        ctx = mp.get_context("spawn")  # CUDA in the workers
        self.queue, self.results = ctx.Queue(), ctx.Queue()
        self.workers = [ctx.Process(target=_worker, args=(self.queue, self.results, data, out, args))
                        for _ in range(args.jobs)]
        for w in self.workers:
            w.start()

    def close(self) -> None:
        for _ in self.workers:
            self.queue.put(None)
        for w in self.workers:
            w.join(timeout=60)
            if w.is_alive():
                w.terminate()


def dispatch(pool: Pool, specs: list[dict], done: list[dict], results_path: Path, t0: float, args) -> None:
    """Run `specs` (skipping those `done` already holds), at most --jobs at once; no arm starts that
    would end after --budget-s (judged by the median arm so far)."""
    have = {(r["arm"], r["lr"], r["seed"]) for r in done if "error" not in r}
    pending = [sp for sp in specs if (sp["arm"], sp["lr"], sp["seed"]) not in have]
    running, seconds = 0, []
    while pending or running:
        while pending and running < max(1, args.jobs):
            elapsed, typical = time.perf_counter() - t0, statistics.median(seconds) if seconds else 0.0
            if args.budget_s and elapsed + typical * 1.1 > args.budget_s:
                print(f"budget: {len(pending)} arms not started ({elapsed:.0f} s of {args.budget_s} s)", flush=True)
                pending = []
                break
            pool.queue.put({**pending.pop(0), "started": time.perf_counter()})
            running += 1
        if not running:
            break
        row = pool.results.get()
        running -= 1
        seconds.append(time.perf_counter() - row.pop("started"))
        done.append(row)
        with open(results_path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        tag = f"[{row['arm']} lr {row['lr']:g} seed {row['seed']}]"
        if "error" in row:
            print(f"{tag} FAILED: {row['error']}", flush=True)
            continue
        o = row["overall"]
        print(f"{tag} FID {o['fid']:.2f} acc {o['condition_accuracy']:.3f} FID-vae {o['fid_vae']:.3f} held-out mse "
              f"{row['heldout_mse']:.4f} ({seconds[-1]:.0f} s; {time.perf_counter() - t0:.0f} s in)", flush=True)


def run(args) -> int:
    data, out = args.data.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = prepare(data, args.num_scenes, args.classifier_steps, device=args.device)
    print(f"data: {info}", flush=True)
    (out / "data.json").write_text(json.dumps(info, indent=1))
    results_path = out / "results.jsonl"
    done = [json.loads(x) for x in results_path.read_text().splitlines()] if results_path.exists() else []
    if args.timing_steps and not (out / "timing.json").exists():
        (out / "timing.json").write_text(json.dumps(step_times(data, args, args.timing_steps), indent=1))
    specs = arms(args.seeds, args.lrs, args.arms)
    pool = Pool(data, out, args) if args.jobs > 0 else InProcess(data, out, args)
    try:
        dispatch(pool, [sp for sp in specs if sp["lr"] is not None], done, results_path, t0, args)
        lr = best_lr(done, "driveditfit") or args.lrs[0]  # the ablations run at driveditfit's best sweep value
        dispatch(pool, [{**sp, "lr": lr} for sp in specs if sp["lr"] is None], done, results_path, t0, args)
    finally:
        pool.close()
    text = report(out)
    (out / "table.md").write_text(text)
    print(text)
    return 0


# ----------------------------------------------------------------------------- tables


def _rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [r for r in rows if "error" not in r]


def _ms(values: list[float], fmt: str = ".2f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def _get(r: dict, key: str):
    return r.get(key) if key in r else r["overall"].get(key)


METRICS = [("fid", "FID", ".2f"), ("kid", "KID", ".4f"), ("precision", "precision", ".3f"),
           ("recall", "recall", ".3f"), ("condition_accuracy", "cond. acc.", ".3f"), ("fid_vae", "FID (VAE space)", ".3f"),
           ("heldout_mse", "held-out MSE", ".4f"), ("heldout_mse_objects", "held-out MSE in boxes", ".4f")]


def _separated(a: list[float], b: list[float]) -> bool:
    """a is below b beyond the seed spread: every seed of a below every seed of b (two seeds at least)."""
    return bool(len(a) > 1 and len(b) > 1 and max(a) < min(b))


def report(out: Path) -> str:
    rows = _rows(out)
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else {}
    if not rows:
        return "no finished arm in " + str(out / "results.jsonl")
    settings = rows[0]["settings"]
    arm_lr = {a: best_lr(rows, a) for a in {**MAIN_ARMS, **ABLATIONS} if best_lr(rows, a) is not None}
    at_best = {a: [r for r in rows if r["arm"] == a and r["lr"] == lr] for a, lr in arm_lr.items()}
    lines = [f"{settings['steps']} steps at batch {settings['batch']} per arm, {settings['per_scenario']} generated images "
             f"per scenario ({settings['sampler']} {settings['sampler_steps']} steps, guidance {settings['guidance']}); "
             f"device {rows[0]['device']}; mean ± std over seeds; each arm at its best learning rate of the sweep "
             "(lowest mean FID). FID / KID / precision / recall / accuracy in the scenario classifier's space.", ""]
    main = [a for a in MAIN_ARMS if a in at_best]
    head = ["arm", "lr", "seeds", "trainable", "ms/step", "peak GiB"] + [t for _, t, _ in METRICS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in sorted(main, key=lambda a: statistics.mean(r["overall"]["fid"] for r in at_best[a])):
        rs, t = at_best[a], timing.get(a, {})
        cells = [a, f"{arm_lr[a]:g}", str(len(rs)), f"{rs[0]['trainable_params']:,}",
                 f"{t['step_seconds'] * 1000:.1f}" if t else "-", f"{t['peak_mem_gib']:.3f}" if t else "-"]
        cells += [_ms([_get(r, k) for r in rs], f) for k, _, f in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    order = sorted(main, key=lambda a: statistics.mean(r["overall"]["fid"] for r in at_best[a]))
    gaps = [f"{a} < {b}: {'yes' if _separated([r['overall']['fid'] for r in at_best[a]], [r['overall']['fid'] for r in at_best[b]]) else 'no'}"
            for a, b in zip(order, order[1:])]
    lines += ["", "FID rank holds beyond the seed spread (every seed of the better arm below every seed of the next): "
              + "; ".join(gaps)]
    lrs = sorted({r["lr"] for r in rows if r["arm"] in MAIN_ARMS})
    if len(lrs) > 1:
        lines += ["", "Learning-rate sweep, overall FID:", "", "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for a in main:
            lines.append(f"| {a} | " + " | ".join(_ms([r["overall"]["fid"] for r in rows if r["arm"] == a and r["lr"] == lr])
                                                  for lr in lrs) + " |")
    scenarios = list(rows[0]["per_scenario"])
    lines += ["", "Per-scenario FID (classifier space) / condition accuracy:", "",
              "| scenario | " + " | ".join(main) + " |", "|---|" + "---|" * len(main)]
    for s in scenarios:
        lines.append(f"| {s} | " + " | ".join(
            _ms([r["per_scenario"][s]["fid"] for r in at_best[a]], ".1f") + " / " +
            _ms([r["per_scenario"][s]["condition_accuracy"] for r in at_best[a]], ".2f") for a in main) + " |")
    abl = [a for a in ABLATIONS if a in at_best]
    if abl and "driveditfit" in at_best:
        base = [r for r in rows if r["arm"] == "driveditfit" and r["lr"] == at_best[abl[0]][0]["lr"]]
        lines += ["", f"Ablations of driveditfit at lr {at_best[abl[0]][0]['lr']:g} (driveditfit = paper selection, "
                  "denoise init, progressive schedule, lambda_obj 2):", "",
                  "| arm | changes | trainable | " + " | ".join(t for _, t, _ in METRICS) + " | FID vs driveditfit |",
                  "|---|---|---|" + "---|" * (len(METRICS) + 1)]
        for a, rs in [("driveditfit", base)] + [(a, at_best[a]) for a in abl]:
            if not rs:
                continue
            fa, fb = [r["overall"]["fid"] for r in rs], [r["overall"]["fid"] for r in base]
            verdict = "-" if a == "driveditfit" else "one seed" if min(len(fa), len(fb)) < 2 else (
                "better beyond spread" if _separated(fa, fb) else
                                                      "worse beyond spread" if _separated(fb, fa) else "within spread")
            lines.append(f"| {a} | {ABLATION_OF.get(a, '-')} | {rs[0]['trainable_params']:,} | " +
                         " | ".join(_ms([_get(r, k) for r in rs], f) for k, _, f in METRICS) + f" | {verdict} |")
    return "\n".join(lines)


def log_to_mlflow(out: Path, tracking_uri: str, experiment: str) -> int:
    """One MLflow run per arm and seed in one experiment, tagged (arm, method, ablation, lr, seed), with its
    metrics, per-scenario metrics and (seed 0) its sample grid; the tables as an artifact of a summary run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.set_experiment(experiment)
    logged = set(mlflow.search_runs([exp.experiment_id], output_format="pandas").get("tags.mlflow.runName", []))
    new = 0
    for r in _rows(out):
        name = f"{r['arm']}-lr{r['lr']:g}-s{r['seed']}-{r['steps']}steps"  # budgets share the experiment
        if name in logged:  # a rerun after more arms finished logs only the new ones
            continue
        new += 1
        with mlflow.start_run(run_name=name):
            mlflow.set_tags({"arm": r["arm"], "method": r["method"], "ablation": ABLATION_OF.get(r["arm"], "none"),
                             "lr": r["lr"], "seed": r["seed"], "steps": r["steps"], "device": r["device"]})
            mlflow.log_params({**r["settings"], "trainable_params": r["trainable_params"]})
            metrics = {k: v for k, v in r["overall"].items() if isinstance(v, (int, float)) and v is not None}
            metrics.update({k: r[k] for k in ("heldout_mse", "heldout_mse_objects", "table_max_change", "train_seconds")})
            for s, m in r["per_scenario"].items():
                metrics.update({f"{s.replace(' ', '_')}.{k}": v for k, v in m.items() if isinstance(v, (int, float))})
            mlflow.log_metrics(metrics)
            grid = out / "grids" / f"{r['arm']}-lr{r['lr']:g}.png"
            if grid.exists() and r["seed"] == min(x["seed"] for x in _rows(out)):
                mlflow.log_artifact(str(grid), "samples")
    with mlflow.start_run(run_name=f"table-{out.name}"):
        mlflow.set_tag("arm", "summary")
        (out / "table.md").write_text(report(out))
        mlflow.log_artifact(str(out / "table.md"))
        for f in ("timing.json", "results.jsonl"):
            if (out / f).exists():
                mlflow.log_artifact(str(out / f))
    print(f"{new} arms logged to {tracking_uri}, experiment {experiment} ({len(logged)} runs were there before)")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "run", "report", "mlflow"])
    p.add_argument("--data", type=Path, default=Path("runs/methods-data"), help="scenes, shards, classifier")
    p.add_argument("--out", type=Path, default=Path("runs/bench-methods-table"), help="results, grids, tables")
    p.add_argument("--arms", nargs="+", default=list(MAIN_ARMS) + list(ABLATIONS),
                   choices=list(MAIN_ARMS) + list(ABLATIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, default=[2e-3, 2e-4],
                   help="the sweep every main arm gets (method lr multipliers apply on top)")
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps of every arm (the demo's)")
    p.add_argument("--batch", type=int, default=32, help="global batch (the demo's)")
    p.add_argument("--per-scenario", type=int, default=64, help="generated images per scenario per arm")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--sampler-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--num-scenes", type=int, default=900, help="real frames (the demo's)")
    p.add_argument("--classifier-steps", type=int, default=400)
    p.add_argument("--timing-steps", type=int, default=40, help="steps of the alone-in-the-process timing (0: skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (8 share an H100/H200 well; 1-2 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--budget-s", type=float, default=0, help="start no arm that would end after this (0: no limit)")
    p.add_argument("--tracking-uri", default="sqlite:///runs/bench-methods-table/mlflow.db")
    p.add_argument("--experiment", default="drivedit-bench-methods-table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage == "prepare":
        print(json.dumps(prepare(args.data.resolve(), args.num_scenes, args.classifier_steps, device=args.device),
                         indent=1))
        return 0
    if args.stage == "run":
        return run(args)
    if args.stage == "report":
        text = report(args.out.resolve())
        (args.out / "table.md").write_text(text)
        print(text)
        return 0
    return log_to_mlflow(args.out.resolve(), args.tracking_uri, args.experiment)


if __name__ == "__main__":
    sys.exit(main())
