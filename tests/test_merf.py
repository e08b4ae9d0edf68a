"""DP-MERF: the feature map and its sensitivity, the silo's one-shot release and its account, whole runs (resume,
evaluation), the config checks and the privacy-budget defaults."""

import io
import math

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from scipy.optimize import brentq
from scipy.stats import norm
from typer.testing import CliRunner

from fedgen import config as C
from fedgen.algorithms.merf.embedding import FourierFeatures, class_sums, mmd_loss, target_embedding
from fedgen.algorithms.merf.silo import RELEASE_FILE, MERFSilo
from fedgen.cli import app
from fedgen.core.errors import SiloStateError
from fedgen.core.records import Request
from fedgen.data.silos import SiloData
from fedgen.federation.rundir import RunDir
from fedgen.federation.silo_state import SiloStateStore
from fedgen.runtimes.local import train

QUIET = Console(file=io.StringIO())
SHAPE = (1, 8, 8)


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=gen) * 2 - 1, torch.randint(10, (n,), generator=gen)


@pytest.mark.parametrize("bandwidths", [[0.8], [0.4, 1.6]])
def test_every_feature_row_has_norm_one_and_approximates_the_mean_gaussian_kernel(bandwidths):
    features = FourierFeatures(SHAPE, 20000, bandwidths, seed=0)
    x, _ = _images(10)
    rows = features(x.double())
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-12)
    # phi(x).phi(x') = 2 rows.rows' - 1; each is a mean of D/2 = 10,000 cosines, so its sd is at most 1/100
    approx = 2 * rows @ rows.T - 1
    squared = torch.cdist(x.flatten(1), x.flatten(1)).double() ** 2
    exact = torch.stack([torch.exp(-squared / (2 * (b * math.sqrt(64)) ** 2)) for b in bandwidths]).mean(0)
    assert (approx - exact).abs().max() < 5 / 100
    assert exact.min() < 0.9  # the pairs are not all near-identical: the check has something to measure


def test_one_record_moves_the_sums_by_exactly_its_unit_row():
    features = FourierFeatures(SHAPE, 1000, [0.8], seed=0)
    x, y = _images(50)
    with_all, without_one = class_sums(features, x, y, 10), class_sums(features, x[1:], y[1:], 10)
    diff = with_all - without_one
    assert float(diff.norm()) == pytest.approx(1.0, abs=1e-12)
    moved = (diff.abs().sum(1) > 1e-9).nonzero().flatten().tolist()
    assert moved == [int(y[0])]  # only the class row of the record moves (others by summation order, ~1e-15)
    # the last column counts the records of each class
    torch.testing.assert_close(with_all[:, -1] * math.sqrt(2), torch.bincount(y, minlength=10).double())


def test_the_loss_is_zero_for_the_data_itself_and_grows_away_from_it():
    features = FourierFeatures(SHAPE, 1000, [0.8], seed=0)
    x, y = _images(200)
    target, proportions = target_embedding(class_sums(features, x, y, 10))
    torch.testing.assert_close(proportions, torch.bincount(y, minlength=10).float() / 200)
    assert float(mmd_loss(features, target, x, y)) < 1e-6
    assert float(mmd_loss(features, target, x * 0.5, y)) > 1e-3


def _silo(tmp_path, mode="dp-release", n=120, secret=None):
    overrides = [] if mode == "dp-release" else ["privacy.mode=none", "privacy.target_epsilon=none"]
    cfg = C.load("merf-smoke", overrides=overrides)
    store = SiloStateStore(tmp_path / "silo_000")
    if secret is not None:
        store.path.mkdir(parents=True, exist_ok=True)
        (store.path / "noise_secret").write_text(str(secret))
    x, y = _images(n)
    return cfg, MERFSilo(cfg, 0, SiloData(x, y), [str(k) for k in range(10)], torch.device("cpu"), store)


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """epsilon of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Theorem 8)."""
    def delta_at(eps):
        return norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
    return brentq(lambda e: delta_at(e) - delta, 1e-6, 100)


def test_a_dp_silo_releases_once_and_reports_the_gaussian_mechanism(tmp_path):
    cfg, silo = _silo(tmp_path)
    first = silo.handle(Request(0, "merf-release", {}, {"privacy_steps": 0}))
    again = silo.handle(Request(0, "merf-release", {}, {"privacy_steps": 1}))
    assert torch.equal(first.arrays["release"]["sums"], again.arrays["release"]["sums"])  # the same bits
    assert first.config == again.config and first.config["dp_steps"] == 1 and first.config["dp_sample_rate"] == 1.0
    sigma, eps = first.config["dp_noise_multiplier"], first.config["dp_epsilon"]
    exact = _exact_gaussian_epsilon(sigma, cfg.privacy.delta)
    assert exact <= eps <= exact * 1.02  # never below the mechanism's true epsilon, and close to it
    assert eps <= cfg.privacy.target_epsilon
    # the noise: release - exact sums, K (D + 1) = 5,010 draws of N(0, sigma^2); the sample sd is within 5 of its
    # standard errors (sigma / sqrt(2 n)) of sigma
    exact_sums = class_sums(FourierFeatures(SHAPE, cfg.merf.features, cfg.merf.bandwidths, cfg.train.seed),
                            silo.data.images, silo.data.labels, 10)
    noise = first.arrays["release"]["sums"] - exact_sums
    assert abs(float(noise.std()) - sigma) < 5 * sigma / math.sqrt(2 * noise.numel())


def test_the_noise_comes_from_the_silos_secret_not_the_config(tmp_path):
    _, a = _silo(tmp_path / "a", secret=1)
    _, b = _silo(tmp_path / "b", secret=2)
    _, c = _silo(tmp_path / "c", secret=1)
    release = [s.handle(Request(0, "merf-release", {}, {})).arrays["release"]["sums"] for s in (a, b, c)]
    assert not torch.equal(release[0], release[1]) and torch.equal(release[0], release[2])


def test_a_silo_that_lost_its_release_refuses_a_second_draw(tmp_path):
    _, silo = _silo(tmp_path)
    silo.handle(Request(0, "merf-release", {}, {"privacy_steps": 0}))
    (silo.store.path / RELEASE_FILE).unlink()
    with pytest.raises(SiloStateError, match="holds no release .* second, unaccounted release"):
        silo.handle(Request(0, "merf-release", {}, {"privacy_steps": 1}))


def test_without_privacy_the_release_is_the_exact_sum(tmp_path):
    cfg, silo = _silo(tmp_path, mode="none")
    reply = silo.handle(Request(0, "merf-release", {}, {}))
    exact = class_sums(FourierFeatures(SHAPE, cfg.merf.features, cfg.merf.bandwidths, cfg.train.seed),
                       silo.data.images, silo.data.labels, 10)
    assert torch.equal(reply.arrays["release"]["sums"], exact) and reply.config == {}


def test_a_run_trains_resumes_bit_identically_and_spends_epsilon_once(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out in (straight, split):  # pinned noise secrets: both runs draw the same noise
        for s in range(3):
            (out / "silos" / f"silo_{s:03d}").mkdir(parents=True, exist_ok=True)
            (out / "silos" / f"silo_{s:03d}" / "noise_secret").write_text(str(99 + s))
    train(C.load("merf-smoke", overrides=["fl.rounds=3"]), straight, QUIET)
    train(C.load("merf-smoke", overrides=["fl.rounds=2"]), split, QUIET)
    train(C.load("merf-smoke", overrides=["fl.rounds=3"]), split, QUIET)
    a, b = (load_file(d / "checkpoints" / "round_0003" / "global.safetensors") for d in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(straight / "checkpoints" / "round_0002" / "global.safetensors")
    assert any(not torch.equal(before[k], a[k]) for k in a)  # the generator trains after the release round
    records = RunDir(split).round_records()
    assert [r["clients"] for r in records] == [[0, 1, 2], [], []]  # the silos are asked once, in round 1
    assert records[0]["bytes_up"] > 0 and records[1]["bytes_up"] == records[2]["bytes_up"] == 0
    losses = [r["loss_mean"] for r in RunDir(straight).round_records()]
    assert losses[-1] < losses[0]
    ledger = records[-1]["privacy"]
    assert ledger["mode"] == "dp-release" and ledger["unit"] == "record" and "sensitivity" in ledger
    assert {s: p["steps"] for s, p in ledger["parties"].items()} == {"0": 1, "1": 1, "2": 1}
    assert ledger["epsilon"] == records[0]["privacy"]["epsilon"] <= 10.0  # spent in round 1, never again


def test_evaluate_samples_the_generator(tmp_path):
    out = tmp_path / "run"
    train(C.load("merf-smoke"), out, QUIET)
    result = CliRunner().invoke(app, ["evaluate", str(out), "--n", "50"])
    assert result.exit_code == 0, result.output
    record = RunDir(out).read_metrics()[-1]
    assert record["event"] == "evaluate" and record["generated"] == 50 and record["fid_domain_test"] > 0
    result = CliRunner().invoke(app, ["evaluate", str(out), "--n", "50", "--tstr", "--tstr-samples", "100",
                                      "--no-baselines"])
    assert result.exit_code == 0, result.output
    record = RunDir(out).read_metrics()[-1]
    assert 0 <= record["tstr_accuracy"] <= 1 and "local_real_accuracy_mean" not in record  # no silo baselines
    bad = CliRunner().invoke(app, ["evaluate", str(out), "--n", "50", "--steps", "4"])
    assert bad.exit_code != 0 and "eval.steps: used only by algorithm=feddm" in bad.output


@pytest.mark.parametrize(("overrides", "message"), [
    (["privacy.mode=dp-sgd"], "DP-MERF trains nothing at the silos"),
    (["merf.features=500"], "must be a multiple of 2 x 3 bandwidths"),
    (["merf.bandwidths=[0.5, -1.0]"], "every bandwidth positive"),
    (["fl.clients_per_round=2"], "every silo releases once"),
    (["privacy.max_grad_norm=2.0"], "privacy.max_grad_norm: dp-release clips nothing"),
    (["pga.width=8"], "pga.width: used only by algorithm=pga"),
    (["train.lr=0.1"], "train.lr: used only by algorithm=feddm"),
])
def test_merf_config_checks(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load("merf-smoke", overrides=overrides)


def test_dp_release_and_merf_settings_belong_to_merf():
    with pytest.raises(C.ConfigError, match="dp-release is DP-MERF's one-shot release"):
        C.load("tiny", overrides=["privacy.mode=dp-release", "privacy.target_epsilon=5"])
    with pytest.raises(C.ConfigError, match="merf.features: used only by algorithm=merf"):
        C.load("tiny", overrides=["merf.features=100"])


def test_a_privacy_budget_alone_gets_the_record_level_mode_and_says_so():
    notes: list[str] = []
    cfg = C.load("tiny", overrides=["privacy.target_epsilon=5"], notes=notes)
    assert cfg.privacy.mode == "dp-sgd" and "record-level dp-sgd" in notes[0] and C.DP_RECIPE in notes[0]
    notes.clear()
    with pytest.raises(C.ConfigError, match="privacy.noise_multiplier: used only with a privacy mode: set "
                                            "privacy.mode=dp-release"):  # an explicit mode is kept
        C.load("merf-smoke", overrides=["privacy.mode=none", "privacy.target_epsilon=none",
                                        "privacy.noise_multiplier=2.0"], notes=notes)
    assert notes == []
    raw, note = C.privacy_defaults({"algorithm": "merf", "privacy": {"target_epsilon": 3.0}})
    assert raw["privacy"]["mode"] == "dp-release" and "dp-release" in note


def test_fedgen_train_with_only_a_budget_trains_the_dp_recipe(tmp_path, monkeypatch):
    """No preset, only privacy.target_epsilon: the DP recipe (dp-fmnist-quick) at that budget, said on the
    console; its dataset is switched to digits here to keep the test fast."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--set", "privacy.target_epsilon=3",
                                      "--set", "data.dataset=digits", "--set", "fl.rounds=1",
                                      "--set", "merf.steps_per_round=2", "--set", "merf.features=240"])
    assert result.exit_code == 0, result.output
    assert f"preset {C.DP_RECIPE} (the DP recipe" in result.output
    cfg = RunDir(out).config()
    assert cfg.algorithm == "merf" and cfg.privacy.mode == "dp-release" and cfg.privacy.target_epsilon == 3.0
    assert RunDir(out).round_records()[-1]["privacy"]["epsilon"] <= 3.0
