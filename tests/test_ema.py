"""The EMA of the global weights: its definition, bit-exact resume, and which weights sample/evaluate use."""

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedgen import config as C
from fedgen.cli import app
from fedgen.runtimes.local import train

QUIET = Console(file=io.StringIO())
BASE = ["train.cpu_threads=1", "fl.rounds=3", "log.keep_checkpoints=5", "train.ema_decay=0.2"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    train(C.load("tiny", overrides=BASE), out, QUIET)
    return out


def test_ema_follows_its_definition(ema_run):
    """e_1 = theta_1; e_n = e_{n-1} - (1 - d_n)(e_{n-1} - theta_n), d_n = min(decay, n / (9 + n))."""
    thetas = [load_file(ema_run / "checkpoints" / f"round_{r:04d}" / "global.safetensors") for r in (1, 2, 3)]
    expected = {k: v.clone() for k, v in thetas[0].items()}
    for n, theta in enumerate(thetas[1:], start=2):
        d = min(0.2, n / (9 + n))
        assert d == 0.2 if n == 3 else d == 2 / 11  # the cap is reached at n = 3 with decay 0.2
        for k in expected:
            expected[k] = expected[k] - (1 - d) * (expected[k] - theta[k])
    ema = load_file(ema_run / "checkpoints" / "round_0003" / "ema.safetensors")
    assert ema.keys() == expected.keys()
    for k in ema:
        torch.testing.assert_close(ema[k], expected[k], rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(ema[k], thetas[2][k]) for k in ema)


def test_ema_resumes_bit_exactly(ema_run, tmp_path):
    out = tmp_path / "ext"
    train(C.load("tiny", overrides=[*BASE, "fl.rounds=2"]), out, QUIET)
    train(C.load("tiny", overrides=BASE), out, QUIET)
    a, b = (load_file(d / "checkpoints" / "round_0003" / "ema.safetensors") for d in (ema_run, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_and_evaluate_use_the_ema_unless_raw(ema_run, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    done = runner.invoke(app, ["sample", str(ema_run), "--n", "10", "--steps", "5", "--out", str(tmp_path / "a.png")])
    assert done.exit_code == 0 and "global model (EMA weights) after round 3" in " ".join(done.output.split())
    done = runner.invoke(app, ["sample", str(ema_run), "--raw", "--n", "10", "--steps", "5",
                               "--out", str(tmp_path / "b.png")])
    assert done.exit_code == 0 and "global model (raw weights) after round 3" in " ".join(done.output.split())
    for flag, weights in (([], "ema"), (["--raw"], "raw")):
        done = runner.invoke(app, ["evaluate", str(ema_run), "--n", "20", "--steps", "3", *flag])
        assert done.exit_code == 0, done.output
        record = json.loads((ema_run / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["weights"] == weights


def test_ema_off_keeps_no_average(tmp_path):
    out = tmp_path / "off"
    train(C.load("tiny", overrides=["train.cpu_threads=1", "fl.rounds=1", "train.ema_decay=0"]), out, QUIET)
    assert not (out / "checkpoints" / "round_0001" / "ema.safetensors").exists()
