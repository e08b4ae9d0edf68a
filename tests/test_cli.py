"""Each CLI command end to end (typer's runner, in-process)."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedgen.cli import app
from fedgen.config import PRESETS

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, ["train", "--preset", "smoke", "--out", str(out), "--set", "fl.rounds=1"])
    assert result.exit_code == 0, result.output
    return out


def test_presets_lists_every_preset():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    for name in ("smoke", "fmnist-quick", "paper-cifar10-n50", "paper-ct"):
        assert name in result.output
    assert len(PRESETS) >= 30


def test_train_prints_config_and_device(trained):
    assert (trained / "samples" / "final.png").exists()
    again = runner.invoke(app, ["train", "--out", str(trained)])  # existing run: its own config, nothing to do
    assert again.exit_code == 0 and "nothing to train" in again.output


def test_sample_one_row_per_class(trained, tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", str(trained), "--n", "25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "30 samples (3 per class)" in result.output
    grid = np.asarray(Image.open(out))
    # 10 rows of 8px digits upscaled to 56 px, 2 px padding
    assert grid.shape[0] == 10 * (56 + 2) + 2


def test_sample_client_model_and_sigma(trained, tmp_path):
    trained_clients = sorted(p.stem for p in (trained / "clients").glob("*.safetensors"))
    cid = int(trained_clients[0].split("_")[1])
    result = runner.invoke(app, ["sample", str(trained), "--client", str(cid), "--n", "10", "--sigma", "beta",
                                 "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert f"client {cid}'s final local model" in result.output
    grid = np.asarray(Image.open(tmp_path / "c.png"))
    assert grid.shape[0] == 28 + 2 + 10 * (56 + 2) + 2  # palette strip above one row per class
    missing = ({0, 1, 2, 3} - {int(c.split("_")[1]) for c in trained_clients}) or {99}
    bad = runner.invoke(app, ["sample", str(trained), "--client", str(missing.pop()), "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 1 and "no local model for client" in bad.output


def test_partition_table_and_heatmap(tmp_path):
    out = tmp_path / "heat.png"
    result = runner.invoke(app, ["partition", "--dataset", "digits", "--clients", "5", "--beta", "0.5", "--seed", "0",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[0] == "client" and lines[0].split()[-1] == "total"
    assert sum(int(line.split()[-1]) for line in lines[1:6]) == 1437  # digits' training split (80%)
    assert out.stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["partition", "--dataset", "imagenet", "--out", "x.png"], "unknown dataset 'imagenet'"),
        (["partition", "--dataset", "digits", "--beta", "0", "--out", "x.png"], "beta must be > 0"),
        (["partition", "--dataset", "digits", "--clients", "100000", "--out", "x.png"], "more clients than samples"),
        (["train", "--preset", "nope", "--out", "r"], "unknown preset 'nope'"),
        (["train", "--preset", "smoke", "--set", "fl.bogus=1", "--out", "r"], "fl.bogus: unknown key"),
        (["train", "--preset", "smoke", "--set", "data.dataset=mnist", "--out", "r"], "FEDGEN_DATA"),
        (["sample", "not-a-run", "--out", "x.png"], "not a fedgen run directory"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGEN_DATA", str(tmp_path / "empty"))
    result = runner.invoke(app, ["partition", "--dataset", "fashion-mnist", "--out", str(tmp_path / "h.png")])
    assert result.exit_code == 1
    assert "apt-get install dataset-fashion-mnist" in " ".join(result.output.split())


def test_failed_start_leaves_no_run_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--preset", "smoke", "--set", "data.dataset=mnist", "--out", "r"])
    assert result.exit_code == 1
    assert not (tmp_path / "r" / "config.toml").exists()  # fixing the config and rerunning is not "a change"


def test_evaluate_prints_named_metrics_and_appends_them(trained, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["evaluate", str(trained), "--n", "100", "--sampler", "dpm-solver", "--steps", "5",
                                 "--tstr", "--tstr-samples", "200"])
    assert result.exit_code == 0, result.output
    assert "domain metrics only" in result.output  # no Inception weights given
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "evaluate" and record["model"] == "global" and record["generated"] == 100
    for key in ("fid_domain_train", "fid_domain_test", "kid_domain_test", "is_domain", "precision_domain_test",
                "recall_domain_test", "tstr_accuracy", "real_train_real_test_accuracy"):
        assert key in record and key in result.output
    assert not any("inception" in k for k in record if k.startswith(("fid", "is", "kid")))
    assert record["fid_domain_test"] > 0 and 0 <= record["tstr_accuracy"] <= 1
    assert record["real_train_real_test_accuracy"] > 0.8
    cid = int(sorted((trained / "clients").glob("*.safetensors"))[0].stem.split("_")[1])
    client = runner.invoke(app, ["evaluate", str(trained), "--client", str(cid), "--n", "50", "--steps", "3"])
    assert client.exit_code == 0, client.output
    assert json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])["model"] == f"client {cid}"
    bad = runner.invoke(app, ["evaluate", str(trained), "--inception-weights", str(tmp_path / "none.pth")])
    assert bad.exit_code == 1 and "not found" in bad.output
