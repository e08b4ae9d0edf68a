"""FID, KID, IS (torchmetrics) and precision/recall (Kynkaenniemi et al., 2019) on extracted features.

Features are extracted once per image set by a named extractor (evaluation/features.py) and handed to torchmetrics
through an identity feature module, so real-set features can be cached and reused against many generated sets.
torchmetrics has no image precision/recall; the k-NN version is a few lines and is written here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance


class _Precomputed(nn.Module):
    """An identity 'feature extractor' of known width: torchmetrics then works on features we computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 1000) -> tuple[float, float]:
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random subsets: same inputs, same number
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.float())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random splits
        mean, std = metric.compute()
    return float(mean), float(std)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    inside = [(torch.cdist(p, centres) <= radii[None]).any(1) for p in points.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: share of generated samples inside the real manifold (union of k-NN balls around real
    features); recall: share of real samples inside the generated manifold."""
    real, fake = real.double(), fake.double()
    return (_coverage(fake, real, _knn_radii(real, k)), _coverage(real, fake, _knn_radii(fake, k)))


def generative_metrics(extractor: str, real: dict[str, torch.Tensor], fake_features: torch.Tensor,
                       fake_logits: torch.Tensor, *, pr_samples: int = 5000) -> dict[str, float]:
    """Every metric, keyed by what it is: `fid_<extractor>_<split>` etc. `real` maps split name -> features."""
    out: dict[str, float] = {}
    for split, feats in real.items():
        out[f"fid_{extractor}_{split}"] = fid(feats, fake_features)
        out[f"kid_{extractor}_{split}"], out[f"kid_{extractor}_{split}_std"] = kid(feats, fake_features)
    split = "test" if "test" in real else next(iter(real))
    gen = torch.Generator().manual_seed(0)
    r = real[split][torch.randperm(len(real[split]), generator=gen)[:pr_samples]]
    f = fake_features[torch.randperm(len(fake_features), generator=gen)[:pr_samples]]
    out[f"precision_{extractor}_{split}"], out[f"recall_{extractor}_{split}"] = precision_recall(r, f)
    out[f"is_{extractor}"], out[f"is_{extractor}_std"] = inception_score(fake_logits)
    return out
