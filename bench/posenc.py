"""Benchmark: the position encodings `abs` (baseline), `rope` and `gta` pre-trained from scratch, same budget.

Every run is the shipped tiny DiT's pre-training setting (configs/pretrain/: DiT-T/4 on the 32x32x4 latents
of builtin:tiny-vae, i.e. 128 px images of the 14-class procedural object domain; tiny.yaml's recipe: method
`full`, AdamW lr 1e-3, warmup, cosine to 0.1x, grad clip 1, EMA) run by the fine-tuning job's own per-worker
loop (`drivedit.train.loop.WorkerLoop`, one worker, Ray's edges replaced by an in-process reader of the
shards; bf16 autocast on CUDA, as the loop does on GPU workers), from a `drivedit new-model` init that differs
only in `posenc`. Same data order, steps, batch and seeds for every encoding. At each evaluation step it
measures, on the EMA weights:
  - the training loss (the loop's own mean over the steps since the last evaluation),
  - a held-out loss: the hybrid DiT loss (eps MSE + VLB) on the latents of held-out object images (another
    render seed) at fixed timesteps and noise, the same for every run: a low-noise curve;
  - at the FID steps (the middle and the last evaluation): FID and KID in the eval's feature space (the
    scenario classifier of drivedit/eval, trained once on the training images) between class-balanced DDIM
    samples decoded to 128 px by the tiny VAE and the held-out images, and the classifier's condition
    accuracy on the samples.
The report gives mean and spread (half the range over seeds) per encoding and the ratio to `abs`.

    python bench/posenc.py --prepare-only --data .devdata/posenc      # once, here (Ray): classifier etc.
    nice -n 5 python bench/posenc.py --steps 600 --batch 32 --out runs/bench-posenc/cpu   # BENCHMARKS.md, CPU
    python bench/posenc.py --device cuda --budget-s 100 --out runs/bench-posenc/gpu       # the GPU part
    python bench/posenc.py --report --out DIR                         # re-print the table of a run
    python bench/posenc.py --cost 20                                   # seconds per training step per encoding

With --budget-s the step count is sized to the budget: every run first times the loop on a few steps (all
runs at once, as they will train), then all train the same number of steps, which fills the budget less
an evaluation reserve. Runs are processes (`--parallel` at a time; on one GPU all six at once: the tiny
model leaves the GPU mostly idle between kernel launches). Results go to --out as they are measured:
rows.jsonl (one line per evaluation), results.json and results.md (rewritten every few seconds), so a
part stopped at its budget keeps every figure it measured. Data: see bench/posenc_data.py (--data is the
small prepared folder that travels; --work holds the shards, rendered and encoded in-process where the
encode job's are absent).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()  # the budget counts from here: before torch's import, which is slow on a busy machine
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import posenc_data as material  # noqa: E402
from bench.posenc_report import table, write_results  # noqa: E402

POSENCS = ("abs", "rope", "gta")
PRETRAIN = ROOT / "configs" / "pretrain"
COLUMNS = ["scenario", "moments", "moments_flip", "object_mask"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(".devdata/posenc"), help="prepared folder (classifier, metadata)")
    p.add_argument("--work", type=Path, default=Path("runs/bench-posenc"), help="shards, held-out images, run dirs")
    p.add_argument("--out", type=Path, default=Path("runs/bench-posenc/out"), help="results (rows, json, md)")
    p.add_argument("--prepare-only", action="store_true", help="write --data (and the encode job's shards to --work)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--budget-s", type=float, default=0, help="wall-clock budget of the whole run; sizes --steps")
    p.add_argument("--posencs", nargs="+", choices=POSENCS, default=list(POSENCS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="init and data-order seeds")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every run (without --budget-s)")
    p.add_argument("--max-steps", type=int, default=6000, help="cap on the steps --budget-s picks")
    p.add_argument("--evals", type=int, default=4, help="evaluations, evenly spaced; FID at the middle and last")
    p.add_argument("--batch", type=int, default=16, help="global batch size (tiny.yaml: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (tiny.yaml's)")
    p.add_argument("--warmup", type=int, default=-1, help="warmup steps; -1: min(100, steps/10) (tiny.yaml: 100)")
    p.add_argument("--ema", type=float, default=-1, help="EMA decay; -1: min(0.999, 1 - 3/steps) (tiny.yaml: 0.999 "
                   "for 3000 steps; a few hundred steps need a shorter average)")
    p.add_argument("--train-per-class", type=int, default=400, help="training images per class (the shipped 400)")
    p.add_argument("--heldout-per-class", type=int, default=20, help="held-out real images per class")
    p.add_argument("--per-class", type=int, default=8, help="generated images per class for FID")
    p.add_argument("--sampler-steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (tiny.yaml's)")
    p.add_argument("--feature-size", type=int, default=64, help="classifier input size (--prepare-only)")
    p.add_argument("--classifier-steps", type=int, default=300, help="classifier training steps (--prepare-only)")
    p.add_argument("--calibrate-steps", type=int, default=0,
                   help="timed loop steps per run before sizing (budget); 0: 40 on CUDA, 6 on a CPU")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=0, help="runs at a time (0: all on CUDA, 2 on a CPU)")
    p.add_argument("--workers", type=int, default=0, help="render processes (0: the CPU count, at most 16)")
    p.add_argument("--report", action="store_true", help="only print the table from --out")
    p.add_argument("--cost", type=int, metavar="STEPS", default=0,
                   help="only measure seconds per training step per encoding (STEPS round-robin steps)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # "POSENC:SEED": one run, in a subprocess
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.parallel = args.parallel or (len(args.posencs) * len(args.seeds) if args.device == "cuda" else 2)
    args.workers = args.workers or min(16, os.cpu_count() or 1)
    args.calibrate_steps = args.calibrate_steps or (40 if args.device == "cuda" else 6)
    if args.evals < 1 or args.steps < args.evals:
        p.error("--evals must be at least 1 and at most --steps")
    return args


def schedule(steps: int, args) -> dict:
    """Evaluation and FID steps, warmup and EMA of a run of `steps` steps (a multiple of --evals)."""
    every = steps // args.evals
    evals = [every * k for k in range(1, args.evals + 1)]
    return {"steps": steps, "eval_steps": evals, "fid_steps": sorted({evals[(len(evals) - 1) // 2], evals[-1]}),
            "warmup": args.warmup if args.warmup >= 0 else min(100, steps // 10),
            "ema": args.ema if args.ema >= 0 else min(0.999, 1 - 3 / steps)}


# ----------------------------------------------------------------------------- one run (a subprocess)


class Evaluator:
    """Held-out loss and FID of a model, against the same held-out images, timesteps and noise for every run."""

    def __init__(self, args, device: torch.device):
        from drivedit.data.encode_stages import local_codec_source
        from drivedit.eval.classifier import ScenarioClassifier
        from drivedit.models.codec import load_codec, sample_latents

        self.args, self.device = args, device
        meta = material.shard_meta(args.data)
        held = material.load_heldout(args.work)
        self.clf = ScenarioClassifier.load(args.data / "classifier", device=str(device))
        self.real_features = self.clf(held["images"])
        g = torch.Generator().manual_seed(1234)
        c, h, w = meta.latent_shape
        moments = torch.from_numpy(held["moments"].astype(np.float32)).view(-1, 2 * c, h, w)
        self.x0 = sample_latents(moments, meta.scale_factor, g).to(device)  # (N, C, h, w)
        self.y = torch.from_numpy(held["labels"]).long().to(device)
        self.t = torch.randint(0, 1000, (len(self.y),), generator=g).to(device)
        self.noise = torch.randn(self.x0.shape, generator=g).to(device)
        self.num_classes = len(meta.scenarios)
        job = material.encode_job()
        self.codec = load_codec(job.codec.kind, local_codec_source(job.codec.source), meta.scale_factor,
                                job.codec.dtype).to(device)

    @torch.no_grad()
    def heldout_loss(self, model, diffusion) -> dict:
        terms = [diffusion.training_losses(model, self.x0[i:i + 256], self.t[i:i + 256], {"y": self.y[i:i + 256]},
                                           self.noise[i:i + 256]) for i in range(0, len(self.x0), 256)]
        return {k: float(torch.cat([d[k] for d in terms]).mean()) for k in ("loss", "mse")}

    def fid(self, model, betas) -> dict:
        from drivedit.eval.evaluate import distribution_metrics
        from drivedit.generate.grid import latents_to_uint8
        from drivedit.generate.sampler import DiTSampler, SamplerSettings

        a = self.args
        labels = torch.arange(self.num_classes).repeat_interleave(a.per_class)  # (K*n,)
        sampler = DiTSampler(model, betas, self.device, clip_x0=None)  # VAE latents: unclipped
        settings = SamplerSettings(sampler="ddim", steps=a.sampler_steps, guidance=a.guidance)
        images = []
        for i in range(0, len(labels), 512):
            latents = sampler.sample(labels[i:i + 512], list(range(i, min(i + 512, len(labels)))), settings)
            images.append(latents_to_uint8(self.codec.decode(latents)))  # (n, 128, 128, 3)
        images = np.concatenate(images)
        feats, pred = self.clf.embed(images)
        m = distribution_metrics(self.real_features, feats, kid_subset_size=min(1000, len(labels)))
        return {"fid": m["fid"], "kid": m["kid"], "condition_accuracy": float((pred == labels.numpy()).mean())}


def _finetune_job(args, init: str, run_dir: Path, seed: int, sched: dict, log_every: int, checkpoint_every: int):
    from drivedit.config import load_config
    from drivedit.config.finetune import FinetuneJob

    return load_config(FinetuneJob, PRETRAIN / "tiny.yaml", [
        "--model.source", init, "--data.shards", str(args.work / "shards"),
        "--optim.total_steps", str(sched["steps"]), "--optim.global_batch_size", str(args.batch),
        "--optim.lr", str(args.lr), "--optim.warmup_steps", str(sched["warmup"]), "--optim.ema_decay",
        str(sched["ema"]), "--optim.seed", str(seed), "--run.checkpoint_every", str(checkpoint_every),
        "--run.log_every", str(log_every), "--run.name", run_dir.name, "--run.storage_path", str(run_dir.parent),
        "--sampling.every_steps", "0", "--sampling.at_end", "false"])


def _loop(args, job, init: str, run_dir: Path, seed: int, device: torch.device, report):
    from drivedit.train.inprocess import ShardEpochs
    from drivedit.train.loop import Edges, LoopContext, WorkerLoop

    ctx = LoopContext(base_path=init, base_ref=init, run_dir=str(run_dir))
    edges = Edges(0, 1, device, None, ShardEpochs(args.work / "shards", COLUMNS, job.micro_batch_size, seed), report,
                  lambda model, ignore: model)
    return WorkerLoop(job, ctx, edges)


def calibrate(args, init: str, run_dir: Path, seed: int, device: torch.device) -> float:
    """Seconds per optimizer step of the real loop over the second half of --calibrate-steps steps."""
    n = max(4, args.calibrate_steps)
    cal_dir = run_dir.with_name(run_dir.name + "-calibrate")
    job = _finetune_job(args, init, cal_dir, seed, {"steps": n, "warmup": 1, "ema": 0.99}, n // 2, n)
    seen = {}
    _loop(args, job, init, cal_dir, seed, device, lambda m, d, name: seen.update(m)).run()
    return args.batch / seen["images_per_s"]


def wait_for(path: Path, timeout: float) -> dict:
    end = time.time() + timeout
    while not path.exists():
        if time.time() > end:
            raise SystemExit(f"no {path} after {timeout:.0f}s; the driver did not size the run")
        time.sleep(0.1)
    text = path.read_text()
    return json.loads(text) if text else {}


def run_one(args, posenc: str, seed: int) -> None:
    from drivedit.new_model import write_new_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = f"{posenc}-s{seed}"
    run_dir = args.work / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = material.shard_meta(args.data)
    c, h, _ = meta.latent_shape
    init = write_new_model("DiT-T/4", str(run_dir / "init.safetensors"), input_size=h, in_channels=c,
                           num_classes=len(meta.scenarios), posenc=posenc, seed=seed)["path"]
    evaluator = Evaluator(args, device)
    plan_path, cal = args.work / "plan.json", args.work / "calibration"
    if args.budget_s and not plan_path.exists():
        # time the steps while every run of the wave is stepping too: ready, then wait for the driver's go
        (cal / f"{name}.ready").touch()
        wait_for(cal / "go", 600)
        sec = calibrate(args, init, run_dir, seed, device)
        (cal / f"{name}.json").write_text(json.dumps({"s_per_step": sec}))
        print(f"[{name}] calibration: {sec * 1000:.1f} ms per step at batch {args.batch}", flush=True)
    sched = wait_for(plan_path, 600)
    job = _finetune_job(args, init, run_dir, seed, sched, sched["eval_steps"][0], sched["eval_steps"][0])
    t0, eval_s = time.perf_counter(), [0.0]

    def report(metrics: dict, directory, dir_name: str) -> None:
        step = int(metrics["step"])
        if step not in sched["eval_steps"]:
            return
        te = time.perf_counter()
        with loop._bundle_weights() as model:  # the EMA weights, eval mode, swapped back afterwards
            row = {"posenc": posenc, "seed": seed, "step": step, "train_loss": metrics["loss"],
                   **{f"heldout_{k}": v for k, v in evaluator.heldout_loss(
                       model, loop.schedule.diffusion_at(step - 1)).items()}}
            if step in sched["fid_steps"]:
                row.update(evaluator.fid(model, loop.schedule.final_betas()))
        eval_s[0] += time.perf_counter() - te
        row.update(train_s=round(time.perf_counter() - t0 - eval_s[0], 2), eval_s=round(time.perf_counter() - te, 2),
                   images_per_s=round(metrics["images_per_s"], 1))
        with open(args.out / "rows.jsonl", "a") as f:  # one short line per write: appends from runs do not mix
            f.write(json.dumps(row) + "\n")
        print(f"[{name}] " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in row.items() if k not in ("posenc", "seed")), flush=True)

    loop = _loop(args, job, init, run_dir, seed, device, report)
    loop.run()


# ----------------------------------------------------------------------------- the driver


def size_run(args, t_start: float, arms: list[str], procs: dict) -> dict | None:
    """Wait for the first wave's calibrations, then pick the steps that fit what is left of the budget
    (None: the budget ran out before the runs had timed their steps)."""
    cal = args.work / "calibration"
    first = arms[:args.parallel]

    def timed(a):
        return (cal / f"{a}.json").exists()

    def wait(done) -> bool:
        while not all(done(a) or procs[a].poll() is not None for a in first):
            if time.perf_counter() > t_start + args.budget_s - 2:
                return False
            time.sleep(0.2)
        return True

    if not wait(lambda a: (cal / f"{a}.ready").exists()):
        return None
    (cal / "go").touch()  # the wave's runs time their steps together, as they will train
    if not wait(timed):
        return None
    if not any(timed(a) for a in first):
        raise SystemExit(f"every run ended before timing its steps; see {args.work}/logs")
    sec = max(json.loads((cal / f"{a}.json").read_text())["s_per_step"] for a in first if timed(a))
    waves = math.ceil(len(arms) / args.parallel)
    left = args.budget_s - (time.perf_counter() - t_start)
    # evaluation (2 FIDs, held-out losses) and start-up take a share; on a CPU evaluation weighs far more
    train_share = 0.75 if args.device == "cuda" else 0.5
    steps = int(max(0.0, left - 5) * train_share / waves / sec)
    steps = max(args.evals, min(args.max_steps, steps) // args.evals * args.evals)
    print(f"sizing: {sec * 1000:.1f} ms per step (slowest run), {left:.0f}s left, {waves} wave(s) -> "
          f"{steps} steps at batch {args.batch}", flush=True)
    return {**schedule(steps, args), "s_per_step": round(sec, 5), "waves": waves}


def drive(args, argv: list[str]) -> int:
    t_start = T_START
    for d in (args.out, args.work / "logs", args.work / "calibration"):
        d.mkdir(parents=True, exist_ok=True)
    for stale in [args.out / "rows.jsonl", args.work / "plan.json", *(args.work / "calibration").glob("*")]:
        stale.unlink(missing_ok=True)
    command = "python bench/posenc.py " + " ".join(argv)
    info = {"command": command, "device": args.device, "load_avg": os.getloadavg()[0], "batch": args.batch,
            "budget_s": args.budget_s, "posencs": args.posencs, "seeds": args.seeds}
    print(f"material: {args.data} (prepared), {args.work} (shards, held-out)", flush=True)
    info["material"] = material.build_material(args.data, args.work, args.train_per_class, args.heldout_per_class,
                                               args.workers)  # renders in forked processes: before any CUDA here
    info["name"] = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"material ready: {info['material']}", flush=True)
    plan = None if args.budget_s else {**schedule(args.steps // args.evals * args.evals, args), "waves": None}
    if plan:
        (args.work / "plan.json").write_text(json.dumps(plan))
    arms = [f"{pe}:{s}" for s in args.seeds for pe in args.posencs]
    names = {a: a.replace(":", "-s") for a in arms}
    pending, procs, status = list(arms), {}, {}
    deadline = t_start + args.budget_s if args.budget_s else None
    last_write = 0.0
    passthrough = [a for a in argv if a != "--prepare-only"]
    while pending or any(p.poll() is None for p in procs.values()):
        while pending and sum(p.poll() is None for p in procs.values()) < args.parallel:
            a = pending.pop(0)
            log = open(args.work / "logs" / f"{names[a]}.log", "w")
            procs[names[a]] = subprocess.Popen([sys.executable, __file__, *passthrough, "--run", a],
                                               stdout=log, stderr=subprocess.STDOUT)
        if plan is None:
            plan = size_run(args, t_start, [names[a] for a in arms], procs)
            if plan is None:
                print("the budget ran out before the runs had timed their steps (start-up took it all)", flush=True)
                plan = {"steps": 0, "note": "budget spent before training"}
            else:
                (args.work / "plan.json").write_text(json.dumps(plan))
        record_ended(args, procs, status)
        if deadline and time.perf_counter() > deadline - 2:
            for n, p in procs.items():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    status[n] = "stopped at the budget"
            pending.clear()
            break
        if time.perf_counter() - last_write > 10:
            write_results(args, {**info, "plan": plan, "status": status, "wall_s": time.perf_counter() - t_start})
            last_write = time.perf_counter()
        time.sleep(1)
    end = time.perf_counter() + 10  # 10 s in all for the stopped runs to exit, then they are killed
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, end - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
    record_ended(args, procs, status)  # the runs that ended during the loop's last pass
    info.update(plan=plan, status=status, wall_s=round(time.perf_counter() - t_start, 1))
    print(write_results(args, info))
    print(f"all runs ended in {info['wall_s']:.0f}s wall; results in {args.out}", flush=True)
    return 1 if any(s.startswith("failed") for s in status.values()) else 0  # stopped at the budget: expected


def record_ended(args, procs: dict, status: dict) -> None:
    """Status of every run process that has ended and is not yet recorded; a failed run's log tail is printed."""
    for n, p in procs.items():
        if p.poll() is not None and n not in status:
            status[n] = "done" if p.returncode == 0 else f"failed (exit {p.returncode})"
            if p.returncode:
                tail = (args.work / "logs" / f"{n}.log").read_text().splitlines()[-15:]
                print(f"run {n} failed (exit {p.returncode}); last lines of its log:\n  " + "\n  ".join(tail),
                      flush=True)


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    args.data, args.work, args.out = args.data.resolve(), args.work.resolve(), args.out.resolve()
    if args.cost:
        from bench.posenc_report import step_cost

        print(step_cost(args))
        return 0
    if args.run:
        posenc, seed = args.run.split(":")
        run_one(args, posenc, int(seed))
        return 0
    if args.report:
        print(table(args.out))
        return 0
    if args.prepare_only:
        print(json.dumps(material.prepare(args.data, args.work, args.train_per_class, args.feature_size,
                                          args.classifier_steps), indent=1))
        return 0
    if not (args.data / material.MANIFEST).exists():
        raise SystemExit(f"{args.data} is not prepared: run `python bench/posenc.py --prepare-only --data {args.data}`")
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
