"""Training state that outlives a worker: EMA, learning-rate schedule, per-step seeds, checkpoints
(and the two per-rank measurements the log line needs).

Plain torch + safetensors, no Ray: `loop.py` hands these directories to `ray.train.report` and
gets them back from `ray.train.get_checkpoint()`.

A checkpoint directory holds only what cannot be rebuilt from the base model and the config:
  trainable.safetensors  the adapter tensors: the trainable set plus the saved-but-frozen ones (a
                         BitFit scenario table), names as in `model.named_parameters()`
  ema.safetensors        their EMA
  state.pt               optimizer and scheduler state, step, data position (tensors and plain
                         Python only, so it loads with weights_only=True)
  meta.json              step, scenario vocabulary, method and model sections, selected modules,
                         world size: what preflight compares a resumed config against
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import resource

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from drivedit.storage import redact

TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
BUNDLE_DIR = "bundle"
CHECKPOINT_PREFIX = "step_"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def step_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """An independent 63-bit seed per (seed, rank, step, micro-step).

    Seeding every step from its coordinates (rather than carrying one generator along) means a run
    resumed at step s draws exactly the noise, timesteps and posterior samples the uninterrupted run
    would have drawn, with nothing to save.
    """
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def mean_over_ranks(value: float, world_size: int, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks (every rank must call it)."""
    if world_size == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then constant or
    cosine down to `min_ratio`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:  # a function, so LambdaLR's state dict keeps only the step count
        return lr_factor(step, warmup_steps, total_steps, schedule, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of the trainable tensors only, kept in float32.

    decay 0 makes the EMA equal to the raw weights after every update.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        # one fused kernel over all tensors rather than one launch per tensor
        torch._foreach_lerp_([self.shadow[k] for k in params], [p.detach().float() for p in params.values()],
                             1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        check_same_names("EMA", set(self.shadow), set(tensors))
        for k, v in tensors.items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def swap_into(self, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """Copy the EMA into the live parameters; returns the raw values for `restore`."""
        raw = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            p.copy_(self.shadow[k].to(p.dtype))
        return raw

    @staticmethod
    @torch.no_grad()
    def restore(params: dict[str, torch.nn.Parameter], raw: dict[str, torch.Tensor]) -> None:
        for k, p in params.items():
            p.copy_(raw[k])


def check_same_names(what: str, expected: set[str], found: set[str]) -> None:
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ValueError(f"{what} tensors do not match the model's trainable set (the method or base model changed "
                         f"since the checkpoint?): missing {missing[:8]}, unexpected {extra[:8]}")


@dataclass
class TrainState:
    """Everything a checkpoint restores."""

    step: int
    trainable: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    data: dict = field(default_factory=dict)  # epoch, batches_in_epoch, samples_seen
    meta: dict = field(default_factory=dict)


def save_state(directory: str | Path, state: TrainState) -> Path:
    """Write a checkpoint directory (the caller hands it to ray.train.report)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.trainable.items()}, str(d / TRAINABLE_FILE))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.ema.items()}, str(d / EMA_FILE))
    torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "step": state.step,
                "data": state.data}, d / STATE_FILE)
    (d / META_FILE).write_text(redact(json.dumps({**state.meta, "step": state.step, "data": state.data}, indent=1)))
    return d


def load_state(directory: str | Path) -> TrainState:
    d = Path(directory)
    missing = [f for f in (TRAINABLE_FILE, EMA_FILE, STATE_FILE, META_FILE) if not (d / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {d} is incomplete (missing {', '.join(missing)}); delete it to resume from "
                         "the one before")
    blob = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((d / META_FILE).read_text())
    return TrainState(step=int(blob["step"]), trainable=load_file(str(d / TRAINABLE_FILE)),
                      ema=load_file(str(d / EMA_FILE)), optimizer=blob["optimizer"], scheduler=blob["scheduler"],
                      data=dict(blob.get("data", {})), meta=meta)


def read_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / META_FILE).read_text())
