"""The standard FID Inception network (torch-fidelity's `FeatureExtractorInceptionV3`) from a local file.

torch-fidelity is installed without its torchvision requirement (see `fedgen.evaluation`); the Inception module
needs only torch. The weights are never downloaded: a local file is required and checked by SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from fedgen.core.errors import FedgenError
from fedgen.evaluation import TORCH_FIDELITY_AVAILABLE
from fedgen.evaluation.features import INCEPTION_SHA256, Extractor, check_signed_unit_range


class InceptionWeightsError(FedgenError, ValueError):
    """Missing, unreadable or wrong Inception weights."""


def _inception_class():
    if not TORCH_FIDELITY_AVAILABLE:
        raise InceptionWeightsError(
            "Inception metrics need torch-fidelity: `.venv/bin/pip install --no-deps torch-fidelity` "
            "(scripts/setup.sh does this)"
        )
    # torch-fidelity is optional (installed without its torchvision requirement): only for Inception metrics
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_inception_input(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (N, C, H, W) -> uint8 RGB in [0, 255], what the FID Inception network expects."""
    check_signed_unit_range(x)
    u8 = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


class _InceptionHead(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(to_inception_input(x))
        return features, logits


def check_inception_weights(weights: str | Path) -> tuple[Path, str]:
    """The weights file and its SHA-256, which must be the full digest of the standard FID Inception weights."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(f"Inception weights file {path} not found")
    digest = sha256_of(path)
    if digest != INCEPTION_SHA256:
        raise InceptionWeightsError(
            f"{path}: SHA-256 {digest} does not match the FID Inception weights (expected {INCEPTION_SHA256}); "
            "use torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
        )
    return path, digest


def inception_extractor(weights: str | Path, *, device: torch.device | str = "cpu") -> Extractor:
    """2048-d pool features and unbiased logits of the FID Inception network loaded from `weights`."""
    path, digest = check_inception_weights(weights)
    cls = _inception_class()
    net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
    note = f"Inception features: FID InceptionV3 (torch-fidelity), weights {path.name} sha256 {digest[:12]}"
    return Extractor("inception", _InceptionHead(net).to(device).eval(), note)
