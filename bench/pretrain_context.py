"""Pre-train the tiny DiT on objects in context, inside a wall-clock budget (the device part `scenes`).

The job is configs/pretrain/context.yaml run in-process through `drivedit.train.loop.WorkerLoop` with this
script's own Edges (as bench/posenc.py does): no Ray, no MLflow. A process pool draws in-context object
images (drivedit/data/objects_in_context.py) from the start; the first `--initial-images` are encoded with
builtin:tiny-vae and written as one shard (the job's metadata and semantic-init probe), and every epoch
takes in what the pool has drawn since, so the set grows while the model trains. `optim.total_steps` is
sized to the budget from a measured step time. Baseline: the model it starts from (today's builtin:tiny-dit
with --init builtin:tiny-dit), scored on the same held-out images before training.

Writes into --out, progressively (a killed run keeps every figure it measured):
  result.json   settings, step time, the loss curve, held-out loss and class accuracy per checkpoint
  table.md      the same as a short table, ratios to the baseline
  tiny-dit.pt   the EMA weights in the official DiT format (`drivedit export --official`), latest checkpoint
  tiny-dit.safetensors  the same weights as drivedit's safetensors (what drivedit/assets/ ships)
  samples.jpg   class-conditional DDIM samples, one row per class, decoded by the tiny VAE (at the end)
  loss.png      the training loss curve (at the end)

  python bench/pretrain_context.py --out runs/pretrain-context --budget-s 150            # the device run
  python bench/pretrain_context.py --out runs/pretrain-context-dry --dry-run            # CPU, tiny sizes
"""
from __future__ import annotations

import argparse
from itertools import chain, count
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CONFIG = ROOT / "configs" / "pretrain" / "context.yaml"
SIZE = 128


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the one output folder")
    p.add_argument("--budget-s", type=float, default=150.0, help="wall-clock seconds for everything")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda when visible)")
    p.add_argument("--init", default="builtin:tiny-dit", help="warm start (any DiT-T/4 checkpoint) or 'new'")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.9995, help="EMA decay (lowered for short runs)")
    p.add_argument("--initial-images", type=int, default=2800, help="drawn before training starts")
    p.add_argument("--max-images", type=int, default=42000, help="the pool stops drawing here")
    p.add_argument("--chunk", type=int, default=112, help="images per pool task (a multiple of 14 keeps classes even)")
    p.add_argument("--workers", type=int, default=0, help="drawing processes (0: usable CPUs - 2, at most 14)")
    p.add_argument("--heldout-per-class", type=int, default=8)
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--sampler-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--reserve-s", type=float, default=20.0, help="kept for the held-out scores, grid and export")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--checkpoints", type=int, default=8, help="checkpoints (scored and exported) over the run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 4 with CUDA, else torch's default)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: the same code path in about a minute on CPU")
    args = p.parse_args(argv)
    if args.dry_run:
        for k, v in dict(batch=8, initial_images=112, max_images=336, chunk=28, workers=2, heldout_per_class=1,
                         grid_per_class=2, sampler_steps=4, reserve_s=20.0, max_steps=6).items():
            setattr(args, k, v)
        args.budget_s = min(args.budget_s, 90.0)
    return args


class GrowingLatents:
    """The encoded images, growing as the pool's tasks finish; served as numpy micro-batches in a seeded
    order per epoch (what a Ray Data shard iterator gives a worker)."""

    def __init__(self, codec, micro: int, seed: int):
        self.codec, self.micro, self.seed = codec, micro, seed
        self.cols: dict[str, list[np.ndarray]] = {"scenario": [], "moments": [], "moments_flip": []}
        self.rows = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, 3, H, W) in [-1, 1]
        for key, batch in (("moments", x), ("moments_flip", x.flip(-1))):
            m = torch.cat([self.codec.encode(batch[i:i + 256]) for i in range(0, len(batch), 256)])  # (n, 2C, h, w)
            self.cols[key].append(m.half().cpu().numpy().reshape(len(x), -1))
        self.cols["scenario"].append(labels.astype(np.int16))
        self.rows += len(images)

    def table(self) -> dict[str, np.ndarray]:
        for k, parts in self.cols.items():
            if len(parts) > 1:
                self.cols[k] = [np.concatenate(parts)]
        return {k: v[0] for k, v in self.cols.items()}

    def __call__(self, epoch: int):
        t = self.table()
        hw = t["moments"].shape[1] // 8  # 2C = 8 moment channels
        order = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        zeros = np.zeros((self.micro, hw), np.uint8)
        for i in range(0, len(order) - self.micro + 1, self.micro):
            idx = order[i:i + self.micro]
            yield {"scenario": t["scenario"][idx], "moments": t["moments"][idx],
                   "moments_flip": t["moments_flip"][idx], "object_mask": zeros}


class Drawing:
    """The process pool drawing in-context images, task by task; `harvest` encodes what is ready."""

    def __init__(self, args, num_classes: int):
        from drivedit.data.objects_in_context import render_many

        # the cores this process may use (a container's cpu_count can be the host's), two left for the loop
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        workers = args.workers or max(1, min(cores, 16) - 2)
        items = [(i % num_classes, i // num_classes) for i in range(args.max_images)]  # seeds 0.. per class
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        # first the held-out images (seeds from 10,000; training uses 0..), in context and alone
        held = [(c, 10_000 + 100 * c + i) for c in range(num_classes) for i in range(args.heldout_per_class)]
        self.heldout = {name: [self.pool.apply_async(render_many, (held[i:i + 16], SIZE, name == "context"))
                               for i in range(0, len(held), 16)] for name in ("context", "objects")}
        self.pending = [self.pool.apply_async(render_many, (items[i:i + args.chunk], SIZE))
                        for i in range(0, len(items), args.chunk)]
        self.labels = [np.asarray([c for c, _ in items[i:i + args.chunk]]) for i in range(0, len(items), args.chunk)]
        self.workers, self.seconds_waited = workers, 0.0

    def harvest(self, store: GrowingLatents, at_least: int = 0, at_most: int | None = None) -> int:
        """Encode the finished tasks in order (waiting until `store` holds `at_least` rows), at most `at_most`
        images: where drawing outpaces the codec (a CPU), "every finished task" never runs out and training
        would never start."""
        added = 0
        while self.pending and (self.pending[0].ready() or store.rows < at_least) and \
                (at_most is None or added < at_most):
            t0 = time.perf_counter()
            images = self.pending.pop(0).get()
            self.seconds_waited += time.perf_counter() - t0
            store.add(images, self.labels.pop(0))
            added += len(images)
        return added

    def close(self) -> None:
        self.pool.terminate()


def heldout_set(drawing: Drawing, codec, per_class: int, num_classes: int, device) -> dict:
    """The unseen images the pool drew first, as scaled posterior means, with fixed timesteps and noise."""
    out = {}
    for name, tasks in drawing.heldout.items():
        images = np.concatenate([t.get() for t in tasks])  # (K*n, H, W, 3) uint8
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out[name] = (codec.encode(x).chunk(2, dim=1)[0] * codec.scale_factor).to(device)  # (K*n, 4, 32, 32)
    out["y"] = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(1234)
    out["t"] = torch.randint(0, 1000, (len(out["y"]),), generator=g).to(device)
    out["noise"] = torch.randn(out["context"].shape, generator=g).to(device)
    return out


@torch.no_grad()
def score(model, diffusion, held: dict, num_classes: int) -> dict:
    """Held-out diffusion loss (fixed t and noise) and class accuracy read off the denoising loss (as
    tests/test_tiny_model.py does), on in-context images and on isolated objects."""
    from drivedit.train.semantic_init import denoise_scores

    out = {}
    for name in ("context", "objects"):
        x = held[name]
        loss = diffusion.training_losses(model, x, held["t"], {"y": held["y"]}, held["noise"])["loss"]
        pred = torch.stack([denoise_scores(model, x[i:i + 1].cpu(), num_classes, [100, 300, 500], seed=i).argmin()
                            for i in range(len(x))])  # (n,) on the CPU
        out[f"{name}_loss"] = float(loss.mean())
        out[f"{name}_accuracy"] = float((pred == held["y"].cpu()).float().mean())
    return out


class OutOfTime(Exception):
    """Raised at a checkpoint when the rest of the run would not fit the budget (the machine got busier
    than when the step time was measured): the run ends there, its checkpoint already written."""


def measure_step_seconds(base_path: str, batches, meta, device, steps: int) -> float:
    """Median seconds of one full-model training step through the loop's own data path (shard rows ->
    `training_batch` -> device; bf16 autocast on CUDA), on a copy of the model to train."""
    from drivedit.data.shards import training_batch
    from drivedit.models.checkpoint import load_dit
    from drivedit.models.diffusion import GaussianDiffusion, linear_betas
    from drivedit.train.loop import to_device

    model = load_dit(base_path).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=device.type == "cuda")
    diffusion = GaussianDiffusion(linear_betas())
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        b = training_batch(next(batches), meta, gen)
        x0 = to_device(b["latents"], device)  # (n, C, h, w)
        y = to_device(b["scenario"], device)  # (n,)
        t = to_device(torch.randint(0, 1000, (x0.shape[0],), generator=gen), device)
        noise = to_device(torch.randn(x0.shape, generator=gen), device)
        with cast:
            loss = diffusion.training_losses(model, x0, t, {"y": y}, noise)["loss"]
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[steps // 2:]))


def write_table(out: Path, result: dict) -> None:
    base = result.get("baseline") or {}
    lines = [f"# tiny DiT pre-trained on objects in context ({result['device']})", "",
             f"{result.get('steps_done', 0)} of {result['total_steps']} steps at batch {result['batch']}, "
             f"{result['images_drawn']} images drawn, step {result['step_seconds'] * 1e3:.1f} ms", "",
             "| step | train loss | held-out loss (context) | acc. context | acc. objects |", "|---|---|---|---|---|"]
    for row in [{"step": 0, **base}] + result["checkpoints"]:
        cells = [f"{row[k]:.4f}" if isinstance(row.get(k), float) else "-" for k in
                 ("train_loss", "context_loss", "context_accuracy", "objects_accuracy")]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    if base and result["checkpoints"]:
        last = result["checkpoints"][-1]
        lines += ["", f"held-out loss in context / baseline: {last['context_loss'] / base['context_loss']:.3f}; "
                      f"class accuracy in context {base['context_accuracy']:.2f} -> {last['context_accuracy']:.2f}"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "result.json").write_text(json.dumps(result, indent=1))


def plot_loss(out: Path, curve: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in curve], [r["loss"] for r in curve])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (hybrid)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    from drivedit.config import load_config
    from drivedit.config.finetune import FinetuneJob, SamplingSection
    from drivedit.data.objects import CLASS_NAMES
    from drivedit.data.shards import ShardMetadata, build_shard_table, shard_name, write_shard
    from drivedit.export import export_bundle
    from drivedit.models.checkpoint import load_dit
    from drivedit.models.diffusion import GaussianDiffusion, linear_betas
    from drivedit.models.codec import load_codec
    from drivedit.new_model import write_new_model
    from drivedit.train import state as st
    from drivedit.train.grids import draw_grid
    from drivedit.train.loop import Edges, LoopContext, WorkerLoop

    args = parse_args(argv)
    # a SIGTERM (the device's time limit) unwinds through `finally`: the pool stops, the scratch folder goes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="pretrain-context-"))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads or device.type == "cuda":  # on a GPU machine the drawing processes need the cores
        torch.set_num_threads(args.threads or 4)
    k = len(CLASS_NAMES)
    drawing = Drawing(args, k)  # the pool starts drawing before anything else loads
    print(f"[scenes] {drawing.workers} drawing processes; device {device}", flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "command": "python bench/pretrain_context.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "init": args.init, "batch": args.batch, "lr": args.lr, "ema": args.ema, "budget_s": args.budget_s,
              "checkpoints": [], "curve": [], "images_drawn": 0, "total_steps": 0, "step_seconds": 0.0}
    try:
        codec = load_codec("autoencoder_kl", "builtin:tiny-vae").to(device)
        store = GrowingLatents(codec, args.batch, seed=0)
        held = heldout_set(drawing, codec, args.heldout_per_class, k, device)
        init = write_new_model("DiT-T/4", str(scratch / "init.safetensors"), input_size=32, in_channels=4,
                               num_classes=k, seed=0, init_from=None if args.init == "new" else args.init)
        drawing.harvest(store, at_least=args.initial_images, at_most=args.initial_images)
        t = store.table()
        c, hw = 4, t["moments"].shape[1] // 8
        meta = ShardMetadata(codec_id=codec.id, scale_factor=codec.scale_factor, resolution=SIZE,
                             latent_shape=(c, 32, 32), scenarios=list(CLASS_NAMES), num_rows=store.rows)
        n = store.rows
        rows = {"frame_id": [f"context-{i}" for i in range(n)], "source_uri": ["objects_in_context"] * n,
                "scenario": t["scenario"], "weather": [CLASS_NAMES[s] for s in t["scenario"]],
                "timeofday": ["daytime"] * n, "moments": t["moments"], "moments_flip": t["moments_flip"],
                "object_mask": np.zeros((n, hw), np.uint8), "num_objects": np.zeros(n, np.int16)}
        write_shard(str(scratch / "shards" / shard_name(0)), build_shard_table(rows, meta))
        step_s = measure_step_seconds(init["path"], chain.from_iterable(map(store, count())), meta, device, 30 if device.type == "cuda" else 3)
        # steps that fit: what is left after setup and the final reserve, at the measured step time plus
        # a margin for EMA, the data and the checkpoints' held-out scores
        left = deadline - time.perf_counter() - args.reserve_s
        total = int(max(min(10, args.max_steps), min(args.max_steps, left / (step_s * 1.3))))
        every = max(5, total // args.checkpoints)
        # the EMA's horizon (1 / (1 - decay)) at most a tenth of the run: a short run must not end near its start
        ema = min(args.ema, 1.0 - 10.0 / total)
        result.update(step_seconds=step_s, total_steps=total, parameters=init["parameters"], ema=ema)
        print(f"[scenes] step {step_s * 1e3:.1f} ms at batch {args.batch}: {total} steps in {left:.0f} s; "
              f"{store.rows} images to start", flush=True)
        job = load_config(FinetuneJob, CONFIG, [
            "--model.source", init["path"], "--data.shards", str(scratch / "shards"),
            "--optim.total_steps", str(total), "--optim.global_batch_size", str(args.batch),
            "--optim.lr", str(args.lr), "--optim.ema_decay", str(max(ema, 0.0)),
            "--optim.warmup_steps", str(min(200, total // 10)), "--run.checkpoint_every", str(every),
            "--run.log_every", str(max(1, min(50, total // 20))), "--run.storage_path", str(scratch / "runs")])
        base_model = load_dit(init["path"]).to(device).eval()
        result["baseline"] = score(base_model, GaussianDiffusion(linear_betas()), held, k)
        del base_model
        write_table(out, result)

        def epoch_batches(epoch: int):
            drawing.harvest(store, at_most=max(args.chunk, store.rows // 2))  # the set grows <= 50 % an epoch
            result["images_drawn"] = store.rows
            return store(epoch)

        def report(metrics: dict, directory, name: str) -> None:
            step = int(metrics["step"])
            with loop._bundle_weights() as model:
                row = {"step": step, "train_loss": metrics.get("loss"), "seconds": time.perf_counter() - t_start,
                       "images_drawn": store.rows, **score(model, loop.schedule.diffusion_at(step - 1), held, k)}
            with tempfile.TemporaryDirectory() as d:  # the bundle, then the two shipped formats, as `drivedit export`
                loop._write_bundle(Path(d) / st.BUNDLE_DIR, metrics)
                export_bundle(str(Path(d) / st.BUNDLE_DIR), official=str(scratch / "tiny-dit.pt"),
                              safetensors=str(scratch / "tiny-dit.safetensors"))
            for name in ("tiny-dit.pt", "tiny-dit.safetensors"):  # replaced whole: a kill never leaves half a file
                shutil.copyfile(scratch / name, out / f"{name}.partial")
                os.replace(out / f"{name}.partial", out / name)
            result["checkpoints"].append(row)
            result["steps_done"] = step
            write_table(out, result)
            print("[scenes] " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()), flush=True)
            per_step = (time.perf_counter() - t_train) / step
            if step < total and time.perf_counter() + per_step * min(every, total - step) > deadline - args.reserve_s:
                raise OutOfTime(step)

        ctx = LoopContext(base_path=init["path"], base_ref=init["path"], run_dir=str(scratch / "runs" / "context"))
        loop = WorkerLoop(job, ctx, Edges(0, 1, device, None, epoch_batches, report, lambda model, ignore: model))
        log_line = loop._log_line

        def keep_curve(m: dict) -> None:  # every logged loss goes to the curve as well
            result["curve"].append({"step": loop.step, "loss": m["loss"], "lr": m["lr"], "images_per_s": m["images_per_s"]})
            log_line(m)

        loop._log_line = keep_curve
        t_train = time.perf_counter()
        try:
            loop.run()
        except OutOfTime as stop:
            result["stopped_early_at"] = int(stop.args[0])
            print(f"[scenes] stopped at step {stop.args[0]} of {total}: the next checkpoint would not fit the budget",
                  flush=True)
        result["train_seconds"] = time.perf_counter() - t_start
        plot_loss(out, result["curve"])
        sampling = SamplingSection(num_per_scenario=args.grid_per_class, sampler="ddim", steps=args.sampler_steps,
                                   guidance=args.guidance)
        with loop._bundle_weights() as model:
            png = draw_grid(model, loop.meta, sampling, loop.schedule.final_betas(), device, scratch / "samples.png")
        from PIL import Image

        Image.open(png).convert("RGB").save(out / "samples.jpg", quality=90)  # a fraction of the PNG's size
        result["seconds"] = time.perf_counter() - t_start
        result["pool_wait_seconds"] = drawing.seconds_waited
        write_table(out, result)
        print(f"[scenes] done in {result['seconds']:.0f} s (budget {args.budget_s:.0f} s): {out}", flush=True)
    finally:
        drawing.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
