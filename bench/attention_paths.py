"""Which attention kernel every DiT path runs: a profiler trace of one forward per path.

Paths: the official absolute position table, 2-D rotary (`posenc="rope"`), and the model each
fine-tuning method trains (adapters on qkv / proj, DiffFit's gates, FineDiffusion's tiered table).
Each must call `F.scaled_dot_product_attention` once per block and never build softmax(QK^T) by
hand. On CUDA in bf16 the trace names the kernel PyTorch picks (flash, memory-efficient or cuDNN, never
math), and the forward runs again with SDPA limited to flash and memory-efficient (which raises if
neither can serve the shapes).
"""
from __future__ import annotations

import contextlib
import copy
from collections import Counter

import torch

KERNELS = {  # aten op under aten::scaled_dot_product_attention -> kernel
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu-flash",
    "aten::_scaled_dot_product_attention_math": "math",
}
FUSED_CUDA = ("flash", "efficient", "cudnn")
METHODS = ("full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit")


def dit_paths(model_name: str, input_size: int, depth: int | None = None) -> dict[str, torch.nn.Module]:
    """name -> a model: both position encodings and each method's adapted model (random weights). `depth`
    overrides the registry's (the kernel choice depends on head size, tokens and dtype, not depth)."""
    from drivedit.config.method import MethodConfig
    from drivedit.models.dit import build_dit, dit_config
    from drivedit.train.method_adapters import apply_method

    torch.manual_seed(0)
    extra = {"depth": depth} if depth else {}
    base = build_dit(dit_config(model_name, input_size=input_size, num_classes=6, **extra))
    paths = {"posenc abs": base, "posenc rope": build_dit(dit_config(model_name, input_size=input_size,
                                                                     num_classes=6, posenc="rope", **extra))}
    for name in METHODS[1:]:
        model = copy.deepcopy(base)
        kw = {"rank": 4} if name in ("lora", "driveditfit") else {}
        apply_method(model, MethodConfig(name=name, scenario_init="random", **kw), [f"s{i}" for i in range(6)])
        paths[f"method {name}"] = model
    return paths


def trace_forward(model: torch.nn.Module, device: torch.device, bf16: bool, fused_only: bool) -> Counter:
    """Profiler op counts of one training-mode forward (batch 2) on `device`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    model = model.to(device).train()
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    t = torch.tensor([10, 500], device=device)
    y = torch.tensor([1, 2], device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    limit = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]) if fused_only \
        else contextlib.nullcontext()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with amp, limit:
            model(x, t, y)
    return Counter(e.name for e in prof.events())


def check_paths(model_name: str, input_size: int, device: torch.device, depth: int | None = None) -> list[dict]:
    """One row per path: SDPA calls vs blocks, hand-built softmax calls, the kernel, and ok."""
    cuda = device.type == "cuda"
    rows = []
    for name, model in dit_paths(model_name, input_size, depth).items():
        row = {"path": name, "blocks": len(model.blocks)}
        ops = trace_forward(model, device, bf16=cuda, fused_only=False)  # what PyTorch picks by itself
        if cuda:  # and proof that flash or memory-efficient attention takes these shapes in bf16
            try:
                trace_forward(model, device, bf16=True, fused_only=True)
                row["flash_or_efficient_accepts"] = True
            except RuntimeError as e:  # sdpa_kernel found neither for these shapes / dtypes
                row |= {"flash_or_efficient_accepts": False, "error": str(e).splitlines()[0]}
        kernels = {KERNELS[k]: n for k, n in ops.items() if k in KERNELS}
        row |= {"sdpa_calls": ops["aten::scaled_dot_product_attention"], "softmax_calls": ops["aten::softmax"]
                + ops["aten::_softmax"], "kernels": kernels}
        ok = row["sdpa_calls"] == row["blocks"] and row["softmax_calls"] == 0 and "math" not in kernels
        if cuda:  # bf16 on a GPU: every call through a fused kernel, and flash / efficient usable
            ok = ok and sum(kernels.get(k, 0) for k in FUSED_CUDA) == row["blocks"] and \
                row["flash_or_efficient_accepts"]
        rows.append(row | {"ok": ok})
        model.to("cpu")
    return rows
