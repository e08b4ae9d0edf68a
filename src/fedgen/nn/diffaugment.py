"""Differentiable augmentation for GAN discriminators (DiffAugment, Zhao et al. 2020, policy
"translation,cutout"): every image a discriminator sees, real or generated, is shifted by up to 1/8 of its side
and has a square of half its side blanked, so the discriminator cannot memorise its real images and the
generator's gradient still flows through the augmentation (both are index and multiply operations).

Written here rather than taken from a library: the reference code is two functions, and fedgen needs every random
draw to come from a `torch.Generator` it seeds (runs are bit-identical across runtimes and resumes), which the
augmentation libraries' global-RNG sampling does not give.
"""

from __future__ import annotations

import torch
from torch.nn import functional


def diff_augment(x: torch.Tensor, gen: torch.Generator, translation: float = 0.125,
                 cutout: float = 0.5) -> torch.Tensor:
    """`x` (N, C, H, W) translated by up to `translation` of its side (zero padding) and with a square of
    `cutout` of its side set to zero, per image, the offsets drawn from `gen` (a CPU generator)."""
    n, _, h, w = x.shape
    sh, sw = int(h * translation + 0.5), int(w * translation + 0.5)
    shift_h = torch.randint(-sh, sh + 1, (n, 1, 1), generator=gen).to(x.device)
    shift_w = torch.randint(-sw, sw + 1, (n, 1, 1), generator=gen).to(x.device)
    b, i, j = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device),
                             torch.arange(w, device=x.device), indexing="ij")
    padded = functional.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # a zero border that shifted pixels read
    x = padded[b, (i + shift_h + 1).clamp(0, h + 1), (j + shift_w + 1).clamp(0, w + 1)].permute(0, 3, 1, 2)
    ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
    centre_h = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=gen).to(x.device)
    centre_w = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=gen).to(x.device)
    inside = ((i - centre_h + ch // 2) >= 0) & ((i - centre_h + ch // 2) < ch) \
        & ((j - centre_w + cw // 2) >= 0) & ((j - centre_w + cw // 2) < cw)
    return x * (~inside).to(x.dtype).unsqueeze(1)
