"""Server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) and client remedies (FedProx, SCAFFOLD): each against
its definition, the reductions to FedAvg, SCAFFOLD's convergence where FedAvg's is biased, resume, refusals."""

import io
import math

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedgen import config as C
from fedgen.algorithms.feddm.fedavg import fedavg
from fedgen.algorithms.feddm.remedies import Proximal, ScaffoldCorrection, scaffold_server_update
from fedgen.algorithms.feddm.server_opt import ServerOptimizer
from fedgen.algorithms.feddm.silo import SiloStateStore
from fedgen.federation.rundir import RunDir
from fedgen.runtimes.local import train

QUIET = Console(file=io.StringIO())
SMOKE = ["train.cpu_threads=1", "log.loss_eval_samples=0", "train.ema_decay=0"]


def _fl(strategy: str, **values) -> C.FLConfig:
    return C.FLConfig(strategy=strategy, **values)


def _toy_rounds(seed: int = 0, rounds: int = 3):
    """A global state and, per round, two clients' states (weights 3 and 1) near it."""
    gen = torch.Generator().manual_seed(seed)
    start = {"w": torch.randn(6, generator=gen), "b": torch.randn(2, 3, generator=gen)}
    updates = [[{k: v + 0.1 * torch.randn(v.shape, generator=gen) * (i + 1) for k, v in start.items()}
                for i in range(2)] for _ in range(rounds)]
    return start, updates


def _server_rounds(fl: C.FLConfig, start, updates):
    opt = ServerOptimizer(fl, start)
    state, out = start, []
    for clients in updates:
        clients = [{k: v + (state[k] - start[k]) for k, v in c.items()} for c in clients]  # around the moving θ_g
        state = opt.step(fedavg(clients, [3, 1]))
        out.append((clients, state))
    return out


@pytest.mark.parametrize("strategy,extra", [("fedavg", {}), ("fedavgm", {"server_momentum": 0.0}),
                                            ("fedprox", {}), ("scaffold", {})])
def test_sgd_server_at_lr_one_without_momentum_is_fedavg_exactly(strategy, extra):
    start, updates = _toy_rounds()
    for clients, state in _server_rounds(_fl(strategy, server_lr=1.0, **extra), start, updates):
        expected = fedavg(clients, [3, 1])
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_fedavgm_update_equals_its_definition_on_two_clients():
    """v <- beta v + (theta_g - avg), theta_g <- theta_g - lr v (Hsu et al. 2019; Reddi et al.'s FedAvgM)."""
    start, updates = _toy_rounds()
    lr, beta = 0.7, 0.9
    theta = {k: v.double() for k, v in start.items()}
    v = {k: torch.zeros_like(t) for k, t in theta.items()}
    for clients, state in _server_rounds(_fl("fedavgm", server_lr=lr, server_momentum=beta), start, updates):
        avg = {k: (3 * clients[0][k].double() + clients[1][k].double()) / 4 for k in theta}
        for k in theta:
            v[k] = beta * v[k] + (theta[k] - avg[k])
            theta[k] = theta[k] - lr * v[k]
            torch.testing.assert_close(state[k], theta[k].float(), rtol=0, atol=1e-6)
    assert not torch.allclose(state["w"], fedavg(clients, [3, 1])["w"])  # momentum moved it elsewhere


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimisers_follow_their_definitions(strategy):
    """Reddi et al. 2021, Algorithm 2 with Delta = avg - theta_g, plus the bias correction of Adam/Yogi
    (m_hat = m / (1 - b1^t), sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t)); Adagrad and Yogi accumulators start at
    tau^2 (Yogi's first moment too: pytorch-optimizer's initial_accumulator, +tau^2 in the pseudo-gradient's
    sign, so -tau^2 for Delta = -g)."""
    lr, (b1, b2), tau = 0.05, (0.9, 0.99), 1e-3
    start, updates = _toy_rounds(seed=1, rounds=4)
    theta = {k: v.double() for k, v in start.items()}
    init = tau**2 if strategy != "fedadam" else 0.0
    m = {k: torch.full_like(t, -init if strategy == "fedyogi" else 0.0) for k, t in theta.items()}
    v = {k: torch.full_like(t, init) for k, t in theta.items()}
    results = _server_rounds(_fl(strategy, server_lr=lr, server_betas=(b1, b2), server_tau=tau), start, updates)
    for t, (clients, state) in enumerate(results, start=1):
        for k in theta:
            delta = (3 * clients[0][k].double() + clients[1][k].double()) / 4 - theta[k]
            if strategy == "fedadagrad":
                v[k] = v[k] + delta**2
                theta[k] = theta[k] + lr * delta / (v[k].sqrt() + tau)
            else:
                m[k] = b1 * m[k] + (1 - b1) * delta
                if strategy == "fedadam":
                    v[k] = b2 * v[k] + (1 - b2) * delta**2
                else:
                    v[k] = v[k] - (1 - b2) * delta**2 * torch.sign(v[k] - delta**2)
                theta[k] = theta[k] + lr / (1 - b1**t) * m[k] / (v[k].sqrt() / math.sqrt(1 - b2**t) + tau)
            torch.testing.assert_close(state[k], theta[k].float(), rtol=0, atol=1e-6)


def test_proximal_term_adds_its_gradient():
    model = torch.nn.Linear(3, 2)
    anchor = {k: v.detach() + 0.5 for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    Proximal(model, anchor, mu=0.2).before_step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 1 + 0.2 * (p.detach() - anchor[name]), rtol=0, atol=0)


def _smoke(out, *overrides, rounds=3):
    cfg = C.load("tiny", overrides=[*SMOKE, f"fl.rounds={rounds}", *overrides])
    train(cfg, out, QUIET)
    return load_file(out / "checkpoints" / f"round_{rounds:04d}" / "global.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_pulls_towards_the_global_model(tmp_path):
    fedavg_run = _smoke(tmp_path / "avg", rounds=2)
    assert _same(_smoke(tmp_path / "prox0", "fl.strategy=fedprox", "fl.prox_mu=0", rounds=2), fedavg_run)
    strong = _smoke(tmp_path / "prox", "fl.strategy=fedprox", "fl.prox_mu=1000", rounds=2)
    assert not _same(strong, fedavg_run)
    # a strong proximal term keeps each local model, and so the round's average, near the global model it started
    # from: round 2 moves the global weights less than under FedAvg
    moved = {}
    for name, run in (("avg", fedavg_run), ("prox", strong)):
        round1 = load_file(tmp_path / name / "checkpoints" / "round_0001" / "global.safetensors")
        moved[name] = math.sqrt(sum(float(((run[k] - round1[k]) ** 2).sum()) for k in run))
    assert moved["prox"] < 0.5 * moved["avg"], moved


# ------------------------------------------------------------------------------------------------ SCAFFOLD


class _Point(torch.nn.Module):
    def __init__(self, x):
        super().__init__()
        self.x = torch.nn.Parameter(x.clone())


def _quadratic_federation(strategy: str, rounds: int, steps: int = 10, lr: float = 0.05):
    """Four clients f_i(x) = a_i/2 |x - b_i|^2 (sizes 1, 2, 3, 4), K local SGD steps each round, server SGD at lr 1;
    FedAvg or SCAFFOLD (algorithms/feddm/remedies.py). Returns (the global x per round, the clients' variates,
    the server's)."""
    a = torch.tensor([1.0, 4.0, 0.5, 8.0], dtype=torch.float64)
    b = torch.tensor([[3.0, -1.0], [-2.0, 0.5], [1.0, 4.0], [0.0, -3.0]], dtype=torch.float64)
    sizes = {0: 1, 1: 2, 2: 3, 3: 4}
    global_state = {"x": torch.zeros(2, dtype=torch.float64)}
    opt = ServerOptimizer(_fl("scaffold" if strategy == "scaffold" else "fedavg"), global_state)
    control = {"x": torch.zeros(2, dtype=torch.float64)}
    client_controls: dict[int, dict] = {}
    history = []
    for _ in range(rounds):
        states, deltas = {}, {}
        for i in sizes:
            model = _Point(global_state["x"])
            sgd = torch.optim.SGD(model.parameters(), lr=lr)
            remedy = ScaffoldCorrection(model, global_state, lr, control, client_controls.get(i)) \
                if strategy == "scaffold" else None
            for _ in range(steps):
                sgd.zero_grad()
                (a[i] / 2 * ((model.x - b[i]) ** 2).sum()).backward()
                sgd.step()
                if remedy is not None:
                    remedy.after_step()
            states[i] = {"x": model.x.detach().clone()}
            if remedy is not None:
                out = remedy.finish(steps)
                client_controls[i], deltas[i] = out["control"], out["control_delta"]
        global_state = opt.step(fedavg([states[i] for i in sizes], [sizes[i] for i in sizes]))
        if strategy == "scaffold":
            control = scaffold_server_update(control, deltas, sizes)
        history.append(global_state["x"])
    optimum = (torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)[:, None] * a[:, None] * b).sum(0) / (
        torch.tensor([1.0, 2, 3, 4], dtype=torch.float64) * a).sum()
    return history, client_controls, control, optimum, (a, b)


def test_scaffold_variates_follow_option_two():
    """The paper's algorithm written out: y <- y - lr (g_i(y) - c_i + c) for K steps, c_i+ = c_i - c +
    (x - y) / (K lr), x <- sum_i p_i y_i, c <- c + sum_i p_i (c_i+ - c_i); three rounds. After round 1
    (c = c_i = 0) each c_i+ is the mean of the K gradients along the client's path."""
    steps, lr = 10, 0.05
    history, controls, control, _, (a, b) = _quadratic_federation("scaffold", rounds=3, steps=steps, lr=lr)
    p = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64) / 10
    x, c, ci = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), [torch.zeros(2)] * 4
    ci = [v.double() for v in ci]
    for r in range(3):
        ys, new = [], []
        for i in range(4):
            y, grads = x.clone(), []
            for _ in range(steps):
                grads.append(a[i] * (y - b[i]))
                y = y - lr * (grads[-1] - ci[i] + c)
            ys.append(y)
            new.append(ci[i] - c + (x - y) / (steps * lr))
            if r == 0:
                torch.testing.assert_close(new[i], torch.stack(grads).mean(0), rtol=1e-12, atol=1e-12)
        x = sum(p[i] * ys[i] for i in range(4))
        c = c + sum(p[i] * (new[i] - ci[i]) for i in range(4))
        ci = new
        torch.testing.assert_close(history[r], x, rtol=1e-12, atol=1e-12)
    for i in range(4):
        torch.testing.assert_close(controls[i]["x"], ci[i], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(control["x"], c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(control["x"], sum(p[i] * controls[i]["x"] for i in range(4)), rtol=1e-12, atol=1e-12)


def test_scaffold_converges_to_the_global_optimum_where_fedavg_does_not():
    fedavg_path, *_, optimum, _ = _quadratic_federation("fedavg", rounds=300)
    scaffold_path, *_ = _quadratic_federation("scaffold", rounds=300)
    # FedAvg with 10 local steps settles at a fixed point away from argmin sum_i p_i f_i (client drift) ...
    assert (fedavg_path[-1] - fedavg_path[-2]).norm() < 1e-10
    assert (fedavg_path[-1] - optimum).norm() > 0.1
    # ... SCAFFOLD's corrected steps reach the optimum itself
    assert (scaffold_path[-1] - optimum).norm() < 1e-8


def test_scaffold_client_variates_live_with_the_clients(tmp_path):
    """A smoke run with 2 of 4 clients per round: each silo keeps its c_i in its own state directory (also across
    rounds it sits out), and the server's checkpointed c is sum_i p_i c_i over all four."""
    out = tmp_path / "run"
    _smoke(out, "fl.strategy=scaffold", "fl.clients_per_round=2")
    run = RunDir(out)
    sizes = next(r for r in run.read_metrics() if r["event"] == "start")["client_sizes"]
    rounds = [r["clients"] for r in run.read_metrics() if r["event"] == "round"]
    assert len({tuple(c) for c in rounds}) > 1, rounds  # somebody sat a round out
    server = torch.load(out / "checkpoints" / "round_0003" / "optimizer.pt")["scaffold_control"]
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in server.items()}
    for silo in range(4):
        saved = SiloStateStore(run.silo_state(silo)).load(3)
        if not any(silo in c for c in rounds):  # never sampled: c_i is still 0, nothing stored
            assert saved is None
            continue
        assert saved["control"] is not None, silo
        for k in expected:
            expected[k] += saved["control"][k].double() * sizes[silo] / sum(sizes)
    for k in server:
        torch.testing.assert_close(server[k].double(), expected[k], rtol=1e-5, atol=1e-7)
    assert any(float(v.abs().max()) > 0 for v in server.values())


@pytest.mark.parametrize("strategy", ["fedyogi", "scaffold"])
def test_resume_with_server_state_equals_uninterrupted(tmp_path, strategy):
    whole = _smoke(tmp_path / "whole", f"fl.strategy={strategy}", rounds=4)
    _smoke(tmp_path / "parts", f"fl.strategy={strategy}", rounds=2)
    assert _same(_smoke(tmp_path / "parts", f"fl.strategy={strategy}", rounds=4), whole)
    assert not _same(whole, _smoke(tmp_path / "avg", rounds=4))


@pytest.mark.parametrize("overrides,message", [
    (["fl.strategy=fedadam", "fl.centralized=true"], "the centralized baseline has one client"),
    (["fl.strategy=scaffold", "privacy.mode=client-dp", "privacy.noise_multiplier=1", "privacy.delta=0.01"],
     "a second per-client release"),
    (["fl.server_betas=[0.9, 1.0]"], "each must be in"),
])
def test_refused_strategy_combinations_say_why(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load("tiny", overrides=overrides)
    for preset, algorithm in (("pga-smoke", "pga"), ("merf-smoke", "merf")):
        with pytest.raises(C.ConfigError, match=f"algorithm={algorithm} averages no weights"):
            C.load(preset, overrides=["fl.strategy=fedprox"])


# ------------------------------------------------------------------------------------------------ compare


def test_compare_labels_runs_by_their_differences_and_counts_compute(tmp_path):
    from typer.testing import CliRunner

    from fedgen.cli import app
    from fedgen.runs.compare import compare

    loss = "log.loss_eval_samples=16"
    _smoke(tmp_path / "avg", loss, rounds=2)
    _smoke(tmp_path / "adam", loss, "fl.strategy=fedadam", rounds=2)
    _smoke(tmp_path / "cen", loss, "fl.centralized=true", rounds=1)
    series, budget, _ = compare([tmp_path / "avg", tmp_path / "adam", tmp_path / "cen"], "global_test_loss")
    by_name = {s.run.name: s for s in series}
    assert by_name["adam"].label == "centralized=False, strategy=fedadam"
    assert by_name["cen"].label == "centralized=True, strategy=fedavg"
    # image passes: local epochs (1) x the images of the clients trained in each round; centralized: all of them
    records = RunDir(tmp_path / "avg").read_metrics()
    sizes = records[0]["client_sizes"]
    per_round = [sum(sizes[c] for c in r["clients"]) for r in records if r["event"] == "round"]
    assert by_name["avg"].compute == [per_round[0], per_round[0] + per_round[1]]
    assert by_name["cen"].compute == [sum(sizes)]
    assert budget == min(sum(sizes), sum(per_round))
    assert by_name["avg"].values == [r["global_test_loss"] for r in records if r["event"] == "round"]

    plot = tmp_path / "cmp.png"
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "avg"), str(tmp_path / "adam"),
                                      "--metric", "global_test_loss", "--out", str(plot)])
    assert result.exit_code == 0, result.output
    assert "strategy=fedadam" in result.output and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "avg"), "--metric", "fid_domain_test",
                                      "--out", str(plot)])
    assert result.exit_code == 1 and "no run has 'fid_domain_test'" in result.output
