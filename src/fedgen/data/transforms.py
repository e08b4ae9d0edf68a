"""Conversions between stored uint8 images (N, H, W, C) and model tensors (N, C, H, W) in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1], as x / 127.5 - 1 (0 -> -1, 255 -> 1 exactly).

    Only uint8 is accepted: float images (already scaled, or in [0, 1]) would be silently rescaled wrong.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"to_tensor expects a uint8 numpy array, got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4:
        raise ValueError(f"to_tensor expects (N, H, W, C) images, got shape {images.shape}")
    a = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if not a.flags.writeable:  # torch.from_numpy warns on read-only arrays; the float copy is new anyway
        a = a.copy()
    return torch.from_numpy(a).to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C): clamp, then round((x + 1) * 127.5).

    Exact inverse of `to_tensor` on its outputs; values outside [-1, 1] (samples) are clamped.
    """
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects (N, C, H, W), got shape {tuple(x.shape)}")
    y = ((x.detach().to("cpu", torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of an (N, C, H, W) batch left-right with probability 1/2.

    The coin flips come from `generator` (on its own device), so a seeded generator gives the same flips
    on any device. Returns a new tensor; `x` is not modified.
    """
    if x.ndim != 4:
        raise ValueError(f"random_hflip expects (N, C, H, W), got shape {tuple(x.shape)}")
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)
