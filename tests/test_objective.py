"""The training objective's options: v-prediction and min-SNR-gamma weighting (diffusion/loss.py), checked against
the closed forms, and a training run that records and uses them."""

import os

import pytest
import torch
from rich.console import Console

from fedgen import config as C
from fedgen.config import DiffusionConfig
from fedgen.diffusion.loss import diffusion_loss, draw_timesteps, loss_weights, noise_levels, snr, training_target
from fedgen.diffusion.schedule import alpha_bars, ddpm_scheduler
from fedgen.federation.rundir import RunDir
from fedgen.runtimes.local import train

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115


def _scheduler(prediction: str, T: int = 100):
    return ddpm_scheduler(DiffusionConfig(timesteps=T, schedule="linear", prediction=prediction))


def test_snr_and_min_snr_weights_match_the_closed_form():
    ab = alpha_bars("linear", 100).float()
    t = torch.tensor([0, 10, 40, 99])
    expected_snr = ab[t] / (1 - ab[t])
    sched = _scheduler("epsilon")
    assert torch.allclose(snr(sched, t), expected_snr)
    # SNR at t=0 is ~ 1e4 (capped: weight gamma/SNR), at t=99 ~ 4e-5 (uncapped: weight 1 for epsilon)
    assert expected_snr[0] > 5 > expected_snr[-1]
    capped = expected_snr.clamp(max=5.0)
    assert torch.allclose(loss_weights(sched, t, 5.0), capped / expected_snr)
    assert torch.allclose(loss_weights(_scheduler("v"), t, 5.0), capped / (expected_snr + 1))
    assert loss_weights(sched, t, None) is None


def test_v_target_is_sqrt_abar_eps_minus_sqrt_one_minus_abar_x0():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 6, 6, generator=gen) * 2 - 1, torch.randn(4, 1, 6, 6, generator=gen)
    t = torch.tensor([0, 5, 50, 99])
    ab = alpha_bars("linear", 100).float()[t].view(-1, 1, 1, 1)
    v = training_target(_scheduler("v"), x0, noise, t)
    assert torch.allclose(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0, atol=1e-6)
    assert torch.equal(training_target(_scheduler("epsilon"), x0, noise, t), noise)


class Oracle(torch.nn.Module):
    """Predicts the exact target for a batch whose x0 it was told, plus a fixed offset: its loss is offset^2."""

    def __init__(self, scheduler, x0, offset: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.scheduler, self.x0, self.offset = scheduler, x0, offset

    def forward(self, x_t, t, class_labels):
        ab = self.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        noise = (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        target = training_target(self.scheduler, self.x0, noise, t)
        return type("Out", (), {"sample": target + self.offset})


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_loss_scores_the_scheduler_target_and_applies_the_weights(prediction):
    sched = _scheduler(prediction)
    x0 = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.zeros(64, dtype=torch.long)
    model = Oracle(sched, x0, offset=0.5)
    plain = diffusion_loss(model, sched, x0, labels, torch.Generator().manual_seed(2), reduction="none")
    assert torch.allclose(plain, torch.full((64,), 0.25), atol=1e-4)  # exactly the offset: the right target
    weighted = diffusion_loss(model, sched, x0, labels, torch.Generator().manual_seed(2), reduction="none",
                              min_snr_gamma=5.0)
    t = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(2))  # the loss's own draw
    assert torch.allclose(weighted, plain * loss_weights(sched, t, 5.0), atol=1e-6)
    assert not torch.allclose(weighted, plain)


def test_a_run_records_its_objective_and_trains_with_it(tmp_path):
    """The options reach the silos' loss: one smoke round with v + min-SNR ends with other weights than the
    paper's objective and than v alone from the same seed, and the run's config records them."""
    states = {}
    for name, sets in (("paper", []), ("v", ["diffusion.prediction=v", "diffusion.min_snr_gamma=5"]),
                       ("v-uniform", ["diffusion.prediction=v"])):
        out = tmp_path / name
        train(C.load("tiny", overrides=["fl.rounds=1", *sets]), out, QUIET)
        states[name] = RunDir(out).load_checkpoint().global_state
    saved = C.load(config_path=tmp_path / "v" / "config.toml")
    assert (saved.diffusion.prediction, saved.diffusion.min_snr_gamma) == ("v", 5.0)
    assert C.load(config_path=tmp_path / "paper" / "config.toml").diffusion.min_snr_gamma is None
    assert any(not torch.equal(states["paper"][k], states["v"][k]) for k in states["paper"])
    assert any(not torch.equal(states["v-uniform"][k], states["v"][k]) for k in states["v"])  # the weights too


@pytest.fixture(scope="module")
def one_tiny_round(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train(C.load("tiny", overrides=["fl.rounds=1"]), out, QUIET)
    return RunDir(out).load_checkpoint().global_state


@pytest.mark.parametrize("option", ["diffusion.timestep_sampling=log-normal", "train.warmup_steps=3",
                                    "train.adam_betas=[0.5, 0.9]", "diffusion.prediction=x0"])
def test_each_recipe_option_reaches_the_silos(tmp_path, option, one_tiny_round):
    """One smoke round with the option ends with other weights than without it, and the run records it."""
    from fedgen.diffusion.sampling import sample

    train(C.load("tiny", overrides=["fl.rounds=1", option]), tmp_path / "option", QUIET)
    states = {"base": one_tiny_round, "option": RunDir(tmp_path / "option").load_checkpoint().global_state}
    assert any(not torch.equal(states["base"][k], states["option"][k]) for k in states["base"])
    key, value = option.split("=")
    section, field = key.split(".")
    saved = getattr(getattr(C.load(config_path=tmp_path / "option" / "config.toml"), section), field)
    assert saved == getattr(getattr(C.load("tiny", overrides=[option]), section), field)
    if option == "diffusion.prediction=x0":  # the fast samplers read an x0 model's output as x0
        from fedgen.nn.unet import build_unet

        cfg = C.load("tiny", overrides=[option])
        model = build_unet(cfg.model, (1, 8, 8), 10)
        model.load_state_dict(states["option"])
        images = sample(model.eval(), cfg.diffusion, torch.arange(4), (1, 8, 8), sampler="dpm-solver-sde", steps=3)
        assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_cosine_lr_decay_over_rounds_then_constant():
    from fedgen.algorithms.feddm.local_update import TrainSettings

    s = TrainSettings(epochs=1, batch_size=8, lr=1e-3, hflip=False, bf16=False, seed=0, lr_decay_rounds=5,
                      lr_final_ratio=0.1)
    assert [round(s.lr_at(r), 12) for r in range(7)] == [1e-3, round(1e-4 + 9e-4 * (1 + 0.5 ** 0.5) / 2, 12),
                                                         5.5e-4, round(1e-4 + 9e-4 * (1 - 0.5 ** 0.5) / 2, 12),
                                                         1e-4, 1e-4, 1e-4]
    constant = TrainSettings(epochs=1, batch_size=8, lr=1e-3, hflip=False, bf16=False, seed=0)
    assert {constant.lr_at(r) for r in range(50)} == {1e-3}


def test_the_round_learning_rate_reaches_adam_even_with_carried_state():
    """The centralized baseline carries Adam's state across rounds; the state's saved lr must not win."""
    from fedgen.algorithms.feddm.local_update import LocalUpdate, TrainSettings
    from fedgen.data.silos import SiloData
    from fedgen.nn.unet import build_unet

    cfg = C.load("tiny")
    model = build_unet(cfg.model, (1, 8, 8), 3)
    data = SiloData(torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 3)
    settings = TrainSettings(epochs=1, batch_size=8, lr=1e-3, hflip=False, bf16=False, seed=0, keep_optimizer=True,
                             lr_decay_rounds=3, lr_final_ratio=0.25)
    local = LocalUpdate(0, data, model, ddpm_scheduler(cfg.diffusion), torch.device("cpu"))
    first = local.fit(model.state_dict(), 0, settings)
    assert first.optimizer_state["param_groups"][0]["lr"] == 1e-3
    later = local.fit(first.state, 2, settings, optimizer_state=first.optimizer_state)
    assert later.optimizer_state["param_groups"][0]["lr"] == 2.5e-4


def test_lr_final_ratio_without_a_decay_is_refused():
    with pytest.raises(C.ConfigError, match="train.lr_final_ratio.*set train.lr_decay_rounds"):
        C.load("tiny", overrides=["train.lr_final_ratio=0.5"])


def test_the_paper_presets_keep_the_papers_objective_and_the_default_job_does_not():
    for name in C.PRESETS:
        d = C.load(name).diffusion
        if name.startswith("paper-") or name == "tiny":
            assert (d.prediction, d.min_snr_gamma) == ("epsilon", None), name
    d = C.load("fmnist-quick").diffusion
    assert (d.prediction, d.min_snr_gamma) == ("v", 5.0)


def test_x0_target_and_weights():
    """x0-prediction scores the clean image, and its min-SNR weight is min(SNR, gamma) (the same x0-error weight as
    epsilon's min(SNR, gamma)/SNR and v's min(SNR, gamma)/(SNR + 1), whose targets scale the x0 error by SNR and
    SNR + 1)."""
    sched = _scheduler("x0")
    assert sched.config.prediction_type == "sample"
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 6, 6, generator=gen) * 2 - 1, torch.randn(4, 1, 6, 6, generator=gen)
    t = torch.tensor([0, 10, 40, 99])
    assert torch.equal(training_target(sched, x0, noise, t), x0)
    expected_snr = snr(sched, t)
    assert torch.allclose(loss_weights(sched, t, 5.0), expected_snr.clamp(max=5.0))


def test_uniform_timesteps_are_the_draws_of_eq_2():
    """The default draw is torch.randint on the generator: runs trained before the option keep their numbers."""
    sched = _scheduler("epsilon")
    drawn = draw_timesteps(sched, 1000, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randint(0, 100, (1000,), generator=torch.Generator().manual_seed(3)))


def test_log_normal_timesteps_follow_edm_noise_levels():
    """ln sigma_t of the drawn t is N(-1.2, 1.2^2) rounded to the schedule's levels: with n = 20,000 draws the
    median's standard error is 1.2 * sqrt(pi / 2) / sqrt(n) = 0.0106, the share below the mean 0.5 +- 0.0035 (sd);
    rounding to the nearest level moves a draw by at most half a level gap (0.09 in ln sigma near sigma = 0.3 for
    T = 200). Bounds: 5 standard errors plus that gap."""
    sched = ddpm_scheduler(DiffusionConfig(timesteps=200, schedule="linear", prediction="v"))
    levels = noise_levels(sched).log()
    gaps = levels.diff()
    t = draw_timesteps(sched, 20000, torch.Generator().manual_seed(0), "log-normal", (-1.2, 1.2))
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= 199
    drawn = levels[t]
    near = int((levels + 1.2).abs().argmin())
    assert abs(float(drawn.median()) + 1.2) < 5 * 0.0106 + float(gaps[near - 1: near + 1].max())
    assert abs(float(drawn.std()) - 1.2) < 0.05
    # every draw is the nearest level to some ln sigma: t's level is within half a gap of the sampled value, so
    # redrawing the same normals and rounding by brute force gives the same t
    log_sigma = -1.2 + 1.2 * torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(t, (log_sigma[:, None] - levels[None]).abs().argmin(1))
    # uniform draws put half of t above T/2 (ln sigma > 0.1 here); log-normal puts under a fifth there
    assert float((t >= 100).double().mean()) < 0.2
    with pytest.raises(ValueError, match="unknown timestep sampling 'edm'"):
        draw_timesteps(sched, 4, torch.Generator(), "edm")


def test_warmup_scales_each_local_updates_first_steps():
    """With train.warmup_steps = k the local Adam's step i uses lr (i + 1) / k, then lr: Adam's first step moves each
    weight by at most its lr, so the first update of a fresh model is bounded by lr / k; without warm-up it is lr."""
    from fedgen.algorithms.feddm.local_update import LocalUpdate, TrainSettings
    from fedgen.data.silos import SiloData
    from fedgen.nn.unet import build_unet

    assert [TrainSettings(1, 8, 1.0, False, False, 0, warmup_steps=4).warmup_factor(i) for i in range(6)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cfg = C.load("tiny")
    data = SiloData(torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 3)
    moved, lrs = {}, {}
    for k in (0, 10):
        model = build_unet(cfg.model, (1, 8, 8), 3)
        start = {n: p.detach().clone() for n, p in model.state_dict().items()}
        settings = TrainSettings(epochs=1, batch_size=8, lr=1e-2, hflip=False, bf16=False, seed=0, warmup_steps=k,
                                 adam_betas=(0.8, 0.95), keep_optimizer=True)
        result = LocalUpdate(0, data, model, ddpm_scheduler(cfg.diffusion), torch.device("cpu")).fit(start, 0, settings)
        moved[k] = max(float((result.state[n] - start[n]).abs().max()) for n in start if start[n].is_floating_point())
        group = result.optimizer_state["param_groups"][0]
        lrs[k], betas = group["lr"], group["betas"]
        assert betas == (0.8, 0.95)
    assert 0.9e-2 < moved[0] <= 1.0001e-2  # one step (8 images, batch 8): Adam's first step is ~lr per weight
    assert 0.9e-3 < moved[10] <= 1.0001e-3
    assert (lrs[0], lrs[10]) == (1e-2, 1e-3)


def test_bad_adam_betas_are_refused():
    with pytest.raises(Exception, match=r"train.adam_betas \(0.9, 1.0\): each must be in \[0, 1\)"):
        C.load("tiny", overrides=["train.adam_betas=[0.9, 1.0]"])
