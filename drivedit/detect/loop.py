"""The per-worker detector training loop: plain torch, with `ray.train` only at its edges (as
`drivedit.train.loop`).

Per worker: validate the config; build the detector (fresh, from a torchvision weights file, from
a saved detector, or on a DiT); restore the last checkpoint; wrap it in DDP with the frozen tensors
left out; AdamW with warmup + constant/cosine lr and gradient clipping; bf16 autocast on GPU. Data:
every worker reads the label files itself and draws each step's frames from the weighted mix with
seed (seed, rank, step), so a resumed run draws exactly what the uninterrupted one would have, with
no data position to save. Rank 0 scores the validation set (every `eval.every_steps` and at the end),
logs to the job's MLflow run and writes the final detector and its scores into the last checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel

from drivedit.config.base import validate_config
from drivedit.config.detect import DetectJob
from drivedit.logs import setup_logging
from drivedit.train import state as st
from drivedit.train.drills import fire_drills

log = logging.getLogger("drivedit.detect")
DETECTOR_DIR = "detector"
SCORES_DIR = "scores"


class DetectContext(BaseModel):
    """What the driver resolved before the workers started."""

    tracking: dict | None = None  # TrackedRun.to_dict()
    run_dir: str


@dataclass
class Edges:
    """The Ray side of a worker as plain callables (tests can supply their own)."""

    rank: int
    world_size: int
    device: torch.device
    restored: st.TrainState | None
    report: Callable[[dict, str | None, str], None]  # (metrics, checkpoint dir or None, dir name)
    wrap: Callable[[torch.nn.Module, list[str]], torch.nn.Module]  # (model, names to ignore) -> DDP


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry: {"job": DetectJob as JSON, "context": DetectContext as JSON}."""
    from drivedit.train.driver import worker_edges

    rank, world, device, restored, report, wrap = worker_edges()
    job = validate_config(DetectJob, config["job"], "train_loop_config.job")
    edges = Edges(rank, world, device, restored, report, wrap)
    DetectLoop(job, DetectContext.model_validate(config["context"]), edges).run()


def load_sources(job: DetectJob):
    """(training FrameStore, WeightedMix or FixedCountMix, validation FrameStore, frames per training dataset)."""
    from drivedit.detect.dataset import FixedCountMix, FrameStore, WeightedMix, read_frames

    d = job.data
    frames, sizes = [], []
    for src in d.train:
        f, _ = read_frames(src.uri, src.labels_file or d.labels_file, d.categories, d.category_map, d.scenarios)
        for frame in f:
            frame.ignore_under, frame.learn_background = src.ignore_under, src.learn_background
        frames += f
        sizes.append(len(f))
    val, _ = read_frames(d.val, d.labels_file, d.categories, d.category_map, d.scenarios)
    mix = FixedCountMix(sizes, [s.per_step for s in d.train]) if job.fixed_counts else \
        WeightedMix(sizes, [s.weight for s in d.train])
    return FrameStore(frames, d.image_size, d.cache_images), mix, FrameStore(val, d.image_size, d.cache_images), sizes


class DetectLoop:
    """One worker's training, from the built detector to the final checkpoint. Ray-free."""

    def __init__(self, job: DetectJob, ctx: DetectContext, edges: Edges):
        self.job, self.ctx, self.e = job, ctx, edges
        self.is_main = edges.rank == 0
        self.tracked = None
        setup_logging(edges.rank)
        if self.is_main and ctx.tracking:
            from drivedit.tracking import TrackedRun

            self.tracked = TrackedRun.from_dict(ctx.tracking)

    # ------------------------------------------------------------------ setup

    def build(self) -> None:
        from drivedit.detect.detector import build_detector, frozen_names

        job, e = self.job, self.e
        torch.manual_seed(job.optim.seed)  # every rank starts from the same random weights
        self.model, self.spec, self.load_report = build_detector(job)
        self.model.to(e.device).train()
        frozen = frozen_names(self.model)
        self.saved_names = [n for n in self.model.state_dict() if n not in set(frozen)]
        self.ddp = e.wrap(self.model, frozen)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = job.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay)
        self.scheduler = st.build_scheduler(self.optimizer, o.warmup_steps, o.total_steps, o.lr_schedule,
                                            o.min_lr_ratio)
        self.step = 0
        if e.restored is not None:
            r = e.restored
            st.check_same_names("detector", set(self.saved_names), set(r.trainable))
            self.model.load_state_dict(r.trainable, strict=False)
            self.optimizer.load_state_dict(r.optimizer)
            self.scheduler.load_state_dict(r.scheduler)
            self.step = r.step
        use_bf16 = o.precision == "bf16" or (o.precision == "auto" and e.device.type == "cuda")
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 and \
            e.device.type == "cuda" else contextlib.nullcontext
        self.load_data()

    def load_data(self) -> None:
        """The training and validation frames, the mix that draws them, and the count of images drawn."""
        e = self.e
        self.train_store, self.mix, self.val_store, self.source_sizes = load_sources(self.job)
        self.source_offsets = np.cumsum([0, *self.source_sizes])
        # images drawn per training dataset: this rank's since the start (or the restore), plus every rank's
        # before the restore; checkpoints record the sum over ranks, so a run states how often it saw each dataset
        self.drawn_here = np.zeros(len(self.source_sizes), np.int64)
        seen = (e.restored.meta.get("data_seen") if e.restored is not None else None) or []
        self.drawn_before = np.array([s["images"] for s in seen] or [0] * len(self.source_sizes), np.int64)

    # ------------------------------------------------------------------ one step

    def batch(self, step: int) -> tuple[torch.Tensor, list[dict], list[str]]:
        """This rank's frames of `step`, drawn from seed (seed, rank, step) (with `per_step` counts, dataset d's
        from (seed, rank, step, 2 + d) alone); corrupt ones are replaced."""
        from drivedit.detect.dataset import to_batch

        o, n = self.job.optim, self.job.micro_batch_size
        hflip = self.job.data.hflip
        if not self.job.fixed_counts:
            rng = np.random.default_rng(st.step_seed(o.seed, self.e.rank, step))
            items, scenarios = self._fill(n, lambda k: self.mix.draw(k, rng))
            flips = rng.random(n) < 0.5 if hflip else None
        else:
            items, scenarios, flips = [], [], []
            for d, count in enumerate(self.mix.counts):
                rng = np.random.default_rng(st.step_seed(o.seed, self.e.rank, step, 2 + d))
                k = count // self.e.world_size
                got, scen = self._fill(k, lambda m, d=d, rng=rng: self.mix.draw_from(d, m, rng))
                items, scenarios = items + got, scenarios + scen
                flips.append(rng.random(k) < 0.5)
            flips = np.concatenate(flips) if hflip else None
        images, targets = to_batch(items, flips)
        return images, targets, scenarios

    def _fill(self, n: int, draw: Callable[[int], np.ndarray]) -> tuple[list, list[str]]:
        """n decodable frames from `draw(k)` (k indices), drawing again for corrupt ones; counts them per dataset."""
        items, scenarios = [], []
        while len(items) < n:
            for i in draw(n - len(items)):
                item = self.train_store.get(int(i))
                if item is None:
                    self.mix.remove(int(i))
                    log.warning(f"[detect] skipped a corrupt image: {self.train_store.report.corrupt_images[-1]}")
                    continue
                items.append(item)
                scenarios.append(self.train_store.frames[int(i)].scenario)
                self.drawn_here[np.searchsorted(self.source_offsets, int(i), side="right") - 1] += 1
        return items, scenarios

    def data_seen(self) -> list[dict]:
        """Per training dataset over all ranks: its frames, the images drawn from it so far and the epochs
        that makes (images / frames). Every rank must call it."""
        drawn = [self.drawn_before[d] + round(st.mean_over_ranks(float(self.drawn_here[d]), self.e.world_size,
                                                                 self.e.device) * self.e.world_size)
                 for d in range(len(self.source_sizes))]
        return [{"uri": src.uri, "frames": n, "images": int(k), "epochs": float(k / n) if n else 0.0}
                for src, n, k in zip(self.job.data.train, self.source_sizes, drawn)]

    def train_step(self) -> tuple[torch.Tensor, dict[str, float]]:
        from drivedit.detect.detector import run_detector

        e = self.e
        torch.manual_seed(st.step_seed(self.job.optim.seed, e.rank, self.step, 1))  # the DiT backbone's noise
        images, targets, scenarios = self.batch(self.step)
        targets = [{k: v.to(e.device) for k, v in t.items()} for t in targets]
        with self.autocast():
            losses = run_detector(self.ddp, self.spec, images.to(e.device), scenarios, targets)
        loss = sum(losses.values())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.job.optim.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return grad_norm, {k: float(v.detach()) for k, v in losses.items()}

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        self.build()
        job, e = self.job, self.e
        if self.is_main:
            n = sum(p.numel() for p in self.params)
            total = sum(p.numel() for p in self.model.parameters())
            log.info(f"[detect] {job.model.arch} on {job.model.backbone}: {n:,} trainable of {total:,} parameters; "
                     f"{e.world_size} worker(s) on {e.device.type}; "
                     f"{'starting' if e.restored is None else f'resuming at step {self.step}'} to "
                     f"{job.optim.total_steps}" + (f"; weights {self.load_report}" if self.load_report else ""))
        sums: dict[str, float] = {}
        n_steps, t_last = 0, time.perf_counter()
        while self.step < job.optim.total_steps:
            grad_norm, losses = self.train_step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
            last = self.step == job.optim.total_steps
            if self.step % job.run.log_every == 0 or last:
                elapsed = max(time.perf_counter() - t_last, 1e-9)
                loss = st.mean_over_ranks(sum(sums.values()) / n_steps, e.world_size, e.device)
                self.last_metrics = {"loss": loss, **{k: v / n_steps for k, v in sums.items()},
                                     "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                                     "images_per_s": n_steps * job.optim.global_batch_size / elapsed,
                                     "images_per_s_per_worker": n_steps * job.micro_batch_size / elapsed,
                                     "peak_mem_gib": st.peak_memory_gib(e.device)}
                if self.is_main:
                    self.log_line(self.last_metrics)
                sums, n_steps, t_last = {}, 0, time.perf_counter()
            every = job.eval.every_steps
            if self.is_main and every and self.step % every == 0 and not last:
                with tempfile.TemporaryDirectory() as d:
                    self.score(Path(d))
            if self.step % job.run.checkpoint_every == 0 or last:
                self.checkpoint(final=last)
            fire_drills(job.drill, self.step, e.rank, self.ctx.run_dir, log, "detect")

    def log_line(self, m: dict) -> None:
        log.info(f"[detect] step {self.step}/{self.job.optim.total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} "
                 f"| {m['images_per_s']:.1f} img/s ({m['images_per_s_per_worker']:.1f} per worker) | "
                 f"peak {'mem' if self.e.device.type == 'cuda' else 'RSS'} {m['peak_mem_gib']:.2f} GiB")
        if self.tracked is not None:
            self.tracked.log_metrics(m, self.step)

    def score(self, out_dir: Path) -> dict:
        """Score the validation set into out_dir (rank 0); logs the headline numbers."""
        from drivedit.detect.predict import headline, score

        metrics = score(self.model, self.spec, self.val_store, self.job.eval.batch_size, self.e.device,
                        self.job.eval.coco_reference_size, out_dir, self.autocast)
        log.info(f"[detect] step {self.step}: val mAP {metrics['mAP'] or 0:.4f} | AP50 {metrics['AP50'] or 0:.4f} | "
                 f"AP75 {metrics['AP75'] or 0:.4f} on {metrics['num_images']} images, "
                 f"{metrics['num_boxes']['all']} boxes")
        if self.tracked is not None:
            self.tracked.log_metrics(headline(metrics), self.step)
        return metrics

    def checkpoint(self, final: bool) -> None:
        name = st.checkpoint_dir_name(self.step)
        metrics = {"step": self.step, **getattr(self, "last_metrics", {})}
        seen = self.data_seen()
        if not self.is_main:
            self.e.report(metrics, None, name)
            return
        d = tempfile.mkdtemp(prefix="drivedit-detect-ckpt-")
        try:
            state = self.model.state_dict()
            meta = {"total_steps": self.job.optim.total_steps, "world_size": self.e.world_size, "final": final,
                    "model": self.job.model.model_dump(mode="json"), "categories": list(self.job.data.categories),
                    "image_size": self.job.data.image_size, "metrics": metrics,
                    "train_report": self.train_store.report.to_dict(), "data_seen": seen}
            if final:
                from drivedit.detect.models import save_detector

                scores = self.score(Path(d) / SCORES_DIR)
                metrics.update({f"val_{k}": scores[k] for k in ("mAP", "AP50", "AP75") if scores[k] is not None})
                meta["metrics"] = metrics
                save_detector(Path(d) / DETECTOR_DIR, self.model, self.spec)
            st.save_state(d, st.TrainState(self.step, {n: state[n] for n in self.saved_names}, {},
                                           self.optimizer.state_dict(), self.scheduler.state_dict(), {}, meta))
            self.e.report(metrics, d, name)
        finally:
            shutil.rmtree(d, ignore_errors=True)
