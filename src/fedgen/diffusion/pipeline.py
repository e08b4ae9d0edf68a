"""The diffusion pipeline: a class-conditional U-Net with one of the samplers, as a labelled sampler (labels and a
seed in, images in [-1, 1] out; federation/algorithm.LabelledSampler)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedgen.config import DiffusionConfig
from fedgen.diffusion.sampling import check_options, resolve_steps, sample


@dataclass
class DiffusionSampler:
    """A class-conditional eps U-Net with one of the samplers (diffusion/sampling.py)."""

    model: torch.nn.Module
    diffusion: DiffusionConfig
    image_shape: tuple[int, int, int]
    null_label: int | None
    sampler: str = "ddpm"
    steps: int | None = None
    sigma: str | None = None
    guidance: float | None = None
    bf16: bool = False  # bfloat16 autocast for the network

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def evaluations_per_image(self) -> int:
        return resolve_steps(self.diffusion, self.sampler, self.steps)

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.evaluations_per_image,
                "guidance": self.diffusion.guidance if self.guidance is None else self.guidance,
                "sampling_precision": "bf16 autocast" if self.bf16 else "fp32"}

    def check(self) -> None:
        check_options(self.diffusion, sampler=self.sampler, steps=self.steps, sigma=self.sigma,
                      guidance=self.guidance, null_label=self.null_label)

    def images(self, labels: torch.Tensor, seed: int, progress=None) -> torch.Tensor:
        return sample(self.model, self.diffusion, labels, self.image_shape, seed=seed, sampler=self.sampler,
                      steps=self.steps, sigma=self.sigma, guidance=self.guidance, null_label=self.null_label,
                      bf16=self.bf16, progress=progress)
