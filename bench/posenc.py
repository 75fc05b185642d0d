"""Benchmark: the position encodings `abs` (baseline), `rope` and `gta` pre-trained from scratch, same budget.

Every run is the shipped tiny DiT's pre-training (configs/pretrain/tiny.yaml: DiT-T/4, 32x32 pixel latents,
the 14-class procedural object domain, method `full`, AdamW + warmup + cosine, grad clip, EMA) run by the
fine-tuning job's own per-worker loop (`drivedit.train.loop.WorkerLoop`, one worker, Ray's edges replaced by
an in-process reader of the encoded shards), from a `drivedit new-model` init that differs only in `posenc`.
Same data order, steps, batch and seeds for every encoding. At each checkpointed step it measures, on the
EMA weights:
  - the training loss (the loop's own mean over the last `log_every` steps),
  - a held-out loss: the hybrid DiT loss (eps MSE + VLB) on held-out object images (another render seed)
    at fixed timesteps and noise, the same for every run, so it is a low-noise curve;
  - at the FID steps: FID in the eval's feature space (drivedit/eval: the scenario classifier trained once
    on the real training images) between class-balanced DDIM samples and the held-out real images, and
    the classifier's condition accuracy on the samples.
The report gives mean and spread (half the range, i.e. |a - b| / 2 for two seeds) per encoding and
the ratio to `abs`.

    python bench/posenc.py                                   # the figures in BENCHMARKS.md
    python bench/posenc.py --steps 100 --eval-steps 50 100 --fid-steps 100 --seeds 0 --posencs abs gta  # a quick look
    python bench/posenc.py --report                          # re-print the table from what --out holds
    python bench/posenc.py --cost 20                         # CPU seconds per training step of each encoding

Runs go two at a time in subprocesses (`--parallel`), each with `--threads` torch threads.
Data: `python -m drivedit.data.objects` (600 per class, 32 px, seed 0) encoded by the encode job with
configs/pretrain/encode-objects.yaml, both written once under --out and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

POSENCS = ("abs", "rope", "gta")
BASELINE = "abs"
PRETRAIN = ROOT / "configs" / "pretrain"
COLUMNS = ["scenario", "moments", "moments_flip", "object_mask"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-posenc"), help="data, runs and results go here")
    p.add_argument("--posencs", nargs="+", choices=POSENCS, default=list(POSENCS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="init and data-order seeds")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every run")
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (tiny.yaml's)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.99,
                   help="EMA decay (tiny.yaml's 0.999 is for 8000 steps; over a few hundred steps it would "
                        "still hold mostly the init)")
    p.add_argument("--eval-steps", nargs="+", type=int, default=[100, 200, 300, 400],
                   help="checkpointed steps where losses are measured (a multiple of the first)")
    p.add_argument("--fid-steps", nargs="+", type=int, default=[200, 400], help="steps where FID is measured too")
    p.add_argument("--per-class", type=int, default=8, help="generated images per class for FID")
    p.add_argument("--heldout-per-class", type=int, default=20, help="held-out real images per class")
    p.add_argument("--sampler-steps", type=int, default=16, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (tiny.yaml's)")
    p.add_argument("--classifier-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--report", action="store_true", help="only print the table from the results under --out")
    p.add_argument("--cost", type=int, metavar="STEPS", default=0,
                   help="only measure the CPU time of a training step per encoding (STEPS round-robin steps at "
                        "--batch, after 2 warm-up steps; process time, so other load does not count)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # "POSENC:SEED": one run, in a subprocess
    args = p.parse_args(argv)
    if any(s % min(args.eval_steps) for s in args.eval_steps) or max(args.eval_steps) != args.steps:
        p.error("--eval-steps must be multiples of the smallest and end at --steps (they are the checkpoints)")
    if not set(args.fid_steps) <= set(args.eval_steps):
        p.error("--fid-steps must be among --eval-steps")
    return args


# ----------------------------------------------------------------------------- shared material


def prepare(out: Path, args) -> None:
    """Training objects + their shards (encode job), held-out objects, the feature classifier: once."""
    from drivedit.data.objects import CLASS_NAMES, write_objects_dataset
    from drivedit.data.shards import shard_files
    from drivedit.eval.classifier import train_scenario_classifier
    from drivedit.eval.folders import index_folder, vocabulary_for

    if not (out / "objects" / "labels.json").exists():
        write_objects_dataset(out / "objects", num_per_class=600, size=32, seed=0)
    if not shard_files(str(out / "shards")):
        subprocess.run([sys.executable, "-m", "drivedit.cli", "encode", "--config", str(PRETRAIN / "encode-objects.yaml"),
                        "--data.input", str(out / "objects"), "--data.output", str(out / "shards")], check=True)
    if not (out / "heldout" / "labels.json").exists():
        write_objects_dataset(out / "heldout", num_per_class=args.heldout_per_class, size=32, seed=1)
    if not (out / "classifier" / "classifier.json").exists():
        real = index_folder(str(out / "objects"), vocabulary_for(CLASS_NAMES))
        clf, acc = train_scenario_classifier(real.load(32), real.scenarios, real.vocabulary, image_size=32,
                                             steps=args.classifier_steps, seed=0, log=print)
        print(f"feature classifier: held-out accuracy {acc:.3f} on {clf.num_heldout} training-domain images")
        clf.save(out / "classifier")


class ShardEpochs:
    """The encoded shards in memory, served as numpy micro-batches in a seeded order per epoch (what Ray
    Data's shard iterator gives a worker)."""

    def __init__(self, shards: Path, micro: int, seed: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from drivedit.data.shards import shard_files

        self.table = pa.concat_tables([pq.read_table(f, columns=COLUMNS) for f in shard_files(str(shards))])
        self.micro, self.seed = micro, seed

    def __call__(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.table.num_rows)
        for i in range(0, len(order) - self.micro + 1, self.micro):
            t = self.table.take(order[i:i + self.micro])
            yield {c: t.column(c).to_numpy() if c == "scenario" else
                   np.stack(t.column(c).to_numpy(zero_copy_only=False)) for c in COLUMNS}


class Evaluator:
    """Held-out loss and FID of a model, against the same held-out images, timesteps and noise for every run."""

    def __init__(self, out: Path, args):
        from drivedit.data.objects import CLASS_NAMES
        from drivedit.eval.classifier import ScenarioClassifier
        from drivedit.eval.folders import index_folder, vocabulary_for

        self.args = args
        self.clf = ScenarioClassifier.load(out / "classifier")
        real = index_folder(str(out / "heldout"), vocabulary_for(CLASS_NAMES))
        images = real.load(32)  # (N, 32, 32, 3) uint8
        self.real_features = self.clf(images)
        self.x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the pixel codec's latents
        self.y = torch.from_numpy(real.scenarios)
        g = torch.Generator().manual_seed(1234)
        self.t = torch.randint(0, 1000, (len(images),), generator=g)
        self.noise = torch.randn(self.x0.shape, generator=g)
        self.num_classes = len(CLASS_NAMES)

    @torch.no_grad()
    def heldout_loss(self, model, diffusion) -> dict:
        terms = [diffusion.training_losses(model, self.x0[i:i + 64], self.t[i:i + 64], {"y": self.y[i:i + 64]},
                                           self.noise[i:i + 64]) for i in range(0, len(self.x0), 64)]
        return {k: float(torch.cat([d[k] for d in terms]).mean()) for k in ("loss", "mse")}

    def fid(self, model, betas) -> dict:
        from drivedit.eval.evaluate import distribution_metrics
        from drivedit.generate.grid import latents_to_uint8
        from drivedit.generate.sampler import DiTSampler, SamplerSettings
        from drivedit.models.codec import sample_clip_range

        a = self.args
        labels = torch.arange(self.num_classes).repeat_interleave(a.per_class)  # (K*n,)
        sampler = DiTSampler(model, betas, "cpu", clip_x0=sample_clip_range("pixel"))
        settings = SamplerSettings(sampler="ddim", steps=a.sampler_steps, guidance=a.guidance)
        images = latents_to_uint8(sampler.sample(labels, list(range(len(labels))), settings))  # pixel codec: identity
        feats, pred = self.clf.embed(images)
        m = distribution_metrics(self.real_features, feats, kid_subset_size=min(50, len(labels)))
        return {"fid": m["fid"], "kid": m["kid"], "condition_accuracy": float((pred == labels.numpy()).mean())}


# ----------------------------------------------------------------------------- one run


def run_one(out: Path, posenc: str, seed: int, args) -> dict:
    from drivedit.config import load_config
    from drivedit.config.finetune import FinetuneJob
    from drivedit.new_model import write_new_model
    from drivedit.train.loop import Edges, LoopContext, WorkerLoop

    torch.set_num_threads(args.threads)
    run_dir = out / "runs" / f"{posenc}-s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "rows.jsonl").unlink(missing_ok=True)
    init = write_new_model("DiT-T/4", str(run_dir / "init.safetensors"), input_size=32, in_channels=3,
                           num_classes=14, posenc=posenc, seed=seed)
    job = load_config(FinetuneJob, PRETRAIN / "tiny.yaml", [
        "--model.source", init["path"], "--data.shards", str(out / "shards"),
        "--optim.total_steps", str(args.steps), "--optim.global_batch_size", str(args.batch),
        "--optim.lr", str(args.lr), "--optim.warmup_steps", str(args.warmup), "--optim.ema_decay", str(args.ema),
        "--optim.seed", str(seed), "--run.checkpoint_every", str(min(args.eval_steps)),
        "--run.log_every", str(min(args.eval_steps)), "--run.name", run_dir.name,
        "--run.storage_path", str(out / "runs"), "--sampling.every_steps", "0", "--sampling.at_end", "false",
    ])
    evaluator = Evaluator(out, args)
    rows: list[dict] = []
    t0 = time.perf_counter()
    train_seconds = [0.0]

    def report(metrics: dict, directory, name: str) -> None:
        step = int(metrics["step"])
        if step not in args.eval_steps:
            return
        train_seconds[0] = time.perf_counter() - t0 - sum(r["eval_seconds"] for r in rows)
        te = time.perf_counter()
        with loop._bundle_weights() as model:  # the EMA weights, eval mode, swapped back afterwards
            row = {"step": step, "train_loss": metrics["loss"], **{f"heldout_{k}": v for k, v in
                   evaluator.heldout_loss(model, loop.schedule.diffusion_at(step - 1)).items()}}
            if step in args.fid_steps:
                row.update(evaluator.fid(model, loop.schedule.final_betas()))
        row["eval_seconds"] = time.perf_counter() - te
        rows.append(row)
        with open(run_dir / "rows.jsonl", "a") as f:  # a run stopped early still reports what it measured
            f.write(json.dumps(row) + "\n")
        print(f"[{posenc} seed {seed}] " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in row.items()), flush=True)

    ctx = LoopContext(base_path=init["path"], base_ref=init["path"], run_dir=str(run_dir))
    edges = Edges(0, 1, torch.device("cpu"), None, ShardEpochs(out / "shards", job.micro_batch_size, seed),
                  report, lambda model, ignore: model)
    loop = WorkerLoop(job, ctx, edges)
    t0 = time.perf_counter()
    loop.run()
    result = {"posenc": posenc, "seed": seed, "parameters": init["parameters"], "rows": rows,
              "train_seconds": round(train_seconds[0], 1), "threads": args.threads,
              "settings": {k: getattr(args, k) for k in ("steps", "batch", "lr", "warmup", "ema", "per_class",
                                                         "sampler_steps", "guidance", "heldout_per_class")}}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- the table


def _rows_from_log(path: Path, posenc: str, seed: int) -> list[dict]:
    """The rows a run printed ("[abs seed 0] step 100 train_loss 0.55 ..."), for runs that left no rows.jsonl."""
    prefix, rows = f"[{posenc} seed {seed}] ", []
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith(prefix):
            words = line[len(prefix):].split()
            rows.append({k: int(v) if k == "step" else float(v) for k, v in zip(words[::2], words[1::2])})
    return rows


def load_result(out: Path, posenc: str, seed: int) -> dict | None:
    """A finished run's result.json, or the rows a stopped run measured (marked complete: false)."""
    run_dir = out / "runs" / f"{posenc}-s{seed}"
    if (run_dir / "result.json").exists():
        return {**json.loads((run_dir / "result.json").read_text()), "complete": True}
    jsonl = run_dir / "rows.jsonl"
    rows = ([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.exists()
            else _rows_from_log(out / f"{posenc}-s{seed}.log", posenc, seed))
    return {"posenc": posenc, "seed": seed, "rows": rows, "complete": False} if rows else None


def _stat(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def table(results: list[dict], args) -> str:
    by = {pe: [r for r in results if r["posenc"] == pe] for pe in args.posencs}
    by = {pe: rs for pe, rs in by.items() if rs}
    lines = []
    metrics = [("heldout_loss", "held-out loss"), ("train_loss", "train loss"), ("fid", "FID"),
               ("condition_accuracy", "cond. acc.")]
    for key, title in metrics:
        lines.append(f"\n{title} (mean ± half-range over seeds {args.seeds}; ratio to {BASELINE})")
        lines.append(f"{'step':>6}" + "".join(f" {pe:>18}" for pe in by) +
                     "".join(f" {pe + '/' + BASELINE:>10}" for pe in by if pe != BASELINE))
        for step in args.eval_steps:
            cells, means = [], {}
            for pe, rs in by.items():
                vals = [row[key] for r in rs for row in r["rows"] if row["step"] == step and row.get(key) is not None]
                if not vals:
                    cells.append(f" {'-':>18}")
                    continue
                means[pe], spread = _stat(vals)
                cells.append(f" {means[pe]:>10.4g} ± {spread:<5.2g}" if len(vals) == len(args.seeds) else
                             f" {means[pe]:>10.4g} ({len(vals)} seed)")
            if all(c.strip() == "-" for c in cells):
                continue
            ratios = [f" {means[pe] / means[BASELINE]:>10.3f}" if pe in means and means.get(BASELINE) else f" {'-':>10}"
                      for pe in by if pe != BASELINE]
            lines.append(f"{step:>6}" + "".join(cells) + "".join(ratios))
    secs = {pe: _stat(done)[0] for pe, rs in by.items() if (done := [r["train_seconds"] for r in rs if r["complete"]])}
    if secs:
        lines.append("\ntraining seconds per finished run (1 worker, evaluation excluded): " +
                     ", ".join(f"{pe} {s:.0f}" for pe, s in secs.items()))
    stopped = [f"{r['posenc']} seed {r['seed']} (to step {r['rows'][-1]['step']})" for r in results if not r["complete"]]
    if stopped:
        lines.append("stopped before the last step, reported up to where they got: " + ", ".join(stopped))
    return "\n".join(lines)


def step_cost(args) -> str:
    """CPU seconds per optimizer step (forward, backward, AdamW) of the same DiT-T/4 under each encoding,
    measured round-robin in this process with time.process_time."""
    import statistics

    from drivedit.models.diffusion import GaussianDiffusion, linear_betas
    from drivedit.models.dit import build_dit, dit_config

    torch.set_num_threads(args.threads)
    diffusion = GaussianDiffusion(linear_betas())
    runs = {}
    for pe in args.posencs:
        torch.manual_seed(0)
        model = build_dit(dit_config("DiT-T/4", input_size=32, in_channels=3, num_classes=14, posenc=pe)).train()
        runs[pe] = (model, torch.optim.AdamW(model.parameters(), 1e-4), [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    t, y = torch.randint(0, 1000, (args.batch,), generator=g), torch.randint(0, 14, (args.batch,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    for i in range(args.cost + 2):
        for model, opt, times in runs.values():
            t0 = time.process_time()
            diffusion.training_losses(model, x, t, {"y": y}, noise)["loss"].mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.process_time() - t0)
    med = {pe: statistics.median(times) for pe, (_, _, times) in runs.items()}
    base = med.get(BASELINE, next(iter(med.values())))
    return "\n".join([f"step cost, DiT-T/4 at 32x32, batch {args.batch}, {args.threads} thread(s), median of "
                      f"{args.cost} round-robin steps (CPU seconds)"] +
                     [f"{pe:>5} {m:.4f} s  {m / base:.2f}x {BASELINE}" for pe, m in med.items()])


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    if args.cost:
        print(step_cost(args))
        return 0
    if args.run:
        posenc, seed = args.run.split(":")
        run_one(out, posenc, int(seed), args)
        return 0
    if not args.report:
        t0 = time.perf_counter()
        prepare(out, args)
        pending = [(pe, s) for s in args.seeds for pe in args.posencs]
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
        running: list[tuple[subprocess.Popen, object]] = []
        while pending or running:
            while pending and len(running) < args.parallel:
                pe, s = pending.pop(0)
                log = open(out / f"{pe}-s{s}.log", "w")
                cmd = [sys.executable, __file__, *passthrough, "--run", f"{pe}:{s}"]
                running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            time.sleep(2)
            for proc, log in list(running):
                if proc.poll() is not None:
                    log.close()
                    running.remove((proc, log))
                    if proc.returncode:
                        raise SystemExit(f"run {proc.args[-1]} failed (exit {proc.returncode}); see {log.name}")
        print(f"all runs done in {time.perf_counter() - t0:.0f}s wall")
    results = [r for pe in args.posencs for s in args.seeds if (r := load_result(out, pe, s)) is not None]
    summary = {"command": "python bench/posenc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "results": results}
    (out / "posenc.json").write_text(json.dumps(summary, indent=1))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
