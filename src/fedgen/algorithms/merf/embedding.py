"""DP-MERF's data summary (Harder et al., AISTATS 2021): the class-conditional sum of random Fourier features.

phi(x) = sqrt(2/D) [cos(W^T x), sin(W^T x)], W ~ N(0, 1/l^2), approximates the Gaussian kernel
exp(-|x - x'|^2 / (2 l^2)) and has |phi(x)| = 1 exactly. With several length scales l_1..l_J, each gets D/J of
the features: phi then approximates the mean of the J Gaussian kernels (coarse and fine structure at once).

Each image contributes the row [phi(x) / sqrt(2), 1 / sqrt(2)] to the row of its class: a (K, D + 1) matrix whose
last column is the class count / sqrt(2). Every record's contribution has L2 norm 1 (checked, clipped where
rounding exceeds it), so adding or removing one record moves the sum by at most 1: the L2 sensitivity of the
Gaussian mechanism (docs/DESIGN.md §10).

W is drawn from the run's seed: public randomness, the same at every silo and at the coordinator, which needs it
to embed the generator's images.
"""

from __future__ import annotations

import math

import torch

from fedgen.core.seeding import generator


class FourierFeatures:
    """The random feature map of a run: `features` features of images of `image_shape`, split equally between
    the length scales `bandwidths`, each given per sqrt(pixel values) (l = b * sqrt(C*H*W))."""

    def __init__(self, image_shape: tuple[int, int, int], features: int, bandwidths: list[float], seed: int,
                 device: torch.device | str = "cpu"):
        if features % (2 * len(bandwidths)):
            raise ValueError(f"merf.features={features}: must be a multiple of 2 x {len(bandwidths)} bandwidths "
                             "(a cosine and a sine per frequency, as many frequencies per bandwidth)")
        dim = math.prod(image_shape)
        per_scale = features // 2 // len(bandwidths)
        gen = generator(seed, "merf-frequencies")
        self.w = torch.cat([torch.randn(dim, per_scale, generator=gen, dtype=torch.float64) / (b * math.sqrt(dim))
                            for b in bandwidths], 1).to(device)
        self.w32 = self.w.float()  # the generator's images are float32: converted once, not at every step
        self.features = features

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D + 1) rows [phi(x) / sqrt(2), 1 / sqrt(2)], each of norm 1; float64 for the release, the dtype of
        the weights (float32) where gradients flow (the generator's images)."""
        x = images.flatten(1).to(self.w.device)
        w = self.w if x.dtype == torch.float64 else self.w32 if x.dtype == torch.float32 else self.w.to(x.dtype)
        proj = x @ w
        phi = torch.cat([proj.cos(), proj.sin()], 1) * math.sqrt(1 / (self.features // 2))
        const = torch.full((len(x), 1), 1.0, dtype=x.dtype, device=x.device)
        return torch.cat([phi, const], 1) / math.sqrt(2)


def class_sums(features: FourierFeatures, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               chunk: int = 2000) -> torch.Tensor:
    """The (K, D + 1) float64 sum of every record's feature row, in the row of its class. A row whose norm
    exceeds 1 by rounding is scaled back to 1, so the sensitivity bound holds exactly."""
    out = torch.zeros(num_classes, features.features + 1, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        rows = features(images[i:i + chunk].to(torch.float64)).cpu()
        rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1.0)
        out.index_add_(0, labels[i:i + chunk].cpu().long(), rows)
    return out


def noisy_counts(sums: torch.Tensor) -> torch.Tensor:
    """The class counts the sum carries in its last column (noised where the sum was), floored at 1."""
    return (sums[:, -1] * math.sqrt(2)).clamp(min=1.0)


def target_embedding(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's target (the data's mean embedding: the sum over all records / their number) and the class
    proportions to draw its labels from, both from the (noised) sums alone."""
    counts = noisy_counts(sums)
    return (sums / counts.sum()).float(), (counts / counts.sum()).float()


def mmd_loss(features: FourierFeatures, target: torch.Tensor, images: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """|target - the generated batch's mean embedding|^2: the squared MMD of the class-conditional kernel in
    feature space (DP-MERF's objective)."""
    rows = features(images)
    generated = torch.zeros_like(target).index_add(0, labels, rows) / len(images)
    return ((target - generated) ** 2).sum()
