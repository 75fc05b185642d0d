"""The fine-tuning job's loop in this process, one worker, no Ray and no MLflow.

`WorkerLoop` takes Ray's side of a worker as plain callables (`Edges`); this module supplies them from
a local shard folder, so the same loop that `drivedit finetune` runs on Ray Train runs where Ray is
absent (a bare GPU machine) or too slow to start per arm (benchmarks with dozens of short runs).
Everything the loop does is the job's own: method, semantic init, gap selection, schedule, EMA,
object weighting, bf16 autocast on CUDA. What it skips is Ray Train's resume and DDP.

    loop = run_in_process(job, base_path, device, on_report=...)
    with loop._bundle_weights() as model: ...     # the EMA weights, eval mode
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from drivedit.config.finetune import FinetuneJob
from drivedit.train.loop import Edges, LoopContext, WorkerLoop, data_columns


class _RecordingLoop(WorkerLoop):
    """WorkerLoop that keeps the scenario table as the method initialised it (to tell whether it moved)."""

    def _build(self) -> None:
        super()._build()
        self.initial_table = self.model.y_embedder.embedding_table.weight.detach().float().cpu().clone()


class ShardEpochs:
    """A shard folder's rows in memory, served as numpy micro-batches in a seeded order per epoch (what
    Ray Data's shard iterator gives a worker). Columns of fixed-shape arrays are stacked."""

    def __init__(self, shards: str | Path, columns: list[str], micro: int, seed: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from drivedit.data.shards import shard_files

        files = shard_files(str(shards))
        if not files:
            raise FileNotFoundError(f"no latent shards (shard-NNNNN.parquet) at {shards}; run `drivedit encode`")
        self.table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
        self.columns, self.micro, self.seed = columns, micro, seed
        self.rows_read = 0  # rows served so far, over all epochs

    def __call__(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.table.num_rows)
        for i in range(0, len(order) - self.micro + 1, self.micro):
            t = self.table.take(order[i:i + self.micro])
            self.rows_read += self.micro
            yield {c: t.column(c).to_numpy() if c == "scenario" else
                   np.stack(t.column(c).to_numpy(zero_copy_only=False)) for c in self.columns}


def run_in_process(job: FinetuneJob, base_path: str, device: str | torch.device = "cpu",
                   on_report: Callable[[WorkerLoop, dict], None] | None = None,
                   run_dir: str | Path | None = None) -> WorkerLoop:
    """Train `job` from the base checkpoint at `base_path` in this process; returns the finished loop
    (`loop.initial_table`: the scenario table as initialised; `loop.rows_read`: training rows served).

    `on_report(loop, metrics)` is called at every checkpoint step (the metrics Ray Train would get:
    step, loss, images_per_s, peak_mem_gib, ...); checkpoints themselves are dropped (no resume here).
    Reports and grids go under `run_dir` (a temporary folder when None)."""
    device = torch.device(device)
    loop_box: list[WorkerLoop] = []

    def report(metrics: dict, directory: str | None, name: str) -> None:
        if on_report is not None:
            on_report(loop_box[0], metrics)

    # one worker: its micro-batch is the global batch over the accumulation steps
    job = job.model_copy(update={"scaling": job.scaling.model_copy(update={"num_workers": 1})})
    epochs = ShardEpochs(job.data.shards, data_columns(job), job.micro_batch_size, job.optim.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LoopContext(base_path=base_path, base_ref=base_path, run_dir=str(run_dir or tmp))
        edges = Edges(0, 1, device, None, epochs, report, lambda model, ignore: model)
        loop = _RecordingLoop(job, ctx, edges)
        loop_box.append(loop)
        loop.run()
    loop.rows_read = epochs.rows_read
    return loop
