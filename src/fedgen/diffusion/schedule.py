"""Noise schedules with alpha_bar_T ~ 0 for every T (DESIGN section 1.1, the schedule pitfall).

DDPM's linear schedule beta in [1e-4, 0.02] was tuned for T=1000; over the paper's T=300 it leaves
sqrt(alpha_bar_T) ~ 0.22, so x_T is far from N(0, I) and sampling from pure noise is wrong.
fedgen rescales the endpoints by 1000/T (Nichol & Dhariwal's "scaled linear" recipe), or uses the
cosine schedule.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from fedgen.config import DiffusionConfig

MAX_BETA = 0.999


def betas(schedule: str, timesteps: int) -> torch.Tensor:
    """beta_1..beta_T (float64)."""
    if schedule == "linear":
        scale = 1000.0 / timesteps
        b = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        b = 1 - alpha_bar[1:] / alpha_bar[:-1]
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected 'linear' or 'cosine'")
    return b.clamp(max=MAX_BETA)


def alpha_bars(schedule: str, timesteps: int) -> torch.Tensor:
    return torch.cumprod(1 - betas(schedule, timesteps), dim=0)


def ddpm_scheduler(cfg: DiffusionConfig, sigma: str | None = None) -> DDPMScheduler:
    """diffusers DDPM scheduler over our betas: training noise (eq. 1) and the ancestral sampler (eq. 3).

    sigma 'beta' uses sigma_t^2 = beta_t (diffusers 'fixed_large'); 'beta-tilde' uses the posterior
    variance (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t ('fixed_small'). With `cfg.clip_x0` false a step
    is exactly eq. (3); with it true (the default, as in DDPM's reference code) the step goes through the
    predicted x_0 clipped to [-1, 1], which equals eq. (3) whenever that prediction is in range and keeps an
    imperfect model from drifting off the data range in the near-pure-noise steps.
    """
    sigma = sigma or cfg.sigma
    if sigma not in ("beta", "beta-tilde"):
        raise ValueError(f"unknown sigma {sigma!r}; expected 'beta' or 'beta-tilde'")
    return DDPMScheduler(
        num_train_timesteps=cfg.timesteps,
        trained_betas=betas(cfg.schedule, cfg.timesteps).float().numpy(),
        variance_type="fixed_large" if sigma == "beta" else "fixed_small",
        clip_sample=cfg.clip_x0,
        prediction_type="epsilon",
    )
