"""Find the ops that make the host wait for the device inside a loop, on any machine.

`torch.cuda.set_sync_debug_mode` needs a GPU. This check works on the CPU too: the loop runs on the
`meta` device (tensors with shapes and no data) under a dispatch mode that records every op that, on
a GPU, would block the host: reading a device value on the host (`.item()`, `bool(t)`, `nonzero`,
`masked_select`, ...), a device -> host copy, or a blocking host -> device copy (on CUDA a copy from
pageable memory synchronises the stream). Meta tensors hold no data, so such an op could not even run
there: the recorder names it before it fails. On a real GPU the same recorder runs on the CUDA device
(and the suite also switches on `set_sync_debug_mode` there).

Ops on CPU tensors are host work, not syncs: the DDIM scheduler's tables stay on the CPU on purpose.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops whose result depends on device data the host must read first
READS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
         _aten.is_nonzero.default, _aten.equal.default, _aten._unique2.default, _aten.unique_consecutive.default,
         _aten.unique_dim.default, _aten.repeat_interleave.Tensor, _aten.nonzero_static.default, _aten.item.default}
# copies between devices; under inference_mode `Tensor.to` arrives as aten.to.*, otherwise as aten._to_copy
_COPIES = {_aten._to_copy, _aten.copy_, _aten.to}


def _bind(func, args, kwargs) -> dict:
    """The op's arguments by schema name."""
    names = [a.name for a in func._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


class HostSync(RuntimeError):
    """An op that would make the host wait for the device."""


def _where() -> str:
    """The innermost frames that issued the op: ours and diffusers', not torch's or other libraries'."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if ("site-packages" not in f.filename or "/diffusers/" in f.filename)
              and "host_syncs" not in f.filename and not f.filename.startswith("<")]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                       for f in reversed(frames[-3:])) or "(outside project code)"


class HostSyncRecorder(TorchDispatchMode):
    """Records every op that would block the host on `device` (on meta it stops at a read: no data)."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        self.events: list[str] = []

    def _on_device(self, x) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == self.device.type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        event = None
        if func in READS and any(self._on_device(a) for a in args):
            event = f"{func.name()} reads a device value on the host"
        elif func.overloadpacket in _COPIES:
            named = _bind(func, args, kwargs)
            src = named["src"] if "src" in named else named["self"]
            if func.overloadpacket is _aten.copy_:
                dst = named["self"].device
            elif named.get("device") is not None:
                dst = torch.device(named["device"])
            else:
                dst = named["other"].device if isinstance(named.get("other"), torch.Tensor) else src.device
            if self._on_device(src) and dst.type == "cpu":
                event = f"{func.name()} copies device -> host"
            elif src.device.type == "cpu" and dst.type == self.device.type and not named.get("non_blocking") \
                    and src.dim() > 0:  # 0-dim CPU tensors are passed to kernels as scalars, no copy
                event = f"{func.name()} copies host -> device blocking (pageable memory, non_blocking=False)"
        if event is not None:
            self.events.append(f"{event} at {_where()}")
            if self.device.type == "meta" and "host -> device" not in event:  # meta cannot produce a value
                raise HostSync(self.events[-1])
        return func(*args, **kwargs)


def record(fn, device: torch.device | str) -> list[str]:
    """Run `fn()` and return the host syncs it would cause on `device` (on meta, the first read of a device
    value or device -> host copy stops it: there is no value to go on with)."""
    rec = HostSyncRecorder(device)
    try:
        with rec:
            fn()
    except HostSync:
        pass
    return rec.events


def cuda_sync_warnings(fn) -> list[str]:
    """On CUDA: the warnings `torch.cuda.set_sync_debug_mode("warn")` raises while `fn()` runs."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]


def loop_syncs(run, device: torch.device | str, short: int = 2, long: int = 4) -> dict:
    """Host syncs of `run(n)` (a loop of n steps), told apart by running n = short and n = long: "in_loop"
    lists the ones whose count grows with n (they stall a GPU every step) as "<event> (k per step)",
    "per_call" the set-up ones (once per call: harmless) as "<event> (k per call)"."""
    from collections import Counter

    a, b = Counter(record(lambda: run(short), device)), Counter(record(lambda: run(long), device))
    in_loop, per_call = [], []
    for event in sorted(set(a) | set(b)):
        per_step = (b[event] - a[event]) / (long - short)
        once = a[event] - per_step * short
        if per_step > 0:
            in_loop.append(f"{event} ({per_step:g} per step)")
        if once > 0:
            per_call.append(f"{event} ({once:g} per call)")
    stopped = any("reads a device value" in e or "device -> host" in e for e in a + b)
    return {"per_call": per_call, "in_loop": in_loop, "stopped_at_read": stopped}
