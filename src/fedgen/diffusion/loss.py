"""The DDPM training objective, eq. (2): || eps - eps_theta(x_t, t, y) ||^2 with t ~ U{1..T}."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn


def diffusion_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    reduction: str = "mean",
    autocast_bf16: bool = False,
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
    per_image = ((pred.float() - noise) ** 2).flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()
