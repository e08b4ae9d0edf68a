"""The DDPM training objective: eq. (2), || eps - eps_theta(x_t, t, y) ||^2 with t ~ U{1..T}, and its options.

The prediction target is the scheduler's `prediction_type` (diffusion.prediction): "epsilon" (the paper),
"v_prediction" (v = sqrt(abar) eps - sqrt(1 - abar) x0; Salimans & Ho 2022) or "sample" (x0 itself).
`min_snr_gamma` weights each image's loss by min-SNR-gamma (Hang et al. 2023): min(SNR(t), gamma) / SNR(t) for
epsilon, / (SNR(t) + 1) for v, min(SNR(t), gamma) for x0, which makes all three the same weighting of the x0 error,
capped at SNR gamma; None keeps eq. (2)'s uniform weights. `timestep_sampling` "log-normal" draws t from EDM's
training distribution of noise levels (Karras et al. 2022) instead of uniformly.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn


def snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t), float32 on t's device. (diffusers' `training_utils.compute_snr` is the same
    two lines, but importing that module pulls in its pipelines and FSDP: about 6 s at every silo's start.)"""
    abar = scheduler.alphas_cumprod.to(t.device)[t].float()
    return abar / (1 - abar)


def loss_weights(scheduler: DDPMScheduler, t: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor | None:
    """The per-image weights of min-SNR-gamma for the scheduler's prediction target (None: uniform)."""
    if min_snr_gamma is None:
        return None
    s = snr(scheduler, t)
    capped = s.clamp(max=min_snr_gamma)
    kind = scheduler.config.prediction_type
    return capped / (s + 1) if kind == "v_prediction" else capped if kind == "sample" else capped / s


def noise_levels(scheduler: DDPMScheduler) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1 (increasing in t): x_t / sqrt(abar_t) = x0 + sigma_t eps,
    EDM's variance-exploding view of the same process."""
    abar = scheduler.alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def draw_timesteps(scheduler: DDPMScheduler, n: int, generator: torch.Generator, sampling: str = "uniform",
                   lognormal: tuple[float, float] = (-1.2, 1.2)) -> torch.Tensor:
    """n training timesteps on the generator's device. "uniform": eq. (2)'s t ~ U{0..T-1}. "log-normal": ln sigma ~
    N(mean, sd^2) (EDM's P_mean, P_std), then the t whose sigma_t is nearest in ln sigma; draws beyond the schedule's
    ends go to t = 0 or T - 1."""
    T = scheduler.config.num_train_timesteps
    if sampling == "uniform":
        return torch.randint(0, T, (n,), generator=generator, device=generator.device)
    if sampling != "log-normal":
        raise ValueError(f"unknown timestep sampling {sampling!r}; expected 'uniform' or 'log-normal'")
    mean, sd = lognormal
    log_sigma = mean + sd * torch.randn(n, generator=generator, device=generator.device, dtype=torch.float64)
    levels = noise_levels(scheduler).log().to(log_sigma.device)
    above = torch.searchsorted(levels, log_sigma).clamp(1, T - 1)  # levels[above - 1] < ln sigma <= levels[above]
    nearer_below = (log_sigma - levels[above - 1]) < (levels[above] - log_sigma)
    return torch.where(nearer_below, above - 1, above)


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


def diffusion_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    reduction: str = "mean",
    autocast_bf16: bool = False,
    min_snr_gamma: float | None = None,
    timestep_sampling: str = "uniform",
    lognormal: tuple[float, float] = (-1.2, 1.2),
) -> torch.Tensor:
    """Noise x0 at a drawn t (from `generator`, so it is reproducible; `draw_timesteps`) and score the prediction.

    reduction='none' returns one loss per image.
    """
    n = x0.shape[0]
    gen_device = generator.device
    t = draw_timesteps(scheduler, n, generator, timestep_sampling, lognormal)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
    t, noise = t.to(x0.device), noise.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        pred = model(x_t, t, class_labels=labels).sample
    per_image = ((pred.float() - training_target(scheduler, x0, noise, t)) ** 2).flatten(1).mean(1)
    weights = loss_weights(scheduler, t, min_snr_gamma)
    if weights is not None:
        per_image = per_image * weights
    return per_image if reduction == "none" else per_image.mean()
