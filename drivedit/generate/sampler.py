"""DDPM / DDIM sampling of a DiT with classifier-free or superclass guidance.

Used by the batch `generate` job and by `serve`: plain torch + diffusers schedulers, no Ray, no
MLflow. The schedulers are configured as reference/dit.md §2 verifies against the official
`p_sample` / `ddim_sample`:

- DDPM: learned-range variance on all 2C output channels, `linspace` timestep spacing
  (250 steps give 999, 995, ..., 0 exactly as DiT's respacing).
- DDIM (eta 0): default `leading` spacing, `set_alpha_to_one`, fed the eps channels only.

Every item has its own torch.Generator, seeded with its seed and used for its initial noise and
each of its DDPM noise draws, so an item's image never depends on what else is in its batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("ddim", "ddpm")
GUIDANCE_KINDS = ("cfg", "superclass")
TRANSFER_STARTS = ("noise", "inversion")  # how SDEdit reaches its first timestep
_MAX_SEED = 2**63 - 1


@dataclass
class SamplerSettings:
    """How to sample. `guidance` 1.0 means no guidance (one conditional forward per step).

    guidance_kind "cfg" contrasts each label with the null label; "superclass" (FineDiffusion)
    contrasts it with its superclass, which the caller passes as `uncond_labels`.
    `guide_channels` limits guidance to the first k eps channels (the official sample.py uses 3);
    None guides all latent channels, as diffusers' DiTPipeline.

    `guidance_interval` (sigma_lo, sigma_hi) guides only the steps whose noise level sigma_t =
    sqrt((1 - abar_t) / abar_t) lies in (sigma_lo, sigma_hi]; the others take the plain conditional
    prediction, one forward of the batch instead of two (three with a layout). Kynkaenniemi et al. 2024
    ("Applying guidance in a limited interval") find guidance harmful at high noise and idle at low noise;
    None guides every step, as DiT's sample.py.
    """

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = 50
    guidance: float = 4.0
    guidance_kind: Literal["cfg", "superclass"] = "cfg"
    guide_channels: int | None = None
    layout_guidance: float = 1.0  # with a layout: weight of (layout - no layout) on top of the scenario guidance
    guidance_interval: tuple[float, float] | None = None  # (sigma_lo, sigma_hi]: the noise levels guided

    def guided_steps(self, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> list[bool]:
        """Whether each of `timesteps` (descending) is guided: all of them without an interval."""
        if self.guidance_interval is None:
            return [True] * len(timesteps)
        lo, hi = self.guidance_interval
        abar = alphas_cumprod[timesteps.long()].double()  # (S,)
        sigma = ((1 - abar) / abar).sqrt()  # (S,) the VE noise level of each step
        return [bool(lo < s <= hi) for s in sigma]

    def validate(self, num_train_timesteps: int = 1000) -> None:
        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= num_train_timesteps:
            problems.append(f"steps must be an integer in [1, {num_train_timesteps}], got {self.steps!r}")
        if not np.isfinite(self.guidance) or self.guidance < 0:
            problems.append(f"guidance must be a finite number >= 0 (1 = unguided), got {self.guidance!r}")
        if self.guidance_kind not in GUIDANCE_KINDS:
            problems.append(f"guidance_kind must be one of {', '.join(GUIDANCE_KINDS)}, got {self.guidance_kind!r}")
        if not np.isfinite(self.layout_guidance) or self.layout_guidance < 0:
            problems.append(f"layout_guidance must be a finite number >= 0 (1 = unguided), got {self.layout_guidance!r}")
        if self.guide_channels is not None and (not isinstance(self.guide_channels, int) or self.guide_channels < 1):
            problems.append(f"guide_channels must be a positive integer or None, got {self.guide_channels!r}")
        if self.guidance_interval is not None:
            bounds = tuple(self.guidance_interval)
            if (len(bounds) != 2 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bounds)
                    or not 0 <= bounds[0] < bounds[1]):
                problems.append(f"guidance_interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, "
                                f"got {self.guidance_interval!r}")
        if problems:
            raise ValueError("invalid sampler settings: " + "; ".join(problems))


def build_scheduler(settings: SamplerSettings, betas: np.ndarray | None = None, learn_sigma: bool = True,
                    clip_x0: float | None = None):
    """A fresh diffusers scheduler for `settings` (schedulers hold per-run state: one per call).

    `betas` None means DiT's linear 1e-4..0.02 over 1000 steps; custom betas (a progressive
    schedule's final stage) go in as `trained_betas`. `clip_x0` clips each step's predicted x0 to
    [-clip_x0, clip_x0]: right for pixel-space models (images live in [-1, 1]), wrong for VAE latents,
    which DiT samples unclipped.
    """
    common = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=clip_x0 is not None,
                  clip_sample_range=float(clip_x0 or 1.0), prediction_type="epsilon", num_train_timesteps=1000)
    if betas is not None:
        common.update(num_train_timesteps=len(betas), trained_betas=[float(b) for b in betas])
    if settings.sampler == "ddpm":
        # without a learned variance DiT samples with the "fixed large" variance (beta_t)
        variance = "learned_range" if learn_sigma else "fixed_large"
        return DDPMScheduler(**common, variance_type=variance, timestep_spacing="linspace")
    return DDIMScheduler(**common)  # leading spacing, set_alpha_to_one: DiT's ddim<N>


@contextlib.contextmanager
def cached_weight_casts(model: torch.nn.Module, enabled: bool = True):
    """Let autocast cast each weight once per sampling call instead of once per step.

    Autocast keeps a weight's low-precision copy for its whole region only for a leaf tensor that
    requires grad, outside inference_mode; a frozen model (served, generated from, or a fine-tune's
    frozen base) would be cast again at every step: for DiT-XL/2 about 4 GB of memory traffic per
    forward. Its weights are flagged for the loop (under no_grad nothing is recorded) and restored after.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad] if enabled else []
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class DiTSampler:
    """Sample latents from a DiT. The model is put in eval mode and moved to `device`."""

    def __init__(self, model: torch.nn.Module, betas: np.ndarray | None = None, device: str | torch.device = "cpu",
                 amp_dtype: torch.dtype | None = torch.bfloat16, clip_x0: float | None = None,
                 compile: bool | str = False, cpu_amp: bool = False):
        self.device = torch.device(device)
        self.clip_x0 = clip_x0  # pixel-space models: clip predicted x0 to the image range each step
        # autocast dtype on CUDA (None = float32 throughout); on a CPU too when `cpu_amp`, for callers that
        # resolved their dtype setting for this device (drivedit.models.precision.autocast_dtype)
        self.amp_dtype = amp_dtype
        self.cpu_amp = cpu_amp
        self.model = model.eval().to(self.device)
        self.config = model.config
        # `compile` (True = inductor, or a backend name): torch.compile of the two forwards the loop calls,
        # compiled on first use and once per batch shape; the scheduler step stays eager (a few element-wise
        # ops on CPU-held scalars)
        backend = "inductor" if compile is True else compile
        self._compiled_forward = torch.compile(self.model, backend=backend) if compile else None
        self._compiled_guided = torch.compile(self.model.forward_guided, backend=backend) if compile else None
        if betas is not None:
            betas = np.asarray(betas, dtype=np.float64)
            if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0).all() and (betas < 1).all()):
                raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1)")
        self.betas = betas
        self.num_train_timesteps = 1000 if betas is None else len(betas)

    @classmethod
    def for_setting(cls, model: torch.nn.Module, betas: np.ndarray | None, device: str | torch.device, dtype: str,
                    codec_kind: str, **kwargs) -> "DiTSampler":
        """The sampler a job's config asks for (generate's workers, the serve replica, the fine-tune's grids):
        its dtype setting (drivedit.models.precision; auto = bfloat16 where the device runs it natively) resolved
        for `device`, a CPU included, and the clip range of the model's codec."""
        from drivedit.models.codec import sample_clip_range
        from drivedit.models.precision import autocast_dtype

        device = torch.device(device)
        return cls(model, betas, device, amp_dtype=autocast_dtype(dtype, device), cpu_amp=True,
                   clip_x0=sample_clip_range(codec_kind), **kwargs)

    @property
    def null_label(self) -> int:
        return int(self.model.y_embedder.null_label)

    def _labels(self, labels, name: str, n: int | None = None) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(labels.shape)} {labels.dtype}")
        if n is not None and labels.shape[0] != n:
            raise ValueError(f"{name} has {labels.shape[0]} entries for {n} labels; give one per item")
        rows = self.model.y_embedder.embedding_table.num_embeddings
        if labels.numel() and (labels.min() < 0 or labels.max() >= rows):
            raise ValueError(f"{name} must lie in [0, {rows - 1}] (the model's label table has {rows} rows), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        return labels.to(self.device, torch.long)

    def _uncond(self, labels: torch.Tensor, settings: SamplerSettings, uncond_labels) -> torch.Tensor | None:
        if settings.guidance == 1.0:
            return None
        if uncond_labels is None:
            if settings.guidance_kind == "superclass":
                raise ValueError("superclass guidance needs uncond_labels: each label's superclass id")
            return torch.full_like(labels, self.null_label)
        return self._labels(uncond_labels, "uncond_labels", labels.shape[0])

    def predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, uncond: torch.Tensor | None,
                settings: SamplerSettings, layout: torch.Tensor | None = None) -> torch.Tensor:
        """Model output (N, C_out, h, w) at timesteps t (N,): guided, or plain conditional when uncond is None."""
        if layout is not None:
            return self._predict_with_layout(x, t, labels, uncond, settings, layout)
        if uncond is None:
            return (self._compiled_forward or self.model)(x, t, labels).float()
        guided = self._compiled_guided or self.model.forward_guided
        return guided(x, t, labels, uncond, settings.guidance, settings.guide_channels).float()

    def _predict_with_layout(self, x, t, labels, uncond, settings: SamplerSettings, layout: torch.Tensor):
        """Guidance on the scenario and on the layout, in one batch (InstructPix2Pix's two-condition form):
        eps = e(y, L) + (s_y - 1) (e(y, -) - e(null, -)) + (s_L - 1) (e(y, L) - e(y, -)),
        where "-" is the layout dropped (the branch silent, as in training). Terms whose scale is 1 are skipped.
        The learned-variance channels come from e(y, L)."""
        n = x.shape[0]
        s_y = settings.guidance if uncond is not None else 1.0
        s_l = settings.layout_guidance
        ys, keeps = [labels], [torch.ones(n, dtype=torch.bool, device=x.device)]
        if s_y != 1.0 or s_l != 1.0:  # e(y, -)
            ys.append(labels)
            keeps.append(torch.zeros(n, dtype=torch.bool, device=x.device))
        if s_y != 1.0:  # e(null, -)
            ys.append(uncond)
            keeps.append(torch.zeros(n, dtype=torch.bool, device=x.device))
        m = len(ys)
        out = self.model(x.repeat(m, 1, 1, 1), t.repeat(m), torch.cat(ys), layout=layout.repeat(m, 1, 1, 1),
                         layout_keep=torch.cat(keeps)).float()  # (mN, C_out, h, w)
        parts = out.split(n)
        if m == 1:
            return parts[0]
        k = self.config.in_channels if settings.guide_channels is None else settings.guide_channels
        full, plain = parts[0][:, :k], parts[1][:, :k]
        eps = full + (s_l - 1.0) * (full - plain)  # (N, k, h, w)
        if m == 3:
            eps = eps + (s_y - 1.0) * (plain - parts[2][:, :k])
        return torch.cat([eps, parts[0][:, k:]], dim=1)  # (N, C_out, h, w)

    def _layout(self, layout, n: int) -> torch.Tensor | None:
        if layout is None:
            return None
        branch = getattr(self.model, "layout_branch", None)
        if branch is None:
            raise ValueError("a layout was given but the model has no layout branch; use a bundle fine-tuned with "
                             "layout.kind controlnet or light, or leave the layout out")
        layout = torch.as_tensor(layout, dtype=torch.float32)
        want = (n, branch.spec.in_channels, self.config.input_size, self.config.input_size)
        if tuple(layout.shape) != want:
            raise ValueError(f"layout must have shape {want} (items, layout channels, latent grid), got "
                             f"{tuple(layout.shape)}")
        return layout.to(self.device)

    @torch.no_grad()  # not inference_mode: under it autocast casts every weight again at every step
    def sample(self, labels: torch.Tensor, seeds: Sequence[int], settings: SamplerSettings,
               uncond_labels: torch.Tensor | None = None, layout: torch.Tensor | None = None,
               init_latents: torch.Tensor | None = None, strength: float = 1.0,
               start: Literal["noise", "inversion"] = "noise") -> torch.Tensor:
        """Latents (N, C, h, w) on the sampler's device for labels (N,), one seed per item; `layout`
        (N, K_in, h, w) conditions a model with a layout branch (models/control.layout_input makes it).

        With `init_latents` (N, C, h, w) this is SDEdit: each latent is noised with q_sample to the
        first of the sampler's timesteps below strength * T (its own seed's noise), and only
        the steps from there on are run. Strength 0 returns the latents unchanged; strength 1 starts
        from (almost) pure noise, like plain sampling.

        `start` "inversion" reaches that first timestep by DDIM inversion instead (`invert`): the latent is
        run up the same grid by the model's own deterministic ODE, label-free, so the starting point encodes
        the source's layout rather than a fresh draw, and the denoising under the target follows it (DDIB,
        Su et al. 2023). The seed then plays no part in a DDIM run.
        """
        if start not in TRANSFER_STARTS:
            raise ValueError(f"start must be one of {', '.join(TRANSFER_STARTS)}, got {start!r}")
        settings.validate(self.num_train_timesteps)
        cfg = self.config
        if settings.guide_channels is not None and settings.guide_channels > cfg.in_channels:
            raise ValueError(f"guide_channels {settings.guide_channels} exceeds the model's {cfg.in_channels} "
                             f"latent channels")
        labels = self._labels(labels, "labels")
        n = labels.shape[0]
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} labels; give one seed per item")
        if any(not 0 <= s <= _MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be integers in [0, 2**63 - 1], got {seeds}")
        uncond = self._uncond(labels, settings, uncond_labels)
        layout = self._layout(layout, n)
        if n == 0:
            return torch.empty(0, cfg.in_channels, cfg.input_size, cfg.input_size, device=self.device)

        scheduler = build_scheduler(settings, self.betas, cfg.learn_sigma, self.clip_x0)
        # timesteps stay on the CPU: the scheduler's table lookups then never wait on the GPU;
        # the model gets a device copy made once
        scheduler.set_timesteps(settings.steps)
        # CPU generators: the same seed gives the same noise on every device
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
        x = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)  # (N, C, h, w)
        timesteps = scheduler.timesteps
        if init_latents is not None:
            timesteps = sdedit_timesteps(timesteps, strength, self.num_train_timesteps)
            x0 = self._init_latents(init_latents, shape)
            if len(timesteps) == 0:
                return x0
            if start == "noise":  # q_sample: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at the first step that will run
                x = scheduler.add_noise(x0, x, timesteps[:1].expand(n))
        else:
            x = x * scheduler.init_noise_sigma
        model_timesteps = timesteps.to(self.device)  # (S',)
        # DDPM consumes the learned variance; DDIM (and fixed-variance DDPM) only eps
        keep = 2 * cfg.in_channels if settings.sampler == "ddpm" and cfg.learn_sigma else cfg.in_channels
        # one autocast region for the whole loop so weight casts are cached across steps; a caller's
        # own autocast region (another dtype, or disabled) is left in charge
        amp = ((self.device.type == "cuda" or (self.device.type == "cpu" and self.cpu_amp))
               and self.amp_dtype is not None and not torch.is_autocast_enabled(self.device.type))
        casting = amp or (self.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(self.device.type))
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if amp else contextlib.nullcontext(), \
                cached_weight_casts(self.model, casting):
            if init_latents is not None and start == "inversion":
                x = self.invert(x0, timesteps.flip(0), scheduler.alphas_cumprod, settings, layout)  # (N, C, h, w)
            guided = settings.guided_steps(scheduler.alphas_cumprod, timesteps)
            plain = dataclasses.replace(settings, layout_guidance=1.0)  # the unguided steps: e(y, L) alone
            for i, t in enumerate(timesteps):
                x_in = scheduler.scale_model_input(x, t)
                out = self.predict(x_in, model_timesteps[i].expand(n), labels, uncond if guided[i] else None,
                                   settings if guided[i] else plain, layout)  # (N, C_out, h, w)
                x = scheduler.step(out[:, :keep], t, x, generator=generators).prev_sample  # (N, C, h, w)
        return x

    def invert(self, x0: torch.Tensor, ascending: torch.Tensor, alphas_cumprod: torch.Tensor,
               settings: SamplerSettings, layout: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM inversion: clean latents x0 (N, C, h, w) -> latents at ascending[-1], up the timesteps `ascending`.

        Each step runs DDIM's update backwards, x_next = sqrt(a_next) x0_hat + sqrt(1 - a_next) eps, with eps the
        model's prediction at the current level (the clean start is fed as t = 0). The prediction is label-free
        (the null label, no guidance: the source's scenario is what the transfer replaces) and, with a layout,
        the branch on unguided, so the inverted point holds the source's objects where the layout says.
        """
        n = x0.shape[0]
        plain = SamplerSettings(sampler=settings.sampler, steps=settings.steps, guidance=1.0, layout_guidance=1.0)
        null = torch.full((n,), self.null_label, dtype=torch.long, device=self.device)
        c = self.config.in_channels
        x, a_cur, t_cur = x0, 1.0, 0  # alpha-bar of the clean latent is 1
        for t_next in ascending.tolist():
            a_next = float(alphas_cumprod[int(t_next)])
            t_in = torch.full((n,), t_cur, dtype=torch.long, device=self.device)
            eps = self.predict(x, t_in, null, None, plain, layout)[:, :c]  # (N, C, h, w)
            x0_hat = (x - math.sqrt(1 - a_cur) * eps) / math.sqrt(a_cur)
            x = math.sqrt(a_next) * x0_hat + math.sqrt(1 - a_next) * eps  # (N, C, h, w)
            a_cur, t_cur = a_next, int(t_next)
        return x

    def _init_latents(self, init_latents: torch.Tensor, shape: tuple) -> torch.Tensor:
        init = torch.as_tensor(init_latents).to(self.device, torch.float32)
        if tuple(init.shape) != shape:
            raise ValueError(f"init_latents have shape {tuple(init.shape)}; this model samples {shape}")
        return init


def sdedit_timesteps(timesteps: torch.Tensor, strength: float, num_train_timesteps: int) -> torch.Tensor:
    """The tail of a scheduler's (descending) timesteps that SDEdit at `strength` runs: those below
    strength * T, so the start is t = s * T rounded down to the sampler's grid and strength 0 runs none."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength!r}")
    return timesteps[timesteps < strength * num_train_timesteps]

