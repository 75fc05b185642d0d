"""Which floating-point dtype a compute setting means on a given device: one place for the policy.

Settings (the `dtype` fields of the codec and sampler configs):
- `float32`: float32 everywhere.
- `bfloat16`: bfloat16 on a GPU and on a CPU (oneDNN runs it natively on CPUs with AVX512-BF16 or AMX, and
  emulates it, slowly, elsewhere).
- `float16`: float16 on a GPU; a CPU keeps float32 (CPUs have no fast float16 convolutions or matmuls).
- `auto`: bfloat16 where the device runs it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX),
  float32 elsewhere. On this project's 2-core EPYC VM bfloat16 encodes 3.1x and decodes 3.7x the images/s of
  the float32 NCHW tiny VAE, and samples the tiny DiT 1.4x faster (BENCHMARKS.md "bf16 on the CPU").
"""
from __future__ import annotations

import functools

import torch

DTYPE_SETTINGS = ("float32", "float16", "bfloat16", "auto")  # the configs' DtypeSetting (model code: no pydantic)


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    try:  # oneDNN's own test for AVX512-BF16 / AMX; a private op, so a build without it counts as "no"
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes in bfloat16 in hardware (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False


def compute_dtype(setting: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype `setting` means on `device` (see the module doc)."""
    if isinstance(setting, torch.dtype):
        setting = str(setting).removeprefix("torch.")
    if setting not in DTYPE_SETTINGS:
        raise ValueError(f"dtype {setting!r} is not one of {', '.join(DTYPE_SETTINGS)}")
    device = torch.device(device)
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if setting == "float16" and device.type == "cpu":
        return torch.float32
    return getattr(torch, setting)


def autocast_dtype(setting: str | torch.dtype | None, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of `setting` on `device`; None when it computes in float32 (no autocast)."""
    if setting is None:
        return None
    dtype = compute_dtype(setting, device)
    return None if dtype == torch.float32 else dtype
