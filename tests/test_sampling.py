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


class LabelConstant(torch.nn.Module):
    """eps = label value everywhere: lets the guidance combination be checked exactly."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, x, t, class_labels):
        self.seen.append(class_labels.clone())
        return type("Out", (), {"sample": class_labels.float().view(-1, 1, 1, 1).expand_as(x).clone()})


def test_classifier_free_guidance_combines_conditional_and_null():
    cfg = DiffusionConfig(timesteps=10, clip_x0=False)
    labels = torch.tensor([1, 2])
    model = LabelConstant()
    plain = sample(model, cfg, labels, (1, 2, 2), sampler="ddim", steps=1, guidance=1.0, null_label=5)
    assert [s.tolist() for s in model.seen] == [[1, 2]]
    model.seen.clear()
    guided = sample(model, cfg, labels, (1, 2, 2), sampler="ddim", steps=1, guidance=3.0, null_label=5)
    assert [s.tolist() for s in model.seen] == [[1, 2, 5, 5]]
    # one deterministic DDIM step from the same x_T is affine in eps: compare with eps = 5 + 3 (y - 5)
    model.seen.clear()

    class Fixed(LabelConstant):
        def forward(self, x, t, class_labels):
            eps = (5 + 3 * (class_labels.float() - 5)).view(-1, 1, 1, 1).expand_as(x).clone()
            return type("Out", (), {"sample": eps})

    torch.testing.assert_close(guided, sample(Fixed(), cfg, labels, (1, 2, 2), sampler="ddim", steps=1))
    assert not torch.equal(plain, guided)
    with pytest.raises(ValueError, match="needs a model trained with train.label_dropout"):
        sample(model, cfg, labels, (1, 2, 2), guidance=2.0)


def test_progress_counts_image_evaluations():
    from fedgen.diffusion.sampling import resolve_steps

    cfg = DiffusionConfig(timesteps=20)
    seen = []
    sample(ExactEps(cfg, PROTOS), cfg, LABELS, (1, 8, 8), sampler="ddim", steps=5, batch_size=4, progress=seen.append)
    assert seen == [4] * 5 + [2] * 5  # a batch of 4, then the last 2 labels, 5 evaluations each
    assert sum(seen) == len(LABELS) * resolve_steps(cfg, "ddim", 5)
    assert resolve_steps(cfg, "ddpm", None) == 20 and resolve_steps(cfg, "dpm-solver", None) == 50
