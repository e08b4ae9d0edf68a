"""End-to-end FedDM on the smoke preset: run directory, resume after a kill, extend, refuse, NaN abort."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedgen import config as C
from fedgen.algorithms.feddm import local_update as client_mod
from fedgen.federation.rundir import RunDir, RunDirError
from fedgen.runtimes.local import TrainingAborted, train

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115


def _final_global(run_dir):
    run = RunDir(run_dir)
    return load_file(run.checkpoints / f"round_{run.committed_rounds()[-1]:04d}" / "global.safetensors")


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = C.load("tiny", overrides=["fl.rounds=3"])
    train(cfg, out, QUIET)
    return cfg, out


def test_run_directory_layout(smoke_run):
    cfg, out = smoke_run
    run = RunDir(out)
    assert C.read(run.config_path) == cfg
    part = json.loads(run.partition_path.read_text())
    assert part["method"] == "dirichlet" and part["beta"] == 0.5 and len(part["client_indices"]) == 4
    records = run.read_metrics()
    assert records[0]["event"] == "start" and records[0]["classes"] == [str(i) for i in range(10)]
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert len(r["clients"]) == 3 and set(r["global_client_loss"]) == {str(c) for c in r["clients"]}
        assert 0 < r["global_test_loss"] < 2 and r["time_s"] > 0
        assert r["bytes_down"] == r["bytes_up"] == 3 * 4 * records[0]["num_params"]
    # the loss on fixed (images, t, noise) falls as training proceeds
    assert rounds[-1]["global_test_loss"] < rounds[0]["global_test_loss"]
    assert run.committed_rounds() == [2, 3]  # keep_checkpoints = 2
    assert (run.samples / "final.png").exists() and (run.samples / "round_0003.png").exists()
    trained = {c for r in rounds for c in r["clients"]}
    assert {int(p.stem.split("_")[1]) for p in run.clients.glob("*.safetensors")} == trained


def test_extending_equals_uninterrupted(smoke_run, tmp_path):
    _, full = smoke_run
    out = tmp_path / "ext"
    train(C.load("tiny", overrides=["fl.rounds=2"]), out, QUIET)
    train(C.load("tiny", overrides=["fl.rounds=3"]), out, QUIET)
    _assert_same_state(_final_global(out), _final_global(full))
    assert [r["round"] for r in RunDir(out).read_metrics() if r["event"] == "round"] == [1, 2, 3]


def test_kill_and_resume_gives_identical_weights(smoke_run, tmp_path):
    _, full = smoke_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedgen.cli", "train", "--preset", "tiny", "--set", "fl.rounds=3", "--out",
           str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "round_0001").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert RunDir(out).committed_rounds()[-1] < 3
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    _assert_same_state(_final_global(out), _final_global(full))


def test_half_written_checkpoint_is_ignored(smoke_run, tmp_path):
    import shutil

    _, full = smoke_run
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    run = RunDir(out)
    partial = run.checkpoints / "round_0004.tmp"
    (partial / "clients").mkdir(parents=True)
    (partial / "global.safetensors").write_bytes(b"garbage")
    ckpt = run.load_checkpoint()
    assert ckpt.round == 3 and not partial.exists()


def test_changed_config_is_refused_with_the_list(smoke_run):
    _, out = smoke_run
    with pytest.raises(RunDirError) as exc:
        train(C.load("tiny", overrides=["fl.rounds=3", "data.beta=0.1", "train.lr=0.01"]), out, QUIET)
    changed = str(exc.value).split("Changed:")[1].split("Only")[0]
    assert [line.strip() for line in changed.strip().splitlines()] == ["data.beta: 0.5 -> 0.1",
                                                                       "train.lr: 0.001 -> 0.01"]


def test_nan_loss_aborts_round_and_keeps_last_checkpoint(smoke_run, tmp_path, monkeypatch):
    import shutil

    _, full = smoke_run
    out = tmp_path / "nan"
    shutil.copytree(full, out)
    before = _final_global(out)
    real_loss = client_mod.diffusion_loss

    def poisoned(*args, **kwargs):
        return real_loss(*args, **kwargs) * float("nan")

    monkeypatch.setattr(client_mod, "diffusion_loss", poisoned)
    with pytest.raises(TrainingAborted,
                       match=r"round 4 aborted: 0 of 3 clients.*client \d+, round 4: loss is nan.*round 3"):
        train(C.load("tiny", overrides=["fl.rounds=4"]), out, QUIET)
    run = RunDir(out)
    assert run.committed_rounds()[-1] == 3
    _assert_same_state(_final_global(out), before)
    assert max(r.get("round", 0) for r in run.read_metrics()) == 3


def test_centralized_baseline_trains_one_model_on_all_data(tmp_path):
    out = tmp_path / "cen"
    cfg = C.load("tiny", overrides=["fl.centralized=true", "fl.rounds=2"])
    train(cfg, out, QUIET)
    run = RunDir(out)
    part = json.loads(run.partition_path.read_text())
    assert part["method"] == "centralized" and len(part["client_indices"]) == 1
    rounds = [r for r in run.read_metrics() if r["event"] == "round"]
    assert [r["clients"] for r in rounds] == [[0], [0]]
    assert (run.silo_state(0) / "round_0002.pt").exists()  # Adam carried across rounds, kept by the silo
    # resuming the centralized run after round 1 gives the same weights
    out2 = tmp_path / "cen2"
    train(C.load("tiny", overrides=["fl.centralized=true", "fl.rounds=1"]), out2, QUIET)
    train(cfg, out2, QUIET)
    _assert_same_state(_final_global(out2), _final_global(out))


def test_label_dropout_trains_a_null_class_for_guidance(tmp_path):
    from fedgen.report.grid import sample_grid
    from fedgen.runs.load import load_run_model

    out = tmp_path / "cfg"
    train(C.load("tiny", overrides=["fl.rounds=1", "train.label_dropout=0.2"]), out, QUIET)
    loaded = load_run_model(out)
    assert loaded.model.config.num_class_embeds == 11  # ten classes + the null label
    sample_grid(loaded.sampler(guidance=2.0), loaded.classes, 2, tmp_path / "g.png")
    assert (tmp_path / "g.png").exists()


def test_training_evaluates_every_k_rounds(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev"
    train(C.load("tiny", overrides=["fl.rounds=3", "eval.every=2", "eval.samples=40", "eval.steps=3",
                                     "eval.classifier_epochs=2"]), out, QUIET)
    evaluations = [r for r in RunDir(out).read_metrics() if r["event"] == "evaluate"]
    assert [r["round"] for r in evaluations] == [2, 3]  # every 2 rounds, and always after the last
    for r in evaluations:
        assert r["model"] == "global" and r["generated"] == 40 and r["sampler"] == "dpm-solver-sde" and r["steps"] == 3
        assert r["fid_domain_test"] > 0 and "is_domain" in r


def test_client_models_record_the_round_they_were_trained_in(tmp_path):
    """With K of N clients per round, a client's local model can be older than the run's last round."""
    out = tmp_path / "k1"
    train(C.load("tiny", overrides=["fl.rounds=4", "fl.clients_per_round=1", "log.loss_eval_samples=8"]), out, QUIET)
    run = RunDir(out)
    rounds = [r for r in run.read_metrics() if r["event"] == "round"]
    last_trained = {c: r["round"] for r in rounds for c in r["clients"]}
    assert last_trained == {3: 1, 2: 2, 0: 4}  # seed 0 picks clients 3, 2, 0, 0
    for cid, expected in last_trained.items():
        assert run.load_silo_model(cid)[1] == expected


def test_server_weights_clients_by_dataset_size(smoke_run, monkeypatch):
    """The global model after a round is sum_i |D_i| / sum_j |D_j| theta_i, not the uniform mean."""
    from fedgen.algorithms.feddm import screening as server_mod

    cfg, _ = smoke_run
    seen = {}
    real = server_mod.FedAvgServer.aggregate

    def spy(self, results):
        seen["results"] = dict(results)
        seen["out"] = real(self, results)
        return seen["out"]

    monkeypatch.setattr(server_mod.FedAvgServer, "aggregate", spy)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        train(C.load("tiny", overrides=["fl.rounds=1"]), d, QUIET)
    sizes = [n for _, n in seen["results"].values()]
    assert len(set(sizes)) > 1  # Dirichlet clients of different sizes
    key = next(k for k, v in seen["out"].items() if v.is_floating_point())
    weighted = sum(s[key].double() * n for s, n in seen["results"].values()) / sum(sizes)
    uniform = sum(s[key].double() for s, _ in seen["results"].values()) / len(sizes)
    torch.testing.assert_close(seen["out"][key].double(), weighted, rtol=0, atol=1e-6)
    assert not torch.allclose(weighted, uniform, atol=1e-6)


def test_centralized_runs_r_times_e_epochs(tmp_path, monkeypatch):
    steps = []
    real_fit = client_mod.LocalUpdate.fit

    def counting(self, *args, **kwargs):
        result = real_fit(self, *args, **kwargs)
        steps.append((len(self.data), result.steps))
        return result

    monkeypatch.setattr(client_mod.LocalUpdate, "fit", counting)
    cfg = C.load("tiny", overrides=["fl.centralized=true", "fl.rounds=2", "fl.local_epochs=2"])
    train(cfg, tmp_path / "cen", QUIET)
    n = steps[0][0]
    assert n == 1437  # all of digits' training split in one client
    per_epoch = -(-n // cfg.train.batch_size)
    assert [s for _, s in steps] == [2 * per_epoch] * 2  # R=2 rounds x E=2 epochs


def test_evaluation_runs_after_the_checkpoint_and_a_failure_does_not_stop_training(tmp_path, monkeypatch):
    from fedgen.federation import loop as loop_mod

    out = tmp_path / "evfail"
    committed_at_eval = []

    def failing(ctx, state):
        committed_at_eval.append(RunDir(out).committed_rounds()[-1])
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(loop_mod, "_evaluate", failing)
    train(C.load("tiny", overrides=["fl.rounds=2", "eval.every=1"]), out, QUIET)
    run = RunDir(out)
    assert committed_at_eval == [1, 2]  # each round was committed before its evaluation started
    failures = [r for r in run.read_metrics() if r["event"] == "evaluate_failed"]
    assert [f["round"] for f in failures] == [1, 2] and "evaluation exploded" in failures[0]["error"]
    assert run.committed_rounds()[-1] == 2 and (run.samples / "final.png").exists()


def test_killed_during_samples_resumes_without_repeating_the_round(tmp_path, monkeypatch):
    from fedgen.federation import loop as loop_mod

    out = tmp_path / "killed-samples"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while drawing the last round's grid

    monkeypatch.setattr(loop_mod, "_write_samples", killed)
    with pytest.raises(KeyboardInterrupt):
        train(C.load("tiny", overrides=["fl.rounds=2"]), out, QUIET)
    assert RunDir(out).committed_rounds()[-1] == 2
    monkeypatch.undo()
    fits = []
    monkeypatch.setattr(client_mod.LocalUpdate, "fit", lambda *a, **k: fits.append(1))
    train(C.load("tiny", overrides=["fl.rounds=2"]), out, QUIET)
    assert fits == [] and (out / "samples" / "final.png").exists()
    assert [r["round"] for r in RunDir(out).read_metrics() if r["event"] == "round"] == [1, 2]


def test_lowering_rounds_below_the_completed_ones_is_refused(smoke_run):
    _, out = smoke_run
    before = (out / "config.toml").read_text()
    with pytest.raises(RunDirError, match="fl.rounds=2 is below the 3 rounds"):
        train(C.load("tiny", overrides=["fl.rounds=2"]), out, QUIET)
    assert (out / "config.toml").read_text() == before


def test_evaluation_split_does_not_depend_on_the_run_seed():
    """digits has no test split of its own: every run, whatever its seed, is scored on the same held-out images."""
    import numpy as np

    from fedgen.data.silos import FederatedData

    a = FederatedData.build(C.load("tiny", overrides=["train.seed=0"]))
    b = FederatedData.build(C.load("tiny", overrides=["train.seed=7"]))
    np.testing.assert_array_equal(a.reference.test.images, b.reference.test.images)
    torch.testing.assert_close(a.test.images, b.test.images)
    assert not all(np.array_equal(x, y) for x, y in zip(a.partition.client_indices, b.partition.client_indices,
                                                          strict=True))  # the seed still drives the split


def test_one_process_trains_a_run_directory_at_a_time(tmp_path):
    """While another process holds the run directory (here: this test, through the same lock), `fedgen train` into
    it refuses in one line naming the holder's PID and host and writes nothing; once it is free, training goes on.
    A lock file left by a process that died holds nothing: the next run takes it."""
    import socket

    out = tmp_path / "run"
    cfg = C.load("tiny", overrides=["fl.rounds=1"])
    train(cfg, out, QUIET)
    metrics = (out / "metrics.jsonl").read_text()
    with RunDir(out).lock():
        cmd = [str(Path(sys.executable).parent / "fedgen"), "train", "--out", str(out), "--set", "fl.rounds=2"]
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        said = " ".join(second.stderr.split())
        assert f"is being trained by PID {os.getpid()} on host {socket.gethostname()}" in said
        assert "Traceback" not in second.stderr
        with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
            train(C.load("tiny", overrides=["fl.rounds=2"]), out, QUIET)
    assert (out / "metrics.jsonl").read_text() == metrics  # the refused runs wrote nothing
    (out / ".lock").write_text("PID 999999999 on host gone (since 2026-01-01 00:00:00 UTC)\n")  # died holding it
    train(C.load("tiny", overrides=["fl.rounds=2"]), out, QUIET)
    assert [r["round"] for r in RunDir(out).round_records()] == [1, 2]
    with RunDir(tmp_path / "never").lock():  # a directory made only for the lock is removed again
        pass
    assert not (tmp_path / "never").exists()


def test_readers_count_a_round_recorded_twice_once(tmp_path):
    from fedgen.runs.compare import load_series

    out = tmp_path / "run"
    train(C.load("tiny", overrides=["fl.rounds=2"]), out, QUIET)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    second = next(line for line in lines if '"event": "round"' in line and '"round": 2' in line)
    with (out / "metrics.jsonl").open("a") as f:  # what two writers used to leave
        f.write(second + "\n")
    run = RunDir(out)
    assert run.duplicate_rounds() == [2] and [r["round"] for r in run.round_records()] == [1, 2]
    series = load_series(out, "global_test_loss")
    assert series.rounds == [1, 2] and series.total_rounds == 2
    sizes = run.read_metrics()[0]["client_sizes"]
    chosen = [r["clients"] for r in run.round_records()]
    assert series.total_compute == sum(sizes[c] for clients in chosen for c in clients)  # E=1
    from typer.testing import CliRunner

    from fedgen.cli import app

    done = CliRunner().invoke(app, ["privacy", str(out)])
    assert done.exit_code == 0 and "2 rounds" in done.output and "records rounds [2] twice" in done.output
    # compare without --metric on a run never evaluated: the per-round test loss, said in the title; words whole
    done = CliRunner().invoke(app, ["compare", str(out), "--out", str(tmp_path / "c.png")])
    assert done.exit_code == 0, done.output
    assert "global_test_loss (no run was evaluated: the per-round global_test_loss instead of fid_domain_test)" \
        in " ".join(done.output.split())  # the title wraps between words, never inside one
    assert str(out.name) in done.output and (tmp_path / "c.png").exists()
    assert "privacy" not in done.output
    done = CliRunner().invoke(app, ["compare", str(out), "--metric", "fid_domain_test"])
    assert done.exit_code == 1 and "no run has 'fid_domain_test'" in done.output


@pytest.mark.parametrize("preset", ["tiny", "pga-smoke"])
def test_both_algorithms_implement_the_protocols_the_loop_and_the_pools_drive(preset, tmp_path):
    """The round loop drives an `Algorithm` and the pools a `Worker` per silo, whichever algorithm: no probing for
    optional attributes. A fit request's progress length is its optimiser steps; PGA's step has none of its own."""
    from fedgen.algorithms.coordinators import make_algorithm
    from fedgen.core.records import Request, Worker
    from fedgen.federation.algorithm import Algorithm, RoundContext
    from fedgen.runtimes.local import in_process_federation

    cfg = C.load(preset)
    with in_process_federation(cfg, torch.device("cpu"), QUIET, tmp_path) as fed:
        workers = fed.pool.workers
        assert sorted(workers) == list(range(cfg.fl.clients))
        assert all(isinstance(w, Worker) for w in workers.values())
        algorithm = make_algorithm(RoundContext(cfg, RunDir(tmp_path), fed, torch.device("cpu"), QUIET))
        assert isinstance(algorithm, Algorithm)
        assert algorithm.weights == ("ema" if cfg.train.ema_decay > 0 and preset == "tiny" else "raw")
        fit = Request(0, "fit" if preset == "tiny" else "pga-step", config={"round": 0})
        per_epoch = -(-fed.sizes[0] // cfg.train.batch_size)
        assert workers[0].steps(fit) == (cfg.fl.local_epochs * per_epoch if preset == "tiny" else 0)
        assert workers[0].steps(Request(0, "describe")) == 0
