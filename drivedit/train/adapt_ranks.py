"""Adapt the base DiT on every Ray Train rank so that all ranks hold the same adapted model
(`adapt_for_training`, around `train/method_adapters.apply_method`).

A fresh run: rank 0 runs the method (gap measurement and semantic init need a probe of shard
rows and some forward passes; doing them once keeps the ranks from disagreeing by a rounding
error) and sends its `AdapterSpec` to the other ranks, which install the same adapters; then
every adapter tensor (trainable or saved, e.g. BitFit's frozen scenario table) is broadcast from
rank 0. A resumed run: the spec and the adapter tensors come from the checkpoint on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from drivedit.config.finetune import FinetuneJob
from drivedit.models.adapter_spec import AdapterSpec, apply_spec, saved_names, trainable_names
from drivedit.models.dit import DiT
from drivedit.train import state as st
from drivedit.train.method_adapters import MethodResult, apply_method, count_groups


def result_from_spec(model: DiT, job: FinetuneJob, spec: AdapterSpec, scenarios: list[str]) -> MethodResult:
    """The MethodResult of installing a known spec (no probe, no semantic init: values come later)."""
    method = job.method.resolve()
    for p in model.parameters():
        p.requires_grad_(False)
    apply_spec(model, spec)
    wanted = set(trainable_names(model, spec))
    trainable = {}
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            trainable[name] = p
    superclass_names = None
    if spec.superclass_of is not None:
        superclass_names = method.superclass_ids(scenarios)[1]
    selected = list(spec.modulated) if spec.method == "driveditfit" else spec.adapted_modules
    result = MethodResult(model=model, method=method, spec=spec, trainable=trainable, selected_modules=selected,
                          scenarios=list(scenarios), superclass_names=superclass_names)
    result.report["counts"] = count_groups(model, trainable)
    return result


def adapter_tensors(result: MethodResult) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the trainable set plus saved-but-frozen ones (the scenario table)."""
    params = dict(result.model.named_parameters())
    return {n: params[n] for n in saved_names(result.model, result.spec)}


@torch.no_grad()
def load_adapter_tensors(result: MethodResult, tensors: dict[str, torch.Tensor]) -> None:
    params = adapter_tensors(result)
    st.check_same_names("checkpoint adapter", set(params), set(tensors))
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensors[name].shape)}, the model "
                             f"{tuple(p.shape)}: the checkpoint belongs to another base model or method")
        p.copy_(tensors[name].to(p.dtype))


def build_probe(job: FinetuneJob):
    """ProbeData from the first `data.probe_rows` shard rows (and source shards when given)."""
    from drivedit.data.shards import load_latents_local
    from drivedit.train.gap import ProbeData

    target = load_latents_local(job.data.shards, limit=job.data.probe_rows)
    src_lat = src_lab = None
    if job.data.source_shards:
        source = load_latents_local(job.data.source_shards, limit=job.data.probe_rows)
        src_lat, src_lab = source["latents"], source["scenario"]
    return ProbeData(latents=target["latents"], scenarios=target["scenario"], source_latents=src_lat,
                     source_labels=src_lab)


def _needs_probe(job: FinetuneJob) -> bool:
    return job.method.scenario_init == "denoise" or job.method.select == "gap"


def adapt_for_training(base: DiT, job: FinetuneJob, scenarios: list[str], rank: int, world_size: int,
                       restored: st.TrainState | None, device: torch.device | None = None,
                       layout=None) -> MethodResult:
    """Adapt `base` in place on this rank (with a layout branch when `layout`, a LayoutSpec, is given).
    Call `sync_from_rank0` once the model is on its device."""
    if restored is not None:
        result = result_from_spec(base, job, AdapterSpec.from_dict(restored.meta["spec"]), scenarios)
        load_adapter_tensors(result, restored.trainable)
        return result
    spec_box: list = [None]
    if rank == 0:
        probe = build_probe(job) if _needs_probe(job) else None
        result = apply_method(base, job.method, scenarios, probe, job.model.class_names, layout)
        spec_box[0] = result.spec.to_dict()
    if world_size > 1:
        dist.broadcast_object_list(spec_box, src=0, device=device)
    if rank != 0:
        result = result_from_spec(base, job, AdapterSpec.from_dict(spec_box[0]), scenarios)
    return result


@torch.no_grad()
def sync_from_rank0(result: MethodResult, world_size: int) -> None:
    """Give every rank rank 0's adapter values (semantic init happened there only)."""
    if world_size == 1 or not dist.is_initialized():
        return
    for _, p in sorted(adapter_tensors(result).items()):
        dist.broadcast(p.data, src=0)
