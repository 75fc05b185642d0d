"""The sampling work of one serve replica, free of Ray and HTTP: validated requests in, PNG bytes out.

A batch of requests (whatever `@serve.batch` gathered) is answered in one call on the replica's model
thread, its requests grouped by sampler settings. Every image is then drawn on its own: its own seed
(request seed + i), its own generator, and its own model forward of batch shape 1 (2 with guidance) and
decode. The same seed and settings therefore give the same bytes whatever else the batch holds: a
batched matmul's rounding depends on the batch shape (the kernel's blocking), so sharing one sampler
call across requests made an image differ by a level in a pixel from the same request sent alone.
The price is the throughput one batched call would give (most of it on a GPU).

A served image equals the `generate` job's image for the same model, seed and settings only up to that
float rounding (generate draws whole batches in one call): the bytes are not promised to be equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from drivedit.generate.images import decode_to_uint8, encode_png
from drivedit.generate.sampler import DiTSampler, SamplerSettings


@dataclass(frozen=True)
class SampleJob:
    """One validated request: a scenario id, one seed per image, and the sampler settings."""

    label: int
    seeds: tuple[int, ...]
    sampler: str
    steps: int
    guidance: float
    layout: tuple | None = None  # ((category id, x1, y1, x2, y2) in [0, 1], ...) for a model with a layout branch
    layout_guidance: float = 1.0

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def settings_key(self) -> tuple:
        return (self.sampler, self.steps, self.guidance, self.layout is not None, self.layout_guidance)


@dataclass
class SampleResult:
    """PNGs of one request, and the size of the sampler call that drew them."""

    pngs: list[bytes]
    seeds: list[int]
    batch_images: int  # images of the requests answered together with this one (same settings, one replica call)
    batch_requests: int  # those requests


def count_images(jobs: Sequence[SampleJob]) -> int:
    """The batch size `@serve.batch` bounds: images, not requests (a 4-image request weighs 4)."""
    return sum(j.num_images for j in jobs)


class SampleEngine:
    """DiTSampler + codec decode + PNG encoding for batches of requests.

    `superclass_of` maps scenario ids (N,) to superclass ids (N,) for superclass guidance; None means
    classifier-free guidance against the model's null class.
    """

    def __init__(self, model: torch.nn.Module, codec, *, betas: np.ndarray | None = None, device: str = "cpu",
                 dtype: str = "auto", guidance_kind: str = "cfg", guide_channels: int | None = None,
                 guidance_interval: tuple[float, float] | None = None,
                 superclass_of: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if guidance_kind == "superclass" and superclass_of is None:
            raise ValueError("sampler.guidance_kind is 'superclass' but the served model has no superclass mapping "
                             "(only bundles fine-tuned with a tiered scenario embedder have one); use 'cfg'")
        if guidance_kind == "cfg":
            try:
                model.y_embedder.null_label
            except ValueError as e:  # a tiered (FineDiffusion) table has no null row to guide against
                raise ValueError(f"sampler.guidance_kind 'cfg' needs the model's null class: {e}. Set "
                                 f"sampler.guidance_kind: superclass") from None
        latent_channels = model.in_channels
        if guide_channels is not None and guide_channels > latent_channels:
            raise ValueError(f"sampler.guide_channels ({guide_channels}) exceeds the model's {latent_channels} "
                             f"latent channels")
        self.device = torch.device(device)
        # `dtype`: a setting of drivedit.models.precision (auto: bfloat16 where the device has it natively)
        self.sampler = DiTSampler.for_setting(model, betas, self.device, dtype, getattr(codec, "kind", ""))
        self.codec = codec.to(self.device)
        self.guidance_kind = guidance_kind
        self.guide_channels = guide_channels
        self.guidance_interval = guidance_interval  # the server's: every request's guided steps
        self.superclass_of = superclass_of

    def settings(self, job: SampleJob) -> SamplerSettings:
        return SamplerSettings(sampler=job.sampler, steps=job.steps, guidance=job.guidance,
                               guidance_kind=self.guidance_kind, guide_channels=self.guide_channels,
                               layout_guidance=job.layout_guidance, guidance_interval=self.guidance_interval)

    def run(self, jobs: Sequence[SampleJob]) -> list[SampleResult]:
        """Answer every job, in order, grouped by settings; every image is drawn on its own (see the module doc)."""
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.settings_key, []).append(i)
        results: list[SampleResult | None] = [None] * len(jobs)
        for indices in groups.values():
            members = [jobs[i] for i in indices]
            pngs = self._draw(members)
            n_images = count_images(members)
            start = 0
            for i, job in zip(indices, members):
                results[i] = SampleResult(pngs=pngs[start:start + job.num_images], seeds=list(job.seeds),
                                          batch_images=n_images, batch_requests=len(members))
                start += job.num_images
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _draw(self, jobs: Sequence[SampleJob]) -> list[bytes]:
        """PNGs of every image of `jobs` (equal settings), each computed alone (see the module doc)."""
        settings = self.settings(jobs[0])
        pngs = []
        for job in jobs:
            label = torch.tensor([job.label], dtype=torch.long, device=self.device)  # (1,)
            uncond = self.superclass_of(label) if self.guidance_kind == "superclass" else None  # (1,) or None
            extra = {"layout": self._layout_map(job)} if job.layout is not None else {}
            for seed in job.seeds:
                latent = self.sampler.sample(label, [seed], settings, uncond_labels=uncond, **extra)  # (1, C, h, w)
                pixels = decode_to_uint8(self.codec, latent)  # (1, H, W, 3) uint8
                pngs.append(encode_png(pixels[0]))
        return pngs

    def _layout_map(self, job: SampleJob) -> torch.Tensor:
        """The job's boxes on the latent grid: (1, K, h, w); a branch that also reads segmentation gets none
        ("ignore everywhere", as it saw frames without a mask in training): (1, K + S, h, w)."""
        from drivedit.generate.layouts import layout_maps
        from drivedit.models.control import layout_input

        model = self.sampler.model
        spec, grid = model.layout_branch.spec, model.config.input_size
        boxes = layout_maps([{"boxes": job.layout}], len(spec.box_categories), grid)  # (1, K, h, w)
        if not spec.uses_segmentation:
            return boxes
        ignore = torch.full((1, grid, grid), 255, dtype=torch.long)  # (1, h, w) BDD100K's ignore id
        return layout_input(boxes, ignore, len(spec.segmentation_classes))
