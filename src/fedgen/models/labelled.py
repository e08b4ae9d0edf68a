"""A "labelled generator": labels and a seed in, images in [-1, 1] out. Sample grids, evaluation and (later)
audits take one, so diffusion and GAN runs share `sample`, `evaluate` and the training-time grids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedgen.config import DiffusionConfig


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
        from fedgen.diffusion.sampling import resolve_steps

        return resolve_steps(self.diffusion, self.sampler, self.steps)

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.evaluations_per_image,
                "guidance": self.diffusion.guidance if self.guidance is None else self.guidance,
                "sampling_precision": "bf16 autocast" if self.bf16 else "fp32"}

    def check(self) -> None:
        from fedgen.diffusion.sampling import check_options

        check_options(self.diffusion, sampler=self.sampler, steps=self.steps, sigma=self.sigma,
                      guidance=self.guidance, null_label=self.null_label)

    def images(self, labels: torch.Tensor, seed: int, progress=None) -> torch.Tensor:
        from fedgen.diffusion.sampling import sample

        return sample(self.model, self.diffusion, labels, self.image_shape, seed=seed, sampler=self.sampler,
                      steps=self.steps, sigma=self.sigma, guidance=self.guidance, null_label=self.null_label,
                      bf16=self.bf16, progress=progress)


@dataclass
class GANSampler:
    """A class-conditional generator G(z, y), z ~ N(0, I) from the seed."""

    generator: torch.nn.Module
    batch_size: int = 500

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    evaluations_per_image = 1

    def describe(self) -> dict:
        return {"sampler": "gan", "steps": 1}

    def check(self) -> None:
        return None

    @torch.no_grad()
    def images(self, labels: torch.Tensor, seed: int, progress=None) -> torch.Tensor:
        self.generator.eval()
        gen = torch.Generator().manual_seed(seed)
        out = []
        for chunk in labels.split(self.batch_size):
            z = torch.randn(len(chunk), self.generator.z_dim, generator=gen)
            out.append(self.generator(z.to(self.device), chunk.to(self.device)).clamp(-1, 1).cpu())
            if progress is not None:
                progress(len(chunk))
        return torch.cat(out)
