"""The per-worker loop without Ray (one worker, the Ray edges replaced by plain callables): a run stopped
at a checkpoint and resumed ends bit-identical to the uninterrupted run, gradient accumulation is
wired, and gap selection publishes its report."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from drivedit.config.base import validate_config
from drivedit.config.finetune import FinetuneJob
from drivedit.data.shards import shard_files
from drivedit.train import state as st
from drivedit.train.loop import Edges, LoopContext, WorkerLoop
from finetune_support import job_dict, write_base_model, write_shards

COLUMNS = ["scenario", "moments", "moments_flip", "object_mask"]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return write_base_model(root / "base.safetensors"), write_shards(root / "shards", rows_per_shard=20, num_shards=1)


class FakeRay:
    """Deterministic epochs of a shard file and a checkpoint store, as Ray Train would provide them."""

    def __init__(self, shards: Path, micro: int, store: Path, columns: list[str] = COLUMNS):
        self.columns = columns
        self.table = pq.read_table(shard_files(str(shards))[0], columns=columns)
        self.micro, self.store, self.reports = micro, store, []

    def epoch_batches(self, epoch: int):
        order = np.random.default_rng(epoch).permutation(self.table.num_rows)
        for i in range(0, len(order) - self.micro + 1, self.micro):
            t = self.table.take(order[i:i + self.micro])
            yield {c: t.column(c).to_numpy() if c == "scenario" else np.stack(t.column(c).to_numpy(
                zero_copy_only=False)) for c in self.columns}

    def report(self, metrics, directory, name):
        self.reports.append((name, dict(metrics)))
        if directory:
            shutil.copytree(directory, self.store / name)

    def edges(self, restored=None) -> Edges:
        return Edges(0, 1, torch.device("cpu"), restored, self.epoch_batches, self.report, lambda m, ignore: m)


def _run(job: FinetuneJob, base: Path, fake: FakeRay, restored=None, tracking: dict | None = None) -> WorkerLoop:
    ctx = LoopContext(base_path=str(base), base_ref=str(base), run_dir=str(fake.store / "run"), tracking=tracking)
    loop = WorkerLoop(job, ctx, fake.edges(restored))
    loop.run()
    return loop


def test_resumed_loop_matches_uninterrupted(material, tmp_path):
    base, shards = material
    raw = job_dict(shards, base, str(tmp_path), "loop", scaling={"num_workers": 1},
                   optim={"total_steps": 8, "global_batch_size": 8, "grad_accum_steps": 2, "lr": 1e-2,
                          "lr_schedule": "cosine", "warmup_steps": 2},
                   method={"name": "driveditfit", "size_aware": True}, run={"checkpoint_every": 3},
                   sampling={"at_end": False})
    job = validate_config(FinetuneJob, raw)
    # 20 rows, micro-batch 4: 5 micro-batches an epoch, so the checkpoint at step 3 falls inside epoch 1
    full = FakeRay(shards, job.micro_batch_size, tmp_path / "full")
    straight = _run(job, base, full)
    assert [name for name, _ in full.reports] == ["step_00000003", "step_00000006", "step_00000008"]
    assert full.reports[-1][1]["step"] == 8

    part = FakeRay(shards, job.micro_batch_size, tmp_path / "part")
    state = st.load_state(full.store / "step_00000003")
    assert state.data == {"epoch": 1, "batches_in_epoch": 1, "samples_seen": 24}
    resumed = _run(job, base, part, restored=state)
    assert [name for name, _ in part.reports] == ["step_00000006", "step_00000008"]
    for name, p in straight.trainable.items():
        assert torch.equal(p, resumed.trainable[name]), name
    assert all(torch.equal(straight.ema.shadow[k], resumed.ema.shadow[k]) for k in straight.ema.shadow)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    # the final checkpoint carries the bundle; its tensors are the EMA
    from drivedit.models.bundle import load_bundle

    bundle = load_bundle(part.store / "step_00000008" / st.BUNDLE_DIR)
    for name in straight.trainable:
        assert torch.equal(bundle.tensors[name], straight.ema.shadow[name])


def _image(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_gap_selection_publishes_its_report(material, tmp_path):
    """... and the sample grids and the gap chart reach MLflow as images at their training steps."""
    from drivedit import tracking

    base, shards = material
    raw = job_dict(shards, base, str(tmp_path), "gap", scaling={"num_workers": 1},
                   optim={"total_steps": 2, "global_batch_size": 4, "warmup_steps": 0}, run={"checkpoint_every": 2},
                   method={"select": "gap", "budget": 0.02, "gap_timesteps": [300], "source_samples": 4,
                           "source_steps": 2}, sampling={"every_steps": 1, "at_end": True, "steps": 2})
    job = validate_config(FinetuneJob, raw)
    fake = FakeRay(shards, job.micro_batch_size, tmp_path / "store")
    run = tracking.start_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "loop", "gap")
    loop = _run(job, base, fake, tracking=run.to_dict())
    gap = loop.result.report["gap"]
    assert loop.result.selected_modules and set(loop.result.selected_modules) < {m["name"] for m in gap["modules"]}
    run_dir = tmp_path / "store" / "run"
    assert (run_dir / "gap" / "gap_report.json").is_file() and (run_dir / "gap" / "gap_report.png").is_file()
    assert (run_dir / "method" / "report.json").is_file()
    assert (run_dir / "samples" / "step_00000002.png").is_file()  # the grid at the end
    meta = st.read_meta(fake.store / "step_00000002")
    assert meta["selected_modules"] == loop.result.selected_modules and meta["final"]

    # MLflow: one grid per step under one key (the UI's step slider), the gap chart at step 0, same pixels
    grids, charts = run.logged_images("samples"), run.logged_images("gap_report")
    assert sorted(grids) == [1, 2] and sorted(charts) == [0]
    got = run.client.download_artifacts(run.run_id, grids[2], str(tmp_path / "dl"))
    assert np.array_equal(_image(got), _image(run_dir / "samples" / "step_00000002.png"))
    assert not np.array_equal(_image(run.client.download_artifacts(run.run_id, grids[1], str(tmp_path / "dl"))),
                              _image(got))  # a step later, other weights: another grid
    chart = run.client.download_artifacts(run.run_id, charts[0], str(tmp_path / "dl"))
    assert np.array_equal(_image(chart), _image(run_dir / "gap" / "gap_report.png"))

def test_layout_branch_trains_and_travels_in_the_bundle(tmp_path, one_thread):
    """driveditfit + a light layout branch, trained by the loop from the shards' layout column: the
    branch's tensors leave zero, the bundle records the branch and rebuilds a model that follows the layout."""
    from drivedit.models.bundle import apply_bundle, load_bundle
    from drivedit.models.checkpoint import load_dit
    from finetune_support import BOX_CATEGORIES

    base = write_base_model(tmp_path / "base.safetensors")
    shards = write_shards(tmp_path / "shards", rows_per_shard=8, num_shards=1, with_layout=True)
    raw = job_dict(shards, base, str(tmp_path), "layout", scaling={"num_workers": 1},
                   optim={"total_steps": 4, "global_batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "ema_decay": 0},
                   method={"name": "driveditfit", "scenario_init": "random"}, run={"checkpoint_every": 4},
                   sampling={"at_end": False}, layout={"kind": "light", "depth": 1, "drop_prob": 0.5})
    job = validate_config(FinetuneJob, raw)
    fake = FakeRay(shards, job.micro_batch_size, tmp_path / "store", COLUMNS + ["layout"])
    loop = _run(job, base, fake)
    counts = loop.result.report["counts"]["groups"]
    assert counts["layout branch"] > 0 and counts["modulators"] > 0
    assert loop.trainable["layout_branch.to_tokens.weight"].abs().sum() > 0  # left its zero init
    bundle = load_bundle(fake.store / "step_00000004" / st.BUNDLE_DIR)
    info = __import__("json").loads((bundle.path / "bundle.json").read_text())
    assert info["layout"] == {"kind": "light", "depth": 1, "box_categories": BOX_CATEGORIES,
                              "segmentation_classes": [], "width": None, "drop_prob": 0.5}
    model = apply_bundle(load_dit(base), bundle)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([500, 900]), torch.tensor([0, 1])
    layout = torch.zeros(2, 2, 16, 16)
    layout[:, 0, 4:8, 4:8] = 1
    with torch.no_grad():
        assert not torch.equal(model(x, t, y, layout=layout), model(x, t, y))
        assert torch.equal(model(x, t, y, layout=layout, layout_keep=torch.tensor([False, False])), model(x, t, y))
