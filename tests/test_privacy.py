"""Differential privacy and audits: the accountant against Opacus's own, the solved noise, per-record clipping and
noise multiplicity, accounts across resume and runtimes, client-level DP, and the attacks' statistics."""

import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedgen import config as C
from fedgen.algorithms.feddm.local_update import LocalUpdate, TrainSettings
from fedgen.cli import app
from fedgen.data.silos import SiloData
from fedgen.diffusion.loss import diffusion_loss
from fedgen.diffusion.schedule import ddpm_scheduler
from fedgen.evaluation import audit
from fedgen.federation.rundir import RunDir
from fedgen.federation.selection import sample_silos
from fedgen.nn.gan import DISCRIMINATORS, build_discriminator
from fedgen.nn.unet import build_unet
from fedgen.privacy.accountant import PrivacyBudgetError, epsilon, open_account, solve_noise_multiplier
from fedgen.privacy.client_dp import clip_update, noised_mean_update, update_norm
from fedgen.privacy.dpsgd import PrivacyModelError, PrivateSteps, check_model, poisson_plan
from fedgen.runtimes.local import train

QUIET = Console(file=io.StringIO())
DP = ["train.cpu_threads=1", "privacy.mode=dp-sgd", "privacy.accountant=rdp"]  # RDP: fast to solve


# -- accounting ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_opacus_privacy_engine(kind):
    """fedgen's epsilon for (sigma, q, steps, delta) is what Opacus's PrivacyEngine reports after the same number
    of Poisson-sampled DP-SGD steps, and it falls as sigma grows."""
    from opacus import PrivacyEngine

    data = torch.utils.data.TensorDataset(torch.randn(200, 3), torch.randn(200, 1))
    model = torch.nn.Linear(3, 1)
    engine = PrivacyEngine(accountant=kind)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=torch.utils.data.DataLoader(data, batch_size=20),
                                             noise_multiplier=1.1, max_grad_norm=1.0, poisson_sampling=True)
    steps = 0
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            steps += 1
    ours = epsilon(kind, 1.1, 20 / 200, steps, 1e-5)
    assert ours == pytest.approx(engine.get_epsilon(1e-5), rel=1e-9)
    eps = [epsilon(kind, s, 0.1, steps, 1e-5) for s in (0.7, 1.1, 2.0, 4.0)]
    assert all(a > b for a, b in zip(eps, eps[1:], strict=False))


@pytest.mark.parametrize(("kind", "target", "q", "steps"), [("rdp", 1.0, 0.05, 500), ("prv", 10.0, 0.03, 2000),
                                                              ("prv", 1.0, 0.2, 40)])
def test_solved_noise_multiplier_meets_the_target(kind, target, q, steps):
    sigma = solve_noise_multiplier(kind, target, 1e-5, q, steps)
    reached = epsilon(kind, sigma, q, steps, 1e-5)
    assert target - 0.011 <= reached <= target  # Opacus's search stops within 0.01 below the target


def test_delta_must_be_below_one_over_the_dataset():
    cfg = C.load("tiny", overrides=["privacy.mode=dp-sgd", "privacy.target_epsilon=5", "privacy.delta=0.01"])
    with pytest.raises(PrivacyBudgetError, match=r"privacy.delta=0.01 is not below 1/200"):
        open_account(cfg.privacy, 0.1, 100, 200)
    assert open_account(cfg.privacy, 0.1, 100, 99).noise_multiplier > 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["privacy.mode=dp-sgd"], "needs exactly one of privacy.target_epsilon and privacy.noise_multiplier"),
    (["privacy.mode=dp-sgd", "privacy.target_epsilon=1", "privacy.noise_multiplier=1"], "needs exactly one"),
    (["privacy.mode=client-dp", "privacy.noise_multiplier=1", "fl.centralized=true", "privacy.delta=0.01"],
     "the centralized baseline has one"),
    (["privacy.mode=client-dp", "privacy.noise_multiplier=1", "privacy.delta=0.5"], "is not below 1/N = 1/4"),
])
def test_bad_privacy_config_names_the_field(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load("tiny", overrides=overrides)


def test_client_dp_is_refused_for_pga():
    with pytest.raises(C.ConfigError, match="PGA sends none"):
        C.load("pga-smoke", overrides=["privacy.mode=client-dp", "privacy.noise_multiplier=1"])


# -- per-record clipping and noise multiplicity --------------------------------------------------------------------
def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_unet(C.ModelConfig(arch="tiny"), (1, 8, 8), 10)


def _rows(model, x, y, rows, seed):
    """Per-row DDPM losses of `rows` draws per image (rows of an image adjacent), from a seeded generator."""
    sched = ddpm_scheduler(C.DiffusionConfig(timesteps=50))
    gen = torch.Generator().manual_seed(seed)
    return diffusion_loss(model, sched, x.repeat_interleave(rows, 0), y.repeat_interleave(rows, 0), gen,
                          reduction="none")


def _flat_grad(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _private_update(model, x, y, rows, seed, clip, batch):
    """One DP step with sigma=0: the gradient the optimizer applied (= sum of clipped per-record gradients / batch)
    and the per-record norms before clipping."""
    trainer = PrivateSteps(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                             max_grad_norm=clip, expected_batch_size=batch, noise_generator=torch.Generator())
    trainer.step(_rows(model, x, y, rows, seed), len(y))
    norms = trainer.per_record_norms()
    applied = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    trainer.close()
    return applied, norms


@pytest.mark.parametrize("clip", [1e-3, 1e3])
def test_per_sample_clipping_bounds_every_records_contribution(clip):
    """Each record alone moves the weights by exactly clip(g_i) = g_i min(1, C/||g_i||), with g_i its own gradient
    computed by plain autograd; a batch moves them by the sum of those over the expected batch size."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1, torch.tensor([0, 3, 3, 7])
    model = _tiny_model()
    clipped = []
    for i in range(4):
        reference = copy.deepcopy(model)
        g = _flat_grad(reference, _rows(reference, x[i:i + 1], y[i:i + 1], 1, seed=10 + i).sum())
        step, norms = _private_update(copy.deepcopy(model), x[i:i + 1], y[i:i + 1], 1, 10 + i, clip, batch=1)
        assert norms[0].item() == pytest.approx(g.norm().item(), rel=1e-4)
        assert step.norm().item() == pytest.approx(min(g.norm().item(), clip), rel=1e-4)
        assert step.norm().item() <= clip * (1 + 1e-5)
        torch.testing.assert_close(step, g * min(1.0, clip / g.norm().item()), rtol=1e-3, atol=1e-9)
        clipped.append(step)
    # the same four records in one batch (one draw stream, so compare norms per record and the sum's bound)
    step, norms = _private_update(copy.deepcopy(model), x, y, 1, 99, clip, batch=4)
    assert step.norm().item() <= clip * (1 + 1e-5)  # ||sum of 4 clipped|| / 4 <= C
    assert len(norms) == 4


def test_noise_multiplicity_averages_before_clipping():
    """K noise draws of one image: the contribution is clip(mean_k g_k), not mean_k clip(g_k)."""
    x, y = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1, torch.tensor([5])
    model, k, clip = _tiny_model(), 4, 0.05
    grads = []
    for j in range(k):  # draw j's gradient alone, the draws made exactly as in the DP step
        ref = copy.deepcopy(model)
        grads.append(_flat_grad(ref, _rows(ref, x, y, k, seed=7)[j]))
    mean = torch.stack(grads).mean(0)
    clip_of_mean = mean * min(1.0, clip / mean.norm().item())
    mean_of_clips = torch.stack([g * min(1.0, clip / g.norm().item()) for g in grads]).mean(0)
    assert (clip_of_mean - mean_of_clips).norm() > 0.1 * clip  # the two readings differ here
    step, norms = _private_update(copy.deepcopy(model), x, y, k, 7, clip, batch=1)
    assert len(norms) == 1 and norms[0].item() == pytest.approx(mean.norm().item(), rel=1e-4)
    torch.testing.assert_close(step, clip_of_mean, rtol=1e-3, atol=1e-9)


def test_the_account_advances_by_the_optimisers_step_hook_once_per_step():
    """DP-SGD wraps the local loop: every optimiser step, an empty Poisson sample's noise-only step included, adds
    one step to the account, and `before_step` (FedProx's term) runs once per step after the noise; nothing else
    counts."""
    model = _tiny_model()
    account = open_account(C.PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0), 0.5, 10, None)
    account.steps = 7  # steps taken in earlier rounds
    seen = []
    steps = PrivateSteps(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=2, noise_generator=torch.Generator().manual_seed(0),
                         account=account, before_step=lambda: seen.append(account.steps))
    x, y = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1, torch.tensor([1, 4])
    steps.step(_rows(model, x, y, 1, seed=1), 2)
    steps.step(torch.zeros(0), 0)  # an empty Poisson sample
    steps.step(_rows(model, x[:1], y[:1], 1, seed=2), 1)
    steps.close()
    assert account.steps == 10 and seen == [8, 9, 10]
    other = _tiny_model()
    sampler = PrivateSteps(other, torch.optim.SGD(other.parameters(), lr=0.1), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=4, noise_generator=torch.Generator(), account=account)
    batches = list(sampler.batches(40, 4, 3, torch.Generator().manual_seed(0)))
    sampler.close()
    assert len(batches) == 3 * poisson_plan(40, 4)[1] and account.steps == 10  # drawing batches spends nothing


def test_opacus_refusals_name_the_layer_and_the_dp_zoo_is_accepted():
    bad = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(PrivacyModelError, match=r"  1 \(BatchNorm2d\): BatchNorm cannot support training with "
                                                r"differential privacy"):
        check_model(bad)
    for kind in DISCRIMINATORS:
        check_model(build_discriminator(kind, (1, 8, 8), 10, private=True))
    with pytest.raises(PrivacyModelError, match=r"  body.3 \(BatchNorm2d\)"):
        check_model(build_discriminator("dcgan", (1, 8, 8), 10))
    check_model(build_unet(C.ModelConfig(arch="cpu-small"), (1, 28, 28), 10))  # GroupNorm, attention: fine


# -- whole DP runs -------------------------------------------------------------------------------------------------
def _reports(run_dir):
    rounds = [r for r in RunDir(run_dir).read_metrics() if r["event"] == "round"]
    return [r["privacy"] for r in rounds]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "run"
    train(C.load("tiny", overrides=[*DP, "privacy.noise_multiplier=1.0", "fl.rounds=4"]), out, QUIET)
    return out


def test_a_dp_run_logs_every_silos_account_and_the_runs_epsilon(dp_run):
    cfg = RunDir(dp_run).config()
    ledger = _reports(dp_run)
    sizes = next(r for r in RunDir(dp_run).read_metrics() if r["event"] == "start")["client_sizes"]
    for r, entry in enumerate(ledger, start=1):
        assert entry["mode"] == "dp-sgd" and entry["unit"] == "record" and entry["delta"] == 1e-5
        for silo, rep in entry["parties"].items():
            q, per_epoch = poisson_plan(sizes[int(silo)], cfg.train.batch_size)
            took_part = sum(int(silo) in sample_silos(4, 3, 0, k) for k in range(r))
            assert rep["steps"] == took_part * per_epoch and rep["sample_rate"] == q
            assert rep["epsilon"] == pytest.approx(epsilon("rdp", 1.0, q, rep["steps"], 1e-5), rel=1e-9)
        assert entry["epsilon"] == max(rep["epsilon"] for rep in entry["parties"].values())
    assert ledger[-1]["epsilon"] > ledger[0]["epsilon"] > 0
    rounds = [r for r in RunDir(dp_run).read_metrics() if r["event"] == "round"]
    # no silo reports a loss on its own data (unaccounted releases); the coordinator's test loss remains
    assert all(r["local_train_loss"] == {} and r["global_client_loss"] == {} for r in rounds)
    assert all(r["global_test_loss"] > 0 for r in rounds)
    runner = CliRunner()
    done = runner.invoke(app, ["privacy", str(dp_run)])
    assert done.exit_code == 0, done.output
    assert f"record-level ε={ledger[-1]['epsilon']:.3g} (δ=1e-05)" in done.output and "silo 0" in done.output


def test_resuming_a_dp_run_continues_the_accountant(dp_run, tmp_path):
    """2 rounds, then extended to 4: the same accounts (steps, epsilon) as 4 uninterrupted rounds; the model equals
    an uninterrupted run in the same directory's secret, and differs from another directory's (the noise is not a
    function of the config)."""
    out = tmp_path / "ext"
    train(C.load("tiny", overrides=[*DP, "privacy.noise_multiplier=1.0", "fl.rounds=2"]), out, QUIET)
    train(C.load("tiny", overrides=[*DP, "privacy.noise_multiplier=1.0", "fl.rounds=4"]), out, QUIET)
    a, b = _reports(dp_run)[-1], _reports(out)[-1]
    assert {s: (r["steps"], r["epsilon"]) for s, r in a["parties"].items()} == \
        {s: (r["steps"], r["epsilon"]) for s, r in b["parties"].items()}
    ga, gb = (load_file(d / "checkpoints" / "round_0004" / "global.safetensors") for d in (dp_run, out))
    assert not all(torch.equal(ga[k], gb[k]) for k in ga)  # different secrets: different noise


def test_extending_a_dp_run_keeps_its_noise_multiplier(tmp_path):
    out = tmp_path / "ext"
    train(C.load("tiny", overrides=[*DP, "privacy.target_epsilon=8", "fl.rounds=2"]), out, QUIET)
    first = _reports(out)[-1]
    assert first["epsilon"] == pytest.approx(8, abs=0.011)
    train(C.load("tiny", overrides=[*DP, "privacy.target_epsilon=8", "fl.rounds=3"]), out, QUIET)
    last = _reports(out)[-1]
    for silo, rep in first["parties"].items():
        assert last["parties"][silo]["noise_multiplier"] == rep["noise_multiplier"]
    assert last["epsilon"] > 8  # the extension spent more than the budget it was solved for; the ledger says so


def test_a_killed_dp_round_is_redone_with_the_same_noise(tmp_path, monkeypatch):
    """The silo's secret is kept: a round redone after a crash releases exactly what it did before."""
    from fedgen.federation import rundir as rundir_mod

    out = tmp_path / "killed"
    train(C.load("tiny", overrides=[*DP, "privacy.noise_multiplier=1.0", "fl.rounds=2"]), out, QUIET)
    reference = load_file(out / "checkpoints" / "round_0002" / "global.safetensors")
    real_save = rundir_mod.RunDir.save_checkpoint

    def dies(self, ckpt, *args, **kwargs):
        if ckpt.round == 2:
            raise KeyboardInterrupt
        return real_save(self, ckpt, *args, **kwargs)

    again = tmp_path / "again"
    again.mkdir()
    import shutil

    shutil.copytree(out / "silos", again / "silos")  # the same silos (their secrets), a fresh coordinator
    monkeypatch.setattr(rundir_mod.RunDir, "save_checkpoint", dies)
    with pytest.raises(KeyboardInterrupt):
        train(C.load("tiny", overrides=[*DP, "privacy.noise_multiplier=1.0", "fl.rounds=2"]), again, QUIET)
    monkeypatch.undo()
    train(C.load("tiny", overrides=[*DP, "privacy.noise_multiplier=1.0", "fl.rounds=2"]), again, QUIET)
    redone = load_file(again / "checkpoints" / "round_0002" / "global.safetensors")
    assert all(torch.equal(reference[k], redone[k]) for k in reference)
    assert _reports(again)[-1] == _reports(out)[-1]


@pytest.mark.parametrize("loss", ["gan", "acgan"])
def test_pga_with_dp_discriminators(tmp_path, loss):
    out = tmp_path / "pga"
    train(C.load("pga-smoke", overrides=[*DP, "privacy.target_epsilon=5", f"pga.loss={loss}"]), out, QUIET)
    entry = _reports(out)[-1]
    assert set(entry["parties"]) == {"0", "1", "2"} and entry["pga_loss_noise"].endswith("no formal guarantee")
    for rep in entry["parties"].values():
        assert rep["steps"] == 10 == rep["planned_steps"] and rep["epsilon"] == pytest.approx(5, abs=0.011)
    state = torch.load(RunDir(out).silo_state(0) / "round_0002.pt", weights_only=False)
    assert state["privacy"]["steps"] == 10
    assert "GroupNorm" in {type(m).__name__ for m in build_discriminator("dcgan", (1, 8, 8), 10, True).modules()}


# -- client-level DP -----------------------------------------------------------------------------------------------
def test_client_update_is_clipped_and_the_server_noise_has_sd_sigma_c_over_k():
    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.zeros(20000), "step": torch.tensor(3)}
    local = {"w": torch.randn(20000, generator=gen), "step": torch.tensor(3)}
    clipped, norm = clip_update(local, g, 2.0)
    assert norm == pytest.approx(local["w"].norm().item(), rel=1e-6)
    assert update_norm(clipped, g) == pytest.approx(2.0, rel=1e-6)
    small = {"w": local["w"] * 1e-4, "step": torch.tensor(3)}
    assert torch.equal(clip_update(small, g, 2.0)[0]["w"], small["w"])  # inside the ball: untouched
    exact = noised_mean_update(g, [clipped, clipped], 4, 0.0, 2.0, gen)
    torch.testing.assert_close(exact["w"], clipped["w"] / 2)  # sum / K, K=4 sampled, 2 answered
    noised = noised_mean_update(g, [], 4, 1.5, 2.0, gen)
    sd = noised["w"].double().std().item()
    # sample sd of n=20000 normals: relative standard error 1/sqrt(2n) = 0.5%; 5 standard errors
    assert sd == pytest.approx(1.5 * 2.0 / 4, rel=5 / math.sqrt(2 * 20000))
    assert torch.equal(noised["step"], g["step"])


def test_a_client_dp_run_reports_the_servers_epsilon(tmp_path):
    out = tmp_path / "cdp"
    train(C.load("tiny", overrides=["train.cpu_threads=1", "privacy.mode=client-dp", "privacy.noise_multiplier=2",
                                     "privacy.delta=0.01", "privacy.max_grad_norm=0.5", "privacy.accountant=rdp"]),
          out, QUIET)
    ledger = _reports(out)
    for r, entry in enumerate(ledger, start=1):
        assert entry["unit"] == "client" and entry["server"]["steps"] == r
        assert entry["epsilon"] == pytest.approx(epsilon("rdp", 2.0, 3 / 4, r, 0.01), rel=1e-9)
    assert json.loads((out / "privacy" / "client_dp.json").read_text())["noise_multiplier"] == 2


# -- attacks -------------------------------------------------------------------------------------------------------
def test_roc_auc_and_tpr_at_fpr_are_exact():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    m, o = rng.normal(1, 1, 300).round(1), rng.normal(0, 1, 500).round(1)  # with ties
    assert audit.auc(m, o) == pytest.approx(roc_auc_score(np.r_[np.ones(300), np.zeros(500)], np.r_[m, o]))
    members, others = np.array([5.0, 4.0, 1.0, 0.5]), np.array([3.0, 2.0, 0.0, -1.0])
    assert audit.tpr_at_fpr(members, others, 0.0) == 0.5  # threshold 4: TPR 2/4 at FPR 0
    assert audit.tpr_at_fpr(members, others, 0.25) == 0.5  # threshold 3
    assert audit.tpr_at_fpr(members, others, 0.49) == 0.5
    assert audit.tpr_at_fpr(members, others, 0.5) == 1.0  # threshold 0.5: every member, others 3 and 2


def test_epsilon_lower_bound_and_the_dp_check():
    rng = np.random.default_rng(1)
    separable = audit.dp_check(rng.normal(10, 1, 1000), rng.normal(0, 1, 1000), epsilon=1.0, delta=1e-5)
    # TPR 1 at FPR 0 over 1000 each: Clopper-Pearson FPR <= 0.0037, so eps >= log(0.996/0.0037) ~ 5.6
    assert separable["epsilon_lower_bound_95"] > 5 and not separable["respects_dp_bound"]
    chance = audit.dp_check(rng.normal(0, 1, 1000), rng.normal(0, 1, 1000), epsilon=1.0, delta=1e-5)
    assert chance["respects_dp_bound"] and chance["epsilon_lower_bound_95"] < 0.5


def _digits_model_and_targets(train_images, train_labels, steps):
    """The tiny U-Net trained `steps` full-batch Adam steps on the given images (LocalUpdate.fit)."""
    model = _tiny_model(3)
    client = LocalUpdate(0, SiloData(train_images, train_labels), model, ddpm_scheduler(
        C.DiffusionConfig(timesteps=50, schedule="cosine")), torch.device("cpu"))
    settings = TrainSettings(epochs=steps, batch_size=len(train_labels), lr=2e-3, hflip=False, bf16=False, seed=0)
    if steps:
        model.load_state_dict(client.fit(model.state_dict(), 0, settings).state)
    return model


def _digits():
    from fedgen.data.sources import load_dataset
    from fedgen.data.transforms import to_tensor

    ds = load_dataset("digits", None, seed=0)
    return to_tensor(ds.train.images), torch.from_numpy(ds.train.labels), to_tensor(ds.test.images), \
        torch.from_numpy(ds.test.labels)


def test_membership_attacks_are_chance_on_two_halves_of_an_unseen_set():
    x, y, xt, yt = _digits()
    model = _digits_model_and_targets(x[:200], y[:200], steps=30)
    n = len(yt) // 2
    order = torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))[: 2 * n]  # exchangeable halves
    targets = audit.Targets(xt[order], yt[order], np.r_[np.ones(n, bool), np.zeros(n, bool)])
    grid = audit.timestep_grid(50, 6)
    scores = audit.loss_scores(model, ddpm_scheduler(C.DiffusionConfig(timesteps=50, schedule="cosine")), targets,
                               grid, draws=2, seed=0)
    chosen = audit.loss_attack(scores, targets.member, grid, seed=0)
    a = audit.auc(chosen["members"], chosen["others"])
    sd = audit.auc_null_sd(len(chosen["members"]), len(chosen["others"]))
    assert abs(a - 0.5) < 4 * sd  # the timestep was chosen on the other half: no selection bias
    dist = audit.distance_scores(targets, x[200:600], y[200:600])
    assert abs(audit.auc(dist[targets.member], dist[~targets.member]) - 0.5) < 4 * audit.auc_null_sd(n, n)


def test_the_loss_attack_finds_the_members_of_an_overfit_model():
    x, y, xt, yt = _digits()
    members, others = slice(0, 32), slice(32, 64)
    model = _digits_model_and_targets(x[members], y[members], steps=150)
    targets = audit.Targets(torch.cat([x[members], x[others]]), torch.cat([y[members], y[others]]),
                            np.r_[np.ones(32, bool), np.zeros(32, bool)])
    grid = audit.timestep_grid(50, 6)
    scores = audit.loss_scores(model, ddpm_scheduler(C.DiffusionConfig(timesteps=50, schedule="cosine")), targets,
                               grid, draws=4, seed=0)
    chosen = audit.loss_attack(scores, targets.member, grid, seed=0)
    assert audit.auc(chosen["members"], chosen["others"]) > 0.9


def test_memorisation_counts_near_copies():
    x, y, _, _ = _digits()
    gen = torch.Generator().manual_seed(0)
    copies = x[:5] + 0.01 * torch.randn(5, *x.shape[1:], generator=gen)
    fresh = torch.rand(20, *x.shape[1:], generator=gen) * 2 - 1
    result = audit.memorisation(torch.cat([copies, fresh]), x)
    assert (result["ratio"][:5] < 0.1).all() and (result["ratio"][5:] > 0.5).all()
    assert result["nearest"][:5].tolist() == [0, 1, 2, 3, 4]


def test_audit_and_privacy_commands_on_a_run(dp_run, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    done = runner.invoke(app, ["audit", str(dp_run), "--n", "60", "--generated", "100", "--timesteps", "3"])
    assert done.exit_code == 0, done.output
    record = json.loads((dp_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "audit" and record["members"] == 60 and record["round"] == 4
    assert record["mia_loss_targets"] == [30, 30] and record["mia_distance_targets"] == [60, 60]
    assert record["dp_epsilon"] == _reports(dp_run)[-1]["epsilon"] and "mia_loss_respects_dp_bound" in record
    assert 0 <= record["mia_loss_auc_ci"][0] <= record["mia_loss_auc"] <= record["mia_loss_auc_ci"][1] <= 1
    assert (dp_run / "audit" / "nearest_pairs_round_0004.png").exists()
    plain = tmp_path / "plain"
    train(C.load("tiny", overrides=["train.cpu_threads=1", "fl.rounds=1"]), plain, QUIET)
    done = runner.invoke(app, ["privacy", str(plain)])
    assert done.exit_code == 0 and "no formal guarantee" in done.output


# -- a ledger that cannot under-report ------------------------------------------------------------------------------
_TWO_SILOS = [*DP, "privacy.noise_multiplier=1.0", "fl.clients=2", "fl.clients_per_round=2", "fl.min_clients=1"]


@pytest.mark.parametrize("lost", ["the whole folder", "the noise secret", "the newest account"])
def test_a_dp_silo_that_lost_its_state_refuses_and_the_checkpoint_stays(tmp_path, lost):
    """Silo 0's state folder loses its account (or its secret, or its newest round) between two invocations: the
    extension stops, naming the silo and the folder, instead of starting over at epsilon 0 (or reusing nothing of
    its noise); the run directory still ends at round 2, untouched."""
    import shutil

    from fedgen.federation.loop import TrainingAborted

    out = tmp_path / "run"
    train(C.load("tiny", overrides=[*_TWO_SILOS, "fl.rounds=2"]), out, QUIET)
    folder = RunDir(out).silo_state(0)
    before = load_file(out / "checkpoints" / "round_0002" / "global.safetensors")
    metrics = (out / "metrics.jsonl").read_text()
    if lost == "the whole folder":
        shutil.rmtree(folder)
        folder.mkdir()
        why = "holds no privacy account as of round 2; refusing to start again at epsilon = 0"
    elif lost == "the noise secret":
        (folder / "noise_secret").unlink()
        why = "has no noise secret"
    else:  # an older copy of the folder: the account of round 1 only
        (folder / "round_0002.pt").unlink()
        why = "fewer than the"
    with pytest.raises(TrainingAborted, match="round 3 aborted: silo 0") as caught:
        train(C.load("tiny", overrides=[*_TWO_SILOS, "fl.rounds=3"]), out, QUIET)
    assert why in str(caught.value) and str(folder) in str(caught.value)
    assert RunDir(out).committed_rounds() == [1, 2]
    after = load_file(out / "checkpoints" / "round_0002" / "global.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "metrics.jsonl").read_text().startswith(metrics)
    assert '"round": 3' not in (out / "metrics.jsonl").read_text()


def test_the_coordinator_refuses_a_report_that_goes_backwards():
    from fedgen.privacy.ledger import LedgerError, RunPrivacy

    ledger = RunPrivacy(C.load("tiny", overrides=[*DP, "privacy.noise_multiplier=1.0"]), None, 10)
    report = {"dp_epsilon": 2.0, "dp_delta": 1e-5, "dp_steps": 40}
    ledger.observe(1, report, 0)
    assert ledger.known_steps(1) == 40 and ledger.known_steps(0) == 0
    ledger.observe(1, report | {"dp_steps": 60, "dp_epsilon": 2.5}, 1)
    with pytest.raises(LedgerError, match=r"round 3 aborted: silo 1 reports 40 DP steps .* fewer than the 60"):
        ledger.observe(1, report, 2)
    with pytest.raises(LedgerError, match="silo 1 reports 60 DP steps"):
        ledger.observe(1, report | {"dp_steps": 60, "dp_epsilon": 2.4}, 2)
    assert ledger.known_steps(1) == 60  # the refused reports changed nothing
    assert ledger.record(2)["epsilon"] == 2.5


def test_a_privacy_setting_without_a_privacy_mode_is_refused_unless_it_is_a_budget(tmp_path):
    """A budget (target epsilon or sigma) without a mode means the algorithm's record-level mode, said in a note;
    any other privacy setting without a mode would be ignored, and is refused."""
    for setting in ("privacy.delta=1e-6", "privacy.max_grad_norm=2.0"):
        with pytest.raises(C.ConfigError, match=rf"{setting.split('=')[0]}: used only with a privacy mode: set "
                                                r"privacy.mode=dp-sgd"):
            C.load("tiny", overrides=[setting])
    for setting in ("privacy.target_epsilon=10", "privacy.noise_multiplier=1.0"):
        notes: list[str] = []
        assert C.load("tiny", overrides=[setting], notes=notes).privacy.mode == "dp-sgd"
        assert len(notes) == 1 and "record-level dp-sgd" in notes[0]
    not_a_folder = tmp_path / "file"  # the run cannot start there: the test stops after the config is resolved
    not_a_folder.write_text("")
    done = CliRunner().invoke(app, ["train", "--preset", "tiny", "--out", str(not_a_folder), "--set",
                                    "privacy.target_epsilon=10"])
    assert done.exit_code != 0 and "note: a privacy budget without privacy.mode: record-level dp-sgd" in done.output
    with pytest.raises(C.ConfigError, match="privacy.noise_multiplicity: used only by FedDM"):
        C.load("pga-smoke", overrides=[*DP, "privacy.noise_multiplier=1.0", "privacy.noise_multiplicity=2"])
