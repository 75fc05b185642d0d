"""The per-worker fine-tuning loop: plain torch, with `ray.train` only at its edges.

`train_loop_per_worker(config)` is what Ray Train runs on every worker. It touches Ray in four
places only: the worker's rank and device, `get_checkpoint()` (resume), `get_dataset_shard`
(data) and `report()` (checkpoints); everything else is `WorkerLoop`, which knows nothing about
Ray and takes those four things as arguments.

Per worker: validate the config dict; load the base DiT; adapt it (rank 0 runs the method,
including gap measurement and semantic init on a probe of shard rows, and sends the resulting
adapter spec to the other ranks; DDP then copies rank 0's initial trainable values to every
rank); wrap it in DDP with the frozen tensors left out (every rank read them from the same
checkpoint, so DDP neither broadcasts nor tracks them); AdamW over the trainable tensors only;
warmup + constant/cosine lr; gradient accumulation (no all-reduce until the last micro-step) and
clipping; EMA of the trainable tensors; bf16 autocast on GPU; the method's noise schedule
(progressive stages) and small-object loss weights. Seeds: step s of rank r draws its posterior
samples, timesteps, noise and label dropout from seed (seed, r, s), so a resumed run draws what
the uninterrupted run would have.

Data position: a checkpoint records the epoch and the micro-batches consumed in it; a resumed
worker skips that many micro-batches of its shard, so every epoch still passes over the data
once (Ray Data's streaming split assigns rows to workers dynamically, so the skipped rows are the
same number, not necessarily the same rows).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from pydantic import BaseModel

from drivedit.config.base import validate_config
from drivedit.config.finetune import FinetuneJob
from drivedit.logs import setup_logging
from drivedit.train import state as st

TRAIN_DATASET = "train"
DATA_COLUMNS = ["scenario", "moments", "moments_flip", "object_mask"]
# MLflow image keys: the UI shows each key's images with a step slider
SAMPLES_IMAGE_KEY = "samples"
GAP_IMAGE_KEY = "gap_report"
log = logging.getLogger("drivedit.finetune")


class LoopContext(BaseModel):
    """What the driver resolved before the workers started (plain data, validated again here)."""

    base_path: str  # local path of the base checkpoint
    base_ref: str  # what the bundle records as its base (builtin:<name> or an absolute path)
    base_sha256: str | None = None
    tracking: dict | None = None  # TrackedRun.to_dict(), or None when tracking is off
    run_dir: str  # storage_path/name: where drill markers go


@dataclass
class Edges:
    """The Ray side of a worker, as plain callables (tests and benchmarks can supply their own)."""

    rank: int
    world_size: int
    device: torch.device
    restored: st.TrainState | None
    epoch_batches: Callable[[int], Iterable[dict]]  # epoch -> numpy micro-batches of this worker
    report: Callable[[dict, str | None, str], None]  # (metrics, checkpoint dir or None, dir name)
    wrap: Callable[[torch.nn.Module, list[str]], torch.nn.Module]  # (model, names to ignore) -> DDP


def data_columns(job: FinetuneJob) -> list[str]:
    """The shard columns the loop reads: the layout branch's inputs too when there is one."""
    if job.layout.kind == "none":
        return list(DATA_COLUMNS)
    return DATA_COLUMNS + ["layout"] + (["segmentation"] if job.layout.use_segmentation else [])


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry: {"job": FinetuneJob as JSON, "context": LoopContext as JSON}."""
    import ray.train

    from drivedit.train.driver import worker_edges

    rank, world, device, restored, report, wrap = worker_edges(forward_sync_buffers=False,
                                                               gradient_as_bucket_view=True)
    job = validate_config(FinetuneJob, config["job"], "train_loop_config.job")
    shard = ray.train.get_dataset_shard(TRAIN_DATASET)

    def epoch_batches(epoch: int) -> Iterable[dict]:
        return shard.iter_batches(batch_size=job.micro_batch_size, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=job.data.shuffle_buffer_rows or None,
                                  local_shuffle_seed=st.step_seed(job.optim.seed, rank, epoch) % 2**31
                                  if job.data.shuffle_buffer_rows else None)

    edges = Edges(rank, world, device, restored, epoch_batches, report, wrap)
    WorkerLoop(job, LoopContext.model_validate(config["context"]), edges).run()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without the host waiting for the GPU's queued work: a copy from pageable memory
    synchronises the stream (the CPU could not queue the next step meanwhile); one from pinned memory
    with non_blocking does not."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class WorkerLoop:
    """One worker's training, from base model to final bundle. Ray-free."""

    def __init__(self, job: FinetuneJob, ctx: LoopContext, edges: Edges):
        self.job, self.ctx, self.e = job, ctx, edges
        self.is_main = edges.rank == 0
        self.tracked = None
        # metrics of the steps since the last checkpoint, logged to MLflow once that checkpoint is saved: a kill
        # before it makes the resumed run recompute those steps, and they are logged once, with its values
        self.pending_metrics: list[tuple[dict, int]] = []
        setup_logging(edges.rank)  # rank 0 prints progress; the others only warnings
        if self.is_main and ctx.tracking:
            from drivedit.tracking import TrackedRun

            self.tracked = TrackedRun.from_dict(ctx.tracking)
        # steps an earlier attempt already logged: Ray can restart a killed worker from an older checkpoint than
        # the last one it reported (the controller had not registered it yet), and those steps must not be
        # logged a second time
        self.logged_steps: set[int] = set()
        if self.tracked is not None:
            self.logged_steps = {m.step for m in self.tracked.client.get_metric_history(self.tracked.run_id, "loss")}

    # ------------------------------------------------------------------ setup

    def _build(self) -> None:
        from drivedit.data.shards import read_shard_metadata
        from drivedit.models.checkpoint import load_dit
        from drivedit.train.adapt_ranks import adapt_for_training, sync_from_rank0
        from drivedit.train.schedule import build_schedule

        job, e = self.job, self.e
        self.meta = read_shard_metadata(job.data.shards)
        base = load_dit(self.ctx.base_path)
        self.base_config = base.config
        if self.is_main and job.method.name == "driveditfit" and not base.final_layer.linear.weight.any():
            log.warning("the base model's final layer is all zeros (an untrained adaLN-Zero "
                        "DiT?); driveditfit's modulators scale frozen weights, so they cannot change its output "
                        "beyond the output bias: pre-train the base first or use method full")
        torch.manual_seed(job.method.probe_seed)
        comm_device = e.device if e.device.type == "cuda" else None  # NCCL moves objects through the GPU
        from drivedit.train.method_adapters import layout_spec

        self.layout = layout_spec(job.layout, len(base.blocks), list(self.meta.box_categories),
                                  list(self.meta.segmentation_classes))
        self.result = adapt_for_training(base, job, list(self.meta.scenarios), e.rank, e.world_size, e.restored,
                                         comm_device, self.layout)
        self.model = self.result.model.to(e.device).train()
        if e.restored is None:
            sync_from_rank0(self.result, e.world_size)
        self.model.grad_checkpointing = job.model.grad_checkpointing
        self.trainable = self.result.trainable  # name -> Parameter (the same objects, now on device)
        frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in self.model.named_buffers()]
        self.ddp = e.wrap(self.model, frozen)
        self.forward = torch.compile(self.ddp) if job.model.compile else self.ddp
        o = job.optim
        self.optimizer = torch.optim.AdamW(self.result.param_groups(o.lr, o.weight_decay), lr=o.lr,
                                           betas=tuple(o.adam_betas), fused=e.device.type == "cuda")
        self.scheduler = st.build_scheduler(self.optimizer, o.warmup_steps, o.total_steps, o.lr_schedule,
                                            o.min_lr_ratio)
        self.ema = st.EMA(self.trainable, o.ema_decay)
        self.schedule = build_schedule(job.method, o.total_steps)
        self.method = self.result.method  # resolved: lambda_obj, max_obj_weight, schedule filled in
        self.step, self.data = 0, {"epoch": 0, "batches_in_epoch": 0, "samples_seen": 0}
        if e.restored is not None:
            r = e.restored
            self.ema.load_state_dict(r.ema)
            self.optimizer.load_state_dict(r.optimizer)
            self.scheduler.load_state_dict(r.scheduler)
            self.step, self.data = r.step, dict(r.data)
        use_bf16 = job.optim.precision == "bf16" or (job.optim.precision == "auto" and e.device.type == "cuda")
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 and \
            e.device.type == "cuda" else contextlib.nullcontext

    # ------------------------------------------------------------------ data

    def _micro_batches(self) -> Iterator[dict]:
        """Endless micro-batches, epoch after epoch, starting at the restored data position."""
        skip = self.data["batches_in_epoch"]
        while True:
            produced = 0
            for i, batch in enumerate(self.e.epoch_batches(self.data["epoch"])):
                if i < skip:
                    continue
                produced += 1
                self.data["batches_in_epoch"] = i + 1
                yield batch
            if produced == 0 and skip == 0:
                raise RuntimeError(f"rank {self.e.rank} got no batch of {self.job.micro_batch_size} rows from "
                                   f"{self.job.data.shards} in a whole epoch; lower optim.global_batch_size or "
                                   "encode more frames")
            skip = 0
            self.data["epoch"] += 1
            self.data["batches_in_epoch"] = 0

    # ------------------------------------------------------------------ one step

    def _train_step(self, batches: Iterator[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the mean loss and the gradient norm as device tensors (reading
        them would wait for the GPU, so the caller does that only when it logs)."""
        from drivedit.data.shards import training_batch
        from drivedit.train.weighting import object_weight

        job, e, m = self.job, self.e, self.method
        diffusion = self.schedule.diffusion_at(self.step)
        accum = job.optim.grad_accum_steps
        total = torch.zeros((), device=e.device)
        for micro in range(accum):
            seed = st.step_seed(job.optim.seed, e.rank, self.step, micro)
            torch.manual_seed(seed)  # the label dropout inside the embedder draws from the global RNG
            gen = torch.Generator().manual_seed(seed)
            b = training_batch(next(batches), self.meta, gen)
            x0 = to_device(b["latents"], e.device)  # (n, C, h, w)
            y = to_device(b["scenario"], e.device)  # (n,)
            t = to_device(torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=gen), e.device)
            noise = to_device(torch.randn(x0.shape, generator=gen), e.device)  # (n, C, h, w)
            kwargs = {"y": y}
            if self.layout is not None:  # the branch drops layouts itself (drop_prob), from the seeded global RNG
                from drivedit.models.control import layout_input

                kwargs["layout"] = to_device(layout_input(b["layout"], b.get("segmentation"), len(
                    self.layout.segmentation_classes)), e.device)  # (n, K_in, h, w)
            weight = None
            if m.lambda_obj != 1.0 or m.size_aware:
                weight = object_weight(to_device(b["object_mask"], e.device), m.lambda_obj, m.size_aware,
                                       m.max_obj_weight)  # (n, 1, h, w)
            # only the last micro-step all-reduces gradients
            sync = contextlib.nullcontext() if micro == accum - 1 or not hasattr(self.ddp, "no_sync") \
                else self.ddp.no_sync()
            with sync:
                with self.autocast():
                    loss = diffusion.training_losses(self.forward, x0, t, kwargs, noise, weight)["loss"].mean()
                (loss / accum).backward()
            total += loss.detach()
            self.data["samples_seen"] += x0.shape[0]
        params = list(self.trainable.values())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, job.optim.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.trainable)
        self.step += 1
        return total / accum, grad_norm

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        self._build()
        job, e = self.job, self.e
        fresh = e.restored is None
        if self.is_main:
            self._log_start(fresh)
        batches = self._micro_batches()
        loss_sum, n_loss, t_last, images = torch.zeros((), device=e.device), 0, time.perf_counter(), 0
        images_per_step = job.optim.global_batch_size
        first = True
        while self.step < job.optim.total_steps:
            loss, grad_norm = self._train_step(batches)
            loss_sum, n_loss, images = loss_sum + loss, n_loss + 1, images + images_per_step
            if first and e.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(e.device)  # the first step holds compile/alloc spikes
            first = False
            last = self.step == job.optim.total_steps
            if self.step % job.run.log_every == 0 or last:
                elapsed = time.perf_counter() - t_last
                mean = st.mean_over_ranks(float(loss_sum) / n_loss, e.world_size, e.device)
                self.last_metrics = {"loss": mean, "lr": self.scheduler.get_last_lr()[0],
                                     "grad_norm": float(grad_norm),
                                     "images_per_s": images / max(elapsed, 1e-9),
                                     "peak_mem_gib": st.peak_memory_gib(e.device),
                                     "stage": float(self.schedule.stage_at(self.step - 1)),
                                     "epoch": float(self.data["epoch"])}
                if self.is_main:
                    self._log_line(self.last_metrics)
                loss_sum, n_loss, images, t_last = torch.zeros((), device=e.device), 0, 0, time.perf_counter()
            every = job.sampling.every_steps
            if self.is_main and every and self.step % every == 0 and not last:
                self._sample_grid()
            if self.step % job.run.checkpoint_every == 0 or last:
                self._checkpoint(final=last)
            self._drills()

    def _log_line(self, m: dict) -> None:
        mem = "peak mem" if self.e.device.type == "cuda" else "peak RSS"
        log.info(f"step {self.step}/{self.job.optim.total_steps} | loss {m['loss']:.4f} | "
                 f"lr {m['lr']:.2e} | {m['images_per_s']:.1f} img/s | {mem} {m['peak_mem_gib']:.2f} GiB")
        if self.tracked is not None:
            self.pending_metrics.append((dict(m), self.step))

    def _flush_metrics(self) -> None:
        """Log the metrics of the steps a saved checkpoint covers (see `pending_metrics`)."""
        for metrics, step in self.pending_metrics:
            if step not in self.logged_steps:
                self.tracked.log_metrics(metrics, step)
                self.logged_steps.add(step)
        self.pending_metrics.clear()

    def _log_start(self, fresh: bool) -> None:
        counts = self.result.report.get("counts") or {}
        log.info(f"{self.job.method.name}: {counts.get('trainable', 0):,} trainable of "
                 f"{counts.get('total', 0):,} parameters; {self.e.world_size} worker(s) on {self.e.device.type}; "
                 f"{'starting' if fresh else f'resuming at step {self.step}'} to {self.job.optim.total_steps}")
        if not fresh:
            return
        from drivedit.train.gap import write_gap_report

        report = {k: v for k, v in self.result.report.items() if k != "gap"}
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "report.json").write_text(json.dumps(report, indent=1, default=str))
            self._publish(Path(d) / "report.json", "method")
            if "gap" in self.result.report:
                for path in write_gap_report(self.result.report["gap"], Path(d) / "gap"):
                    self._publish(path, "gap")
                    if path.suffix == ".png" and self.tracked is not None:
                        self.tracked.log_image(GAP_IMAGE_KEY, path, step=self.step)

    def _publish(self, path: Path, folder: str) -> None:
        """A report file goes to the run directory and, when tracking, to the MLflow run."""
        from drivedit import storage

        storage.write_bytes_atomic(storage.join(self.ctx.run_dir, folder, path.name), path.read_bytes())
        if self.tracked is not None:
            self.tracked.log_artifact(path, folder)

    # ------------------------------------------------------------------ grids, checkpoints, bundle

    def _bundle_tensors(self) -> dict[str, torch.Tensor]:
        """Trainable values for the bundle (EMA or raw, as configured) plus any saved-but-frozen table."""
        from drivedit.models.adapter_spec import saved_names

        chosen = self.ema.state_dict() if self.job.optim.bundle_weights == "ema" else \
            {k: p.detach().cpu() for k, p in self.trainable.items()}
        params = dict(self.model.named_parameters())
        return {n: chosen[n] if n in chosen else params[n].detach().cpu()
                for n in saved_names(self.model, self.result.spec)}

    @contextlib.contextmanager
    def _bundle_weights(self):
        """The live model temporarily holding the bundle's weights, in eval mode."""
        raw = self.ema.swap_into(self.trainable) if self.job.optim.bundle_weights == "ema" else None
        try:
            yield self.model.eval()
        finally:
            if raw is not None:
                st.EMA.restore(self.trainable, raw)
            self.model.train()

    def _sample_grid(self) -> None:
        from drivedit.train.grids import draw_grid

        with self._bundle_weights() as model, tempfile.TemporaryDirectory() as d:
            path = draw_grid(model, self.meta, self.job.sampling, self.schedule.final_betas(), self.e.device,
                             Path(d) / f"step_{self.step:08d}.png", superclass=self.method.name == "finediffusion")
            self._publish(path, "samples")
            if self.tracked is not None:
                self.tracked.log_image(SAMPLES_IMAGE_KEY, path, step=self.step)

    def _checkpoint(self, final: bool) -> None:
        from drivedit.train.adapt_ranks import adapter_tensors

        name = st.checkpoint_dir_name(self.step)
        metrics = {"step": self.step, **getattr(self, "last_metrics", {})}
        if not self.is_main:
            self.e.report(metrics, None, name)
            return
        d = tempfile.mkdtemp(prefix="drivedit-ckpt-")
        try:
            meta = {"scenarios": list(self.meta.scenarios), "spec": self.result.spec.to_dict(),
                    "selected_modules": list(self.result.selected_modules), "method": self.job.method.model_dump(
                        mode="json"), "model": self.job.model.model_dump(mode="json"),
                    "layout": self.job.layout.model_dump(mode="json"),
                    "base_sha256": self.ctx.base_sha256, "world_size": self.e.world_size,
                    "total_steps": self.job.optim.total_steps, "metrics": metrics, "final": final}
            st.save_state(d, st.TrainState(self.step, {k: p.detach() for k, p in adapter_tensors(self.result).items()},
                                           self.ema.state_dict(), self.optimizer.state_dict(),
                                           self.scheduler.state_dict(), dict(self.data), meta))
            if final:
                self._write_bundle(Path(d) / st.BUNDLE_DIR, metrics)
                if self.job.sampling.at_end:
                    self._sample_grid()
            self.e.report(metrics, d, name)
            if self.tracked is not None:
                self._flush_metrics()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _write_bundle(self, directory: Path, metrics: dict) -> None:
        from drivedit.models.bundle import BundleInfo, save_bundle

        info = BundleInfo(base=self.ctx.base_ref, base_sha256=self.ctx.base_sha256,
                          model_config=self.base_config.to_dict(), spec=self.result.spec,
                          scenarios=list(self.meta.scenarios), betas=[float(b) for b in self.schedule.final_betas()],
                          codec=self.meta.codec_id, method=self.method.model_dump(mode="json"),
                          selected_modules=list(self.result.selected_modules),
                          superclasses=self.result.superclass_names, schedule=self.schedule.describe(),
                          extra={"run": self.job.run.name, "step": self.step, "weights": self.job.optim.bundle_weights,
                                 "metrics": metrics, "image_size": int(self.meta.resolution),
                                 "scale_factor": float(self.meta.scale_factor)})
        save_bundle(directory, self.model, info, tensors=self._bundle_tensors())

    def _drills(self) -> None:
        from drivedit.train.drills import fire_drills

        fire_drills(self.job.drill, self.step, self.e.rank, self.ctx.run_dir, log, "finetune")
