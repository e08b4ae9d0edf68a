"""Samplers against an exact noise predictor: data = one fixed image per class, so eps is known in closed form
and every correct sampler must land on the class's image."""

import pytest
import torch

from fedgen.config import DiffusionConfig
from fedgen.diffusion.sampling import SAMPLERS, sample
from fedgen.diffusion.schedule import alpha_bars


class ExactEps(torch.nn.Module):
    def __init__(self, cfg: DiffusionConfig, prototypes: torch.Tensor, error: float = 0.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device
        self.alpha_bar = alpha_bars(cfg.schedule, cfg.timesteps).float()
        self.prototypes = prototypes
        self.error = error
        self.calls = 0

    def forward(self, x, t, class_labels):
        self.calls += 1
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.prototypes[class_labels]) / (1 - ab).sqrt()
        if self.error:
            eps = eps + self.error * torch.randn(eps.shape, generator=torch.Generator().manual_seed(self.calls))
        return type("Out", (), {"sample": eps})


PROTOS = torch.linspace(-0.9, 0.9, 3 * 64).reshape(3, 1, 8, 8)
LABELS = torch.tensor([0, 1, 2, 2, 1, 0])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("sampler", "sigma", "steps"), [("ddpm", "beta", None), ("ddpm", "beta-tilde", None),
                                                         ("ddim", None, 20), ("dpm-solver", None, 10)])
@pytest.mark.parametrize("clip", [True, False])
def test_exact_predictor_recovers_the_data(schedule, sampler, sigma, steps, clip):
    cfg = DiffusionConfig(timesteps=100, schedule=schedule, clip_x0=clip)
    model = ExactEps(cfg, PROTOS)
    out = sample(model, cfg, LABELS, (1, 8, 8), seed=0, sampler=sampler, steps=steps, sigma=sigma)
    assert out.shape == (6, 1, 8, 8)
    assert model.calls == (steps or 100)  # one network evaluation per step for the batch
    assert (out - PROTOS[LABELS]).abs().max() < 1e-3


def test_small_prediction_errors_do_not_blow_up():
    cfg = DiffusionConfig(timesteps=200, schedule="linear")
    out = sample(ExactEps(cfg, PROTOS, error=0.02), cfg, LABELS, (1, 8, 8), seed=0)
    assert (out - PROTOS[LABELS]).abs().max() < 0.05


def test_seeded_and_bad_input():
    cfg = DiffusionConfig(timesteps=20)
    model = ExactEps(cfg, PROTOS, error=0.1)
    a = sample(model, cfg, LABELS, (1, 8, 8), seed=1)
    model.calls = 0
    assert torch.equal(a, sample(model, cfg, LABELS, (1, 8, 8), seed=1))
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, cfg, LABELS, (1, 8, 8), sampler="euler")
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=20\]"):
        sample(model, cfg, LABELS, (1, 8, 8), steps=50)
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm-solver"}
