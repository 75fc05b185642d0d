"""The sampling stage of a generation job: `ShardSampler`, a Ray Data callable class (one per GPU,
or a CPU actor) that loads the model once and turns shard rows into the shards' latents.

A shard is sampled in fixed micro-batches in item order, so a rewritten shard is computed exactly
as the first time. The actor receives the job as `model_dump(mode="json")` and re-validates it:
workers never read driver globals or argv.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from drivedit.config.base import validate_config
from drivedit.config.generate import GenerateJob
from drivedit.generate.model_ref import load_sampling_model
from drivedit.generate.sampler import DiTSampler, SamplerSettings
from drivedit.generate.images import decode_to_uint8
from drivedit.generate.writer import limit_threads


def layout_guidance(job: GenerateJob) -> float | None:
    """The guidance on the layout of a job whose items condition the layout branch (spec.layouts, or a transfer
    with spec.transfer.layout_guidance), or None when the branch stays silent."""
    if job.spec.layouts is not None:
        return job.spec.layouts.layout_guidance
    if job.spec.transfer is not None:
        return job.spec.transfer.layout_guidance
    return None


def sampler_settings(job: GenerateJob) -> SamplerSettings:
    s = job.sampler
    guidance = layout_guidance(job)
    return SamplerSettings(sampler=s.sampler, steps=s.steps, guidance=s.guidance, guidance_kind=s.guidance_kind,
                           guide_channels=s.guide_channels, layout_guidance=1.0 if guidance is None else guidance,
                           guidance_interval=s.guidance_interval)


def _device(job: GenerateJob) -> torch.device:
    if job.scaling.use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class ShardSampler:
    """Samples whole shards. Input rows: {shard, items}; output rows: {shard, items, kind, payload, shape}."""

    def __init__(self, job: dict, model_digest: str, tracking_uri: str | None = None):
        self.job = validate_config(GenerateJob, job, "generate job (sampler actor)")
        self.device = _device(self.job)
        if self.device.type == "cpu":
            limit_threads(self.job.scaling.cpus_per_worker)
        m = self.job.model
        self.sm = load_sampling_model(m.ref, class_names=m.class_names, codec=m.codec, tracking_uri=tracking_uri,
                                      device=self.device)
        if self.sm.digest != model_digest:
            raise RuntimeError(f"the model {m.ref} on this worker (digest {self.sm.digest[:12]}) differs from the one "
                               f"the driver planned with ({model_digest[:12]}); was it overwritten during the job?")
        self.sampler = DiTSampler.for_setting(self.sm.model, self.sm.betas, self.device, self.job.sampler.dtype,
                                              self.sm.codec_kind)
        self.settings = sampler_settings(self.job)
        # a guided transfer feeds the branch each source frame's carried boxes (and mask)
        self.guided_transfer = self.job.spec.transfer is not None and layout_guidance(self.job) is not None
        self.codec = self.sm.load_codec(self.device) if self.job.output.decode_on == "actor" else None
        self.source_codec = None  # loaded on the first transfer item
        self.labels: dict[int, dict] = {}  # transfer items' carried labels, by index, until their shard is sent

    @torch.inference_mode()
    def sample_items(self, items: list[dict]) -> torch.Tensor:
        """Latents (N, C, h, w) of items, drawn `batch_size` at a time in item order."""
        out = []
        bs = self.job.sampler.batch_size
        for start in range(0, len(items), bs):
            chunk = items[start:start + bs]
            labels = torch.tensor([self.sm.label_of(it["scenario"]) for it in chunk], dtype=torch.long,
                                  device=self.device)  # (n,)
            seeds = [int(it["seed"]) for it in chunk]
            uncond = self.sm.superclass_of(labels) if self.settings.guidance_kind == "superclass" else None
            layout, init, strength, start_from = None, None, 1.0, "noise"
            if "source_frame" in chunk[0]:  # spec.layouts: the frame's boxes (and segmentation) on the latent grid
                layout = self.layout_of(chunk)  # (n, K_in, h, w)
            if "source" in chunk[0]:  # condition transfer: SDEdit from the source frames' latents
                init = self.source_latents(chunk)  # (n, C, h, w)
                strength, start_from = float(chunk[0]["strength"]), chunk[0].get("start", "noise")
                if self.guided_transfer:  # the boxes just carried over, as the branch's layout
                    layout = self.transfer_layout(chunk)  # (n, K_in, h, w)
            latents = self.sampler.sample(labels, seeds, self.settings, uncond_labels=uncond, layout=layout,
                                          init_latents=init, strength=strength, start=start_from)  # (n, C, h, w)
            out.append(latents.float())
        return torch.cat(out)

    def layout_of(self, items: list[dict]) -> torch.Tensor:
        """The branch's input (n, K_in, h, w) for layout items; a branch that reads segmentation gets each
        frame's, and the frame's mask is kept for the writer."""
        from drivedit.generate.layouts import branch_input, layout_segmentation

        spec = self.sm.model.layout_branch.spec
        grid = self.sm.model.config.input_size
        cells = None
        if spec.uses_segmentation:
            cells, masks = layout_segmentation(items, self.sm.image_size, grid)  # (n, h, w), [(res, res) | None]
            for it, mask in zip(items, masks):
                self.labels[it["index"]] = {"boxes": None, "mask": mask}
        return branch_input(items, cells, spec, grid)  # (n, K_in, h, w)

    def transfer_layout(self, items: list[dict]) -> torch.Tensor:
        """The branch's input (n, K_in, h, w) for transfer items whose sources `source_latents` has loaded: the
        boxes (and mask) each item carries to its output."""
        from drivedit.generate.transfer import source_layout

        kept = [self.labels[it["index"]] for it in items]
        return source_layout([k["boxes"] for k in kept], [k["mask"] for k in kept], self.sm.model.layout_branch.spec,
                             self.sm.image_size, self.sm.model.config.input_size)

    def source_latents(self, items: list[dict]) -> torch.Tensor:
        """Latents (n, C, h, w) of transfer items' source frames; their labels are kept for the writer."""
        from drivedit.generate.transfer import encode_sources, load_source

        if self.source_codec is None:
            self.source_codec = self.codec or self.sm.load_codec(self.device)
        images = []
        for it in items:
            image, boxes, mask = load_source(it, self.sm.image_size)
            images.append(image)
            self.labels[it["index"]] = {"boxes": boxes, "mask": mask}
        return encode_sources(self.source_codec, np.stack(images), self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[str, list] = {"shard": [], "items": [], "kind": [], "payload": [], "shape": [], "sample_s": [],
                                 "labels": [], "masks": []}
        for shard, items_json in zip(batch["shard"], batch["items"]):
            t0 = time.perf_counter()
            items = json.loads(items_json)
            self.labels.clear()
            latents = self.sample_items(items)  # (N, C, h, w)
            labels, masks = self.carried_labels(items)
            rows["labels"].append(labels)
            rows["masks"].append(masks)
            if self.codec is not None:
                array, kind = decode_to_uint8(self.codec, latents), "images"  # (N, H, W, 3) uint8
            else:
                array, kind = latents.cpu().numpy().astype(np.float32), "latents"
            rows["shard"].append(int(shard))
            rows["items"].append(items_json)
            rows["kind"].append(kind)
            rows["payload"].append(array.tobytes())
            rows["shape"].append(json.dumps(list(array.shape)))
            rows["sample_s"].append(time.perf_counter() - t0)
        return rows

    def carried_labels(self, items: list[dict]) -> tuple[str, bytes]:
        """(JSON list, per item, of {boxes: a transfer's boxes in model-resolution pixels or null, mask: whether it
        has a mask} or null for items with neither; (N, res, res) uint8 masks (ignore where an item has none),
        or b"" when no item has one)."""
        if not self.labels:
            return json.dumps([None] * len(items)), b""
        from drivedit.data.bdd100k import SEGMENTATION_IGNORE

        res = self.sm.image_size
        kept = [self.labels.get(it["index"]) for it in items]
        masks = [k["mask"] if k is not None else None for k in kept]
        carried = [None if k is None else {"boxes": k["boxes"], "mask": k["mask"] is not None} for k in kept]
        if all(m is None for m in masks):
            return json.dumps(carried), b""
        stack = np.stack([m if m is not None else np.full((res, res), SEGMENTATION_IGNORE, np.uint8) for m in masks])
        return json.dumps(carried), stack.tobytes()  # (N, res, res) uint8
