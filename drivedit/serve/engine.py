"""The sampling work of one serve replica, free of Ray and HTTP: validated requests in, PNG bytes out.

A batch of requests (whatever `@serve.batch` gathered) is split into groups that share sampler
settings; each group is ONE sampler call over all its images, so concurrent users of the same
settings share the denoising loop. Every image has its own seed (request seed + i) and its own
generator inside the sampler, so what a request gets does not depend on who it was batched with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from drivedit.generate.images import decode_to_uint8, encode_png
from drivedit.generate.sampler import DiTSampler, SamplerSettings
from drivedit.models.codec import sample_clip_range


@dataclass(frozen=True)
class SampleJob:
    """One validated request: a scenario id, one seed per image, and the sampler settings."""

    label: int
    seeds: tuple[int, ...]
    sampler: str
    steps: int
    guidance: float

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def settings_key(self) -> tuple[str, int, float]:
        return (self.sampler, self.steps, self.guidance)


@dataclass
class SampleResult:
    """PNGs of one request, and the size of the sampler call that drew them."""

    pngs: list[bytes]
    seeds: list[int]
    batch_images: int  # images in the sampler call this request was part of
    batch_requests: int  # requests in that call


def count_images(jobs: Sequence[SampleJob]) -> int:
    """The batch size `@serve.batch` bounds: images, not requests (a 4-image request weighs 4)."""
    return sum(j.num_images for j in jobs)


class SampleEngine:
    """DiTSampler + codec decode + PNG encoding for batches of requests.

    `superclass_of` maps scenario ids (N,) to superclass ids (N,) for superclass guidance; None means
    classifier-free guidance against the model's null class.
    """

    def __init__(self, model: torch.nn.Module, codec, *, betas: np.ndarray | None = None, device: str = "cpu",
                 guidance_kind: str = "cfg", guide_channels: int | None = None,
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
        self.sampler = DiTSampler(model, betas=betas, device=self.device, clip_x0=sample_clip_range(getattr(codec, "kind", "")))
        self.codec = codec.to(self.device)
        self.guidance_kind = guidance_kind
        self.guide_channels = guide_channels
        self.superclass_of = superclass_of

    def settings(self, job: SampleJob) -> SamplerSettings:
        return SamplerSettings(sampler=job.sampler, steps=job.steps, guidance=job.guidance,
                               guidance_kind=self.guidance_kind, guide_channels=self.guide_channels)

    def run(self, jobs: Sequence[SampleJob]) -> list[SampleResult]:
        """Answer every job, in order. Jobs with equal settings are drawn in one sampler call."""
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
        labels = torch.tensor([j.label for j in jobs for _ in j.seeds], dtype=torch.long, device=self.device)  # (N,)
        seeds = [s for j in jobs for s in j.seeds]
        uncond = self.superclass_of(labels) if self.guidance_kind == "superclass" else None  # (N,) or None
        latents = self.sampler.sample(labels, seeds, self.settings(jobs[0]), uncond_labels=uncond)  # (N, C, h, w)
        pixels = decode_to_uint8(self.codec, latents)  # (N, H, W, 3) uint8
        return [encode_png(p) for p in pixels]
