"""Class-conditional sampling: the ancestral sampler of eq. (3) driven through a diffusers scheduler."""

from __future__ import annotations

import torch
from torch import nn

from fedgen.config import DiffusionConfig
from fedgen.diffusion.schedule import ddpm_scheduler


@torch.no_grad()
def sample(
    model: nn.Module,
    cfg: DiffusionConfig,
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    *,
    seed: int = 0,
    sigma: str | None = None,
    batch_size: int = 256,
    progress=None,
) -> torch.Tensor:
    """Draw one image per label, in [-1, 1] (clamped at the end only), shape (N, C, H, W).

    Starts from x_T ~ N(0, I) and applies eq. (3) for t = T..1 with sigma_t^2 = beta_t or beta~_t.
    `progress`, if given, is called with the number of network evaluations done after each step.
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for chunk in labels.split(batch_size):
        scheduler = ddpm_scheduler(cfg, sigma)
        scheduler.set_timesteps(cfg.timesteps)
        x = torch.randn((len(chunk), *image_shape), generator=generator).to(device)
        y = chunk.to(device)
        for t in scheduler.timesteps:
            eps = model(x, t.to(device).expand(len(chunk)), class_labels=y).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
            if progress is not None:
                progress(1)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
