import math

import pytest
import torch

from fedgen.config import DiffusionConfig
from fedgen.diffusion.schedule import alpha_bars, betas, ddpm_scheduler


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 50, 100, 200, 300, 1000, 4000])
def test_alpha_bar_T_is_essentially_zero(schedule, timesteps):
    """DESIGN 1.1: x_T must be pure noise, whatever T."""
    ab = alpha_bars(schedule, timesteps)
    assert ab[-1] < 1e-3
    b = betas(schedule, timesteps)
    assert len(b) == timesteps and (b > 0).all() and (b < 1).all()
    assert (ab[1:] < ab[:-1]).all()


def test_unscaled_ddpm_schedule_would_fail_at_T300():
    """The pitfall the rescaling fixes: DDPM's [1e-4, 0.02] over 300 steps leaves sqrt(alpha_bar_T) ~ 0.22."""
    naive = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 300, dtype=torch.float64), 0)
    assert math.sqrt(naive[-1]) == pytest.approx(0.22, abs=0.01)
    assert betas("linear", 1000)[0] == pytest.approx(1e-4) and betas("linear", 1000)[-1] == pytest.approx(0.02)
    assert betas("linear", 300)[-1] == pytest.approx(0.02 * 1000 / 300)


@pytest.mark.parametrize("sigma", ["beta", "beta-tilde"])
def test_scheduler_step_is_equation_3(sigma):
    """x_{t-1} = 1/sqrt(a_t) (x_t - (1 - a_t)/sqrt(1 - abar_t) eps) + sigma_t z."""
    cfg = DiffusionConfig(timesteps=50, schedule="linear", sigma=sigma, clip_x0=False)
    sched = ddpm_scheduler(cfg)
    sched.set_timesteps(50)
    b = betas("linear", 50).float()
    a = 1 - b
    ab = torch.cumprod(a, 0)
    x = torch.randn(3, 1, 4, 4)
    eps = torch.randn(3, 1, 4, 4)
    for t in (49, 20, 1):
        z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(7))
        got = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        var = b[t] if sigma == "beta" else (1 - ab[t - 1]) / (1 - ab[t]) * b[t]
        want = (x - (1 - a[t]) / torch.sqrt(1 - ab[t]) * eps) / torch.sqrt(a[t]) + torch.sqrt(var) * z
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # last step adds no noise
    got = sched.step(eps, 0, x).prev_sample
    want = (x - (1 - a[0]) / torch.sqrt(1 - ab[0]) * eps) / torch.sqrt(a[0])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_clipping_x0_only_acts_when_the_prediction_leaves_the_data_range():
    clipped = ddpm_scheduler(DiffusionConfig(timesteps=50, clip_x0=True))
    literal = ddpm_scheduler(DiffusionConfig(timesteps=50, clip_x0=False))
    ab = alpha_bars("linear", 50).float()
    t = 30
    x0 = torch.rand(2, 1, 4, 4) * 1.8 - 0.9  # in range
    eps = torch.randn(2, 1, 4, 4)
    x_t = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
    for s in (clipped, literal):
        s.set_timesteps(50)
    a = clipped.step(eps, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
    b = literal.step(eps, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    far = x_t - 5.0  # implies x0 far below -1
    a = clipped.step(eps, t, far, generator=torch.Generator().manual_seed(0)).prev_sample
    b = literal.step(eps, t, far, generator=torch.Generator().manual_seed(0)).prev_sample
    assert (a > b + 0.1).all()  # the clipped step pulls back towards the data range


def test_sigma_choices_differ_and_bad_input():
    cfg = DiffusionConfig(timesteps=20)
    assert ddpm_scheduler(cfg, "beta").config.variance_type == "fixed_large"
    assert ddpm_scheduler(cfg, "beta-tilde").config.variance_type == "fixed_small"
    assert ddpm_scheduler(cfg).config.clip_sample
    assert not ddpm_scheduler(DiffusionConfig(timesteps=20, clip_x0=False)).config.clip_sample
    with pytest.raises(ValueError, match="unknown sigma"):
        ddpm_scheduler(cfg, "huge")
    with pytest.raises(ValueError, match="unknown schedule"):
        betas("quadratic", 10)


def test_training_noise_matches_forward_process():
    """add_noise is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with our betas."""
    cfg = DiffusionConfig(timesteps=300, schedule="linear")
    sched = ddpm_scheduler(cfg)
    ab = alpha_bars("linear", 300).float()
    x0, eps = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    t = torch.tensor([0, 299])
    want = ab[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(sched.add_noise(x0, eps, t), want)
