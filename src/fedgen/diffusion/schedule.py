"""Noise schedules with alpha_bar_T ~ 0 for every T (docs/DESIGN.md §1, the schedule pitfall).

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
from fedgen.core.errors import UsageError

MAX_BETA = 0.999
# diffusion.prediction -> diffusers' name
PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


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


def respaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """k = `steps` of the T = `timesteps` training timesteps, "trailing": t_i = round(T (k - i) / k) - 1.

    The first is always T - 1 (pure noise), the last round(T / k) - 1, strictly decreasing for every k in 1..T.
    Integer arithmetic: diffusers' own trailing spacing (a float arange) yields k + 1 timesteps for some k
    (T=200, k=29 gives 30, ending at -1).
    """
    if not 1 <= steps <= timesteps:
        raise UsageError(f"steps must be in [1, T={timesteps}], got {steps}")
    return [(2 * timesteps * (steps - i) + steps) // (2 * steps) - 1 for i in range(steps)]


class AncestralScheduler(DDPMScheduler):
    """diffusers' DDPM scheduler with eq. (3)'s last step noise-free however the timesteps are respaced.

    diffusers adds noise at every step whose timestep is > 0; respaced to k < T steps, the last timestep is
    above 0 and, with sigma^2 = beta, the sample would get noise of variance 1 - alpha_bar_t at the very end.
    DDPM's Algorithm 2 sets z = 0 at the last step: the step that lands on x_0 has no variance.
    """

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        if self.previous_timestep(t) < 0:
            return torch.zeros(())
        return super()._get_variance(t, predicted_variance, variance_type)


def ddpm_scheduler(cfg: DiffusionConfig, sigma: str | None = None) -> DDPMScheduler:
    """diffusers DDPM scheduler over our betas: training noise (eq. 1) and the ancestral sampler (eq. 3).

    sigma 'beta' uses sigma_t^2 = beta_t (diffusers 'fixed_large'); 'beta-tilde' uses the posterior
    variance (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t ('fixed_small'). With `cfg.clip_x0` false a step
    is exactly eq. (3); with it true (the default, as in DDPM's reference code) the step goes through the
    predicted x_0 clipped to [-1, 1], which equals eq. (3) whenever that prediction is in range and keeps an
    imperfect model from drifting off the data range in the near-pure-noise steps.
    Samplers set their timesteps with `respaced_timesteps` (first always T - 1); diffusers' default "leading"
    spacing would start at a lower t whenever k does not divide T.
    """
    sigma = sigma or cfg.sigma
    if sigma not in ("beta", "beta-tilde"):
        raise UsageError(f"unknown sigma {sigma!r}; expected 'beta' or 'beta-tilde'")
    return AncestralScheduler(
        num_train_timesteps=cfg.timesteps,
        trained_betas=betas(cfg.schedule, cfg.timesteps).float().numpy(),
        variance_type="fixed_large" if sigma == "beta" else "fixed_small",
        clip_sample=cfg.clip_x0,
        prediction_type=PREDICTION_TYPES[cfg.prediction],
    )
