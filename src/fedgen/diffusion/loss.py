"""The DDPM training objective: eq. (2), || eps - eps_theta(x_t, t, y) ||^2 with t ~ U{1..T}, and its options.

The prediction target is the scheduler's `prediction_type` (diffusion.prediction): "epsilon" (the paper) or
"v_prediction" (v = sqrt(abar) eps - sqrt(1 - abar) x0; Salimans & Ho 2022). `min_snr_gamma` weights each image's
loss by min-SNR-gamma (Hang et al. 2023): min(SNR(t), gamma) / SNR(t) for epsilon, / (SNR(t) + 1) for v, which
makes both the same weighting of the x0 error, capped at SNR gamma; None keeps eq. (2)'s uniform weights.
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
    return capped / (s + 1) if scheduler.config.prediction_type == "v_prediction" else capped / s


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
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
) -> torch.Tensor:
    """Noise x0 at a uniformly drawn t (from `generator`, so it is reproducible) and score the prediction.

    reduction='none' returns one loss per image.
    """
    n = x0.shape[0]
    gen_device = generator.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=gen_device)
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
