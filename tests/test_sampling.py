"""Samplers against an exact noise predictor: data = one fixed image per class, so eps is known in closed form
and every correct sampler must land on the class's image."""

import math
from fractions import Fraction

import pytest
import torch

from fedgen.config import DiffusionConfig
from fedgen.diffusion.sampling import SAMPLERS, sample
from fedgen.diffusion.schedule import alpha_bars


class ExactEps(torch.nn.Module):
    """The exact noise predictor (or, for a config with prediction="v", the exact v = sqrt(abar) eps -
    sqrt(1 - abar) x0)."""

    def __init__(self, cfg: DiffusionConfig, prototypes: torch.Tensor, error: float = 0.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device
        self.alpha_bar = alpha_bars(cfg.schedule, cfg.timesteps).float()
        self.prototypes = prototypes
        self.error = error
        self.v = cfg.prediction == "v"
        self.calls = 0

    def forward(self, x, t, class_labels):
        self.calls += 1
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        x0 = self.prototypes[class_labels]
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.error:
            eps = eps + self.error * torch.randn(eps.shape, generator=torch.Generator().manual_seed(self.calls))
        return type("Out", (), {"sample": ab.sqrt() * eps - (1 - ab).sqrt() * x0 if self.v else eps})


PROTOS = torch.linspace(-0.9, 0.9, 3 * 64).reshape(3, 1, 8, 8)
LABELS = torch.tensor([0, 1, 2, 2, 1, 0])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("sampler", "sigma", "steps"), [("ddpm", "beta", None), ("ddpm", "beta-tilde", None),
                                                         ("ddim", None, 20), ("dpm-solver", None, 10),
                                                         ("dpm-solver-3", None, 10), ("dpm-solver-sde", None, 20),
                                                         ("unipc", None, 10)])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_exact_predictor_recovers_the_data(schedule, sampler, sigma, steps, clip, prediction):
    cfg = DiffusionConfig(timesteps=100, schedule=schedule, clip_x0=clip, prediction=prediction)
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
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm-solver", "dpm-solver-3", "dpm-solver-sde", "unipc"}


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
    assert resolve_steps(cfg, "ddpm", None) == 20 and resolve_steps(cfg, "dpm-solver", None) == 20  # min(50, T)
    assert resolve_steps(DiffusionConfig(timesteps=200), "ddim", None) == 50


# --- distribution-level tests --------------------------------------------------------------------------------
# Data x0 ~ N(MU, S^2) per pixel has the closed-form optimal predictor eps*(x_t) = E[eps | x_t]; every sampler step
# is then affine in x_t plus Gaussian noise, so the exact law of the output, N(m, v), follows from the paper's
# formulas by a recursion written here independently of diffusers. The samplers' empirical mean and variance must
# match it within 5 standard errors of n independent pixels. MU and S keep the final clamp to [-1, 1] out of play.

MU, S = 0.1, 0.2
N_PIXELS = 400 * 16 * 16


class GaussianEps(torch.nn.Module):
    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.alpha_bar = alpha_bars(cfg.schedule, cfg.timesteps)

    def forward(self, x, t, class_labels):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)
        return type("Out", (), {"sample": eps.float()})


def exact_output_law(cfg: DiffusionConfig, timesteps: list[int], kind: str) -> tuple[float, float]:
    """Mean and variance of the sampler's output for Gaussian data: x_T ~ N(0, 1), then per step from t to the next
    timestep s (alpha_bar_s = 1 after the last): eq. (3) on the respaced chain (alpha_t := abar_t / abar_s), with
    sigma^2 = beta_t or beta~_t and no noise on the last step ('beta', 'beta-tilde'), or DDIM's deterministic
    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat ('ddim')."""
    ab = alpha_bars(cfg.schedule, cfg.timesteps).tolist()
    m, v = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a, a_prev = ab[t], (ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0)
        k = math.sqrt(1 - a) / (a * S**2 + 1 - a)  # eps_hat = k x - k sqrt(a) MU
        e1, e0 = k, -k * math.sqrt(a) * MU
        x1, x0 = (1 - math.sqrt(1 - a) * e1) / math.sqrt(a), -math.sqrt(1 - a) * e0 / math.sqrt(a)  # x0_hat
        if kind == "ddim":
            gain, shift, noise = (math.sqrt(a_prev) * x1 + math.sqrt(1 - a_prev) * e1,
                                  math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e0, 0.0)
        else:
            beta = 1 - a / a_prev
            c_x0, c_xt = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            gain, shift = c_x0 * x1 + c_xt, c_x0 * x0
            last = i + 1 == len(timesteps)
            noise = 0.0 if last else (beta if kind == "beta" else (1 - a_prev) / (1 - a) * beta)
        m, v = gain * m + shift, gain * gain * v + noise
    return m, v


def trailing(T: int, k: int) -> list[int]:
    """t_i = round(T (k - i) / k) - 1, rounding halves up, in exact rational arithmetic."""
    return [math.floor(Fraction(T * (k - i), k) + Fraction(1, 2)) - 1 for i in range(k)]


def _assert_law(x: torch.Tensor, m: float, v: float):
    x = x.double().flatten()
    n = len(x)
    assert n == N_PIXELS
    se_mean, se_var = math.sqrt(v / n), v * math.sqrt(2 / (n - 1))
    assert abs(x.mean().item() - m) < 5 * se_mean, (x.mean().item(), m, se_mean)
    assert abs(x.var().item() - v) < 5 * se_var, (x.var().item(), v, se_var)


@pytest.mark.parametrize(("T", "schedule", "k"), [(100, "linear", 100), (100, "linear", 30), (200, "linear", 101),
                                                  (300, "cosine", 200), (200, "linear", 7)])
@pytest.mark.parametrize("sigma", ["beta", "beta-tilde"])
def test_ancestral_sampler_output_has_the_exact_law(T, schedule, k, sigma):
    cfg = DiffusionConfig(timesteps=T, schedule=schedule, clip_x0=False)
    x = sample(GaussianEps(cfg), cfg, torch.zeros(400, dtype=torch.long), (1, 16, 16), seed=1, sampler="ddpm",
               steps=k, sigma=sigma, batch_size=400)
    _assert_law(x, *exact_output_law(cfg, trailing(T, k), sigma))


@pytest.mark.parametrize(("T", "k"), [(100, 100), (100, 30), (200, 7)])
def test_ddim_output_has_the_exact_law(T, k):
    cfg = DiffusionConfig(timesteps=T, schedule="linear", clip_x0=False)
    x = sample(GaussianEps(cfg), cfg, torch.zeros(400, dtype=torch.long), (1, 16, 16), seed=1, sampler="ddim",
               steps=k, batch_size=400)
    _assert_law(x, *exact_output_law(cfg, trailing(T, k), "ddim"))


def dpm_solver_2m_output_law(cfg: DiffusionConfig, timesteps: list[int]) -> tuple[float, float]:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) from x_T ~ N(0, 1): first-order first and last
    steps, the last one onto sigma = 0. Deterministic, so x_out = A x_T + B: mean B, variance A^2. Each quantity is
    tracked as (coefficient of x_T, constant)."""
    ab = alpha_bars(cfg.schedule, cfg.timesteps).tolist()
    x, prev_x0, prev_h = (1.0, 0.0), None, None
    for i, t in enumerate(timesteps):
        a = ab[t]
        alpha_t, sigma_t = math.sqrt(a), math.sqrt(1 - a)
        k = sigma_t / (a * S**2 + 1 - a)  # eps_hat = k x - k sqrt(a) MU; x0_hat = (x - sigma_t eps_hat) / alpha_t
        x0 = ((1 - sigma_t * k) / alpha_t * x[0], ((1 - sigma_t * k) / alpha_t * x[1]) + sigma_t * k * MU)
        if i + 1 == len(timesteps):  # onto sigma = 0: x_0 = x0_hat
            return x0[1], x0[0] ** 2
        a_s = ab[timesteps[i + 1]]
        alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1 - a_s)
        h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
        if prev_x0 is None:
            d = x0
        else:
            c = 1 / (2 * (prev_h / h))  # 1 / (2 r), r = h_prev / h
            d = ((1 + c) * x0[0] - c * prev_x0[0], (1 + c) * x0[1] - c * prev_x0[1])
        gain = -alpha_s * (math.exp(-h) - 1)
        x = (sigma_s / sigma_t * x[0] + gain * d[0], sigma_s / sigma_t * x[1] + gain * d[1])
        prev_x0, prev_h = x0, h
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("T", "k"), [(100, 30), (1000, 50), (200, 20)])
def test_dpm_solver_output_has_the_exact_law(T, k):
    cfg = DiffusionConfig(timesteps=T, schedule="linear", clip_x0=False)
    x = sample(GaussianEps(cfg), cfg, torch.zeros(400, dtype=torch.long), (1, 16, 16), seed=1, sampler="dpm-solver",
               steps=k, batch_size=400)
    _assert_law(x, *dpm_solver_2m_output_law(cfg, trailing(T, k)))


def test_full_ancestral_chain_is_close_to_the_data_law():
    """Sanity of the reference itself: all T = 1000 steps with sigma^2 = beta land within 1% of N(MU, S^2)."""
    cfg = DiffusionConfig(timesteps=1000, schedule="linear", clip_x0=False)
    m, v = exact_output_law(cfg, list(range(999, -1, -1)), "beta")
    assert m == pytest.approx(MU, rel=1e-3) and v == pytest.approx(S**2, rel=0.01)


@pytest.mark.parametrize("T", [200, 300])
def test_respaced_timesteps_start_at_pure_noise_for_every_k(T):
    from fedgen.diffusion.sampling import make_scheduler

    for sampler in SAMPLERS:
        for k in range(1, T + 1):
            ts = make_scheduler(DiffusionConfig(timesteps=T), sampler, steps=k).timesteps.tolist()
            assert len(ts) == k and ts[0] == T - 1, (sampler, k, ts[:3])
            assert all(b < a for a, b in zip(ts, ts[1:], strict=False)), (sampler, k)
            assert ts == trailing(T, k)


def test_bf16_sampling_runs_the_network_under_autocast():
    class Recorder(ExactEps):
        def forward(self, x, t, class_labels):
            self.seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return super().forward(x, t, class_labels)

    cfg = DiffusionConfig(timesteps=50)
    for bf16 in (False, True):
        model = Recorder(cfg, PROTOS)
        model.seen = []
        out = sample(model, cfg, LABELS, (1, 8, 8), seed=0, sampler="unipc", steps=5, bf16=bf16)
        assert model.seen == [bf16] * 5 and out.dtype == torch.float32
