"""The torch device a run asks for."""

from __future__ import annotations

import torch

from fedgen.core.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"train.device={name!r} but no CUDA device is available")
    return device
