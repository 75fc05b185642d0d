"""The DiT training objective: noise schedules, q_sample, and the hybrid loss.

Follows facebookresearch/DiT's `gaussian_diffusion.py` (1000 steps, linear betas in float64,
epsilon prediction, learned-range variance, loss = MSE(eps) + VLB on the variance with eps
detached), with an optional per-element weight map on the MSE term (small-object weighting)
and the cosine^p schedules that DriveDiTFit's progressive ("spoon") scheme mixes in.

Sampling lives in `drivedit.generate.sampler` (diffusers schedulers), not here.
"""
from __future__ import annotations

import math

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------- schedules


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DiT's linear schedule: 1e-4 -> 0.02 scaled to the step count, float64."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_power_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, power: float = 2.0, max_beta: float = 0.999) -> np.ndarray:
    """betas of alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** power (power 2 = improved-DDPM cosine)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** power

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (the t = 0 decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


# ----------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Forward process and training loss for a given beta schedule (float64 tables, gathered per t)."""

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0: clip its log to the t = 1 value, as DiT does
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        key = (name, t.device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        out = self._tables[key][t].float()  # (N,)
        return out.reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            self._gather("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = self._gather("posterior_mean_coef1", t, x_t.ndim) * x_start + self._gather(
            "posterior_mean_coef2", t, x_t.ndim) * x_t
        return mean, self._gather("posterior_variance", t, x_t.ndim), self._gather(
            "posterior_log_variance_clipped", t, x_t.ndim)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return self._gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - self._gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        """Mean and log-variance of p(x_{t-1} | x_t) from a learned-range output (N, 2C, H, W)."""
        C = x_t.shape[1]
        eps, var_values = model_output[:, :C], model_output[:, C:]
        min_log = self._gather("posterior_log_variance_clipped", t, x_t.ndim)
        max_log = torch.log(self._gather("betas", t, x_t.ndim))
        frac = (var_values + 1) / 2  # v in [-1, 1] interpolates between the two log-variances
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """Per-item VLB term in bits per dim: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss per item: mean(weight * (eps - eps_hat)^2) + vb (variance only, eps detached).

        x_start: (N, C, H, W); t: (N,); weight: None or broadcastable to (N, C, H, W), e.g. the
        small-object map (N, 1, H, W). The VLB term is left unweighted, as in DriveDiTFit.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, t, **(model_kwargs or {}))  # (N, 2C or C, H, W)
        C = x_start.shape[1]
        terms: dict[str, torch.Tensor] = {}
        if model_output.shape[1] == 2 * C:
            eps, var_values = model_output[:, :C], model_output[:, C:]
            frozen = torch.cat([eps.detach(), var_values], dim=1).float()
            terms["vb"] = self.vb_terms_bpd(frozen, x_start.float(), x_t.float(), t)
        else:
            eps = model_output
            terms["vb"] = torch.zeros(x_start.shape[0], device=x_start.device)
        sq = (noise.float() - eps.float()) ** 2  # (N, C, H, W)
        terms["mse"] = mean_flat(sq * weight) if weight is not None else mean_flat(sq)
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms
