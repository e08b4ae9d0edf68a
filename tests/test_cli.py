"""Each CLI command end to end (typer's runner, in-process)."""

import re
import tomllib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedgen import config as C
from fedgen.cli import app
from fedgen.config import PRESETS

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(out), "--set", "fl.rounds=1"])
    assert result.exit_code == 0, result.output
    return out


def test_presets_lists_every_preset():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    for name in ("tiny", "fmnist-quick", "paper-cifar10-n50", "paper-ct"):
        assert name in result.output
    assert len(PRESETS) >= 30


def test_a_preset_printed_as_toml_loads_as_that_preset(tmp_path):
    result = runner.invoke(app, ["presets", "dp-fmnist-quick"])
    assert result.exit_code == 0, result.output
    template = tmp_path / "my.toml"
    template.write_text(result.output)
    assert "fedgen train --preset dp-fmnist-quick --config my.toml" in result.output.splitlines()[0]
    expected = C.to_dict(C.load("dp-fmnist-quick"))
    assert C.to_dict(C.load("dp-fmnist-quick", config_path=template)) == expected  # as the hint says
    assert C.to_dict(C.load(config_path=template)) == expected
    assert tomllib.loads(template.read_text()) == expected  # every setting is written out, not only the preset's


def test_an_unknown_preset_is_one_error_line():
    result = runner.invoke(app, ["presets", "no-such-preset"])
    assert result.exit_code == 1
    assert result.output.startswith("error: unknown preset 'no-such-preset'")


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"fedgen {version('fedgen')}\n"


@pytest.fixture(scope="module")
def trained_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run2"
    result = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(out), "--set", "fl.rounds=1"])
    assert result.exit_code == 0, result.output
    return result.output


def test_train_prints_config_and_device(trained, trained_output):
    assert (trained / "samples" / "final.png").exists()
    text = " ".join(trained_output.split())
    assert "on cpu (" in text and "CPU threads" in text  # the device it trains on
    assert "config: preset tiny + --set fl.rounds=1" in text  # where the config came from
    # the resolved config is a file of the run, printed only with --verbose (one line says where it is)
    assert re.search(r"resolved config: \S+/run2/config\.toml", text)
    assert 'dataset = "digits"' not in trained_output and len(trained_output.splitlines()) < 15
    verbose = runner.invoke(app, ["train", "--out", str(trained), "--verbose"])
    assert verbose.exit_code == 0, verbose.output
    assert 'dataset = "digits"' in verbose.output and "rounds = 1" in verbose.output
    again = runner.invoke(app, ["train", "--out", str(trained)])  # existing run: its own config, nothing to do
    assert again.exit_code == 0 and "nothing to train" in again.output
    assert f"config: the config of {trained}" in " ".join(again.output.split())


def test_config_file_without_preset_builds_on_the_default_job(tmp_path, monkeypatch):
    from fedgen import config as C

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.toml").write_text("[fl]\nrounds = 3\n")
    seen = {}
    monkeypatch.setattr("fedgen.runtimes.local.train", lambda cfg, out, console: seen.setdefault("cfg", cfg))
    result = runner.invoke(app, ["train", "--config", "my.toml", "--out", "r"])
    assert result.exit_code == 0, result.output
    assert "config: preset fmnist-quick (the default job) + my.toml" in " ".join(result.output.split())
    expected = C.load("fmnist-quick", overrides=["fl.rounds=3"])
    assert seen["cfg"] == expected and seen["cfg"].train.batch_size == 32  # not the paper's 512


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only fedgen's own errors become one line; an unexpected exception is not disguised as bad input."""
    def broken(cfg, out, console):
        raise ValueError("an internal bug")

    monkeypatch.setattr("fedgen.runtimes.local.train", broken)
    result = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(tmp_path / "r")])
    assert isinstance(result.exception, ValueError) and "error:" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "RUN", "--steps", "0", "--out", "x.png"], "steps must be in [1, T=50], got 0"),
        (["sample", "RUN", "--steps", "51", "--out", "x.png"], "steps must be in [1, T=50], got 51"),
        (["sample", "RUN", "--sampler", "euler", "--out", "x.png"], "unknown sampler 'euler'"),
        (["sample", "RUN", "--sampler", "ddim", "--sigma", "beta", "--out", "x.png"], "sampler 'ddim' has none"),
        (["sample", "RUN", "--sigma", "big", "--out", "x.png"], "unknown sigma 'big'"),
        (["sample", "RUN", "--guidance", "2", "--out", "x.png"], "needs a model trained with train.label_dropout"),
        (["evaluate", "RUN", "--steps", "0"], "eval.steps: Input should be greater than or equal to 1"),
        (["evaluate", "RUN", "--steps", "60"], "steps must be in [1, T=50], got 60"),
        (["evaluate", "RUN", "--sampler", "euler"], "eval.sampler"),
        (["evaluate", "RUN", "--n", "3"], "--n must be at least 10 (FID and precision/recall need"),
        (["evaluate", "RUN", "--guidance", "3"], "needs a model trained with train.label_dropout"),
        (["evaluate", "RUN", "--client", "99"], "no local model for client 99"),
    ],
)
def test_sample_and_evaluate_validate_options_before_any_work(trained, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [str(trained) if a == "RUN" else a for a in args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "x.png").exists()
    assert not list((tmp_path / "cache").glob("*"))  # no classifier trained, no features computed


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
    assert f"client {cid}'s local model, last trained in round 1 of 1" in " ".join(result.output.split())
    grid = np.asarray(Image.open(tmp_path / "c.png"))
    assert grid.shape[0] == 28 + 2 + 10 * (56 + 2) + 2  # palette strip above one row per class
    missing = ({0, 1, 2, 3} - {int(c.split("_")[1]) for c in trained_clients}) or {99}
    bad = runner.invoke(app, ["sample", str(trained), "--client", str(missing.pop()), "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 1 and "no local model for client" in bad.output


def test_partition_of_a_run_draws_its_own_split(trained, tmp_path):
    import json

    result = runner.invoke(app, ["partition", str(trained), "--out", str(tmp_path / "run.png")])
    assert result.exit_code == 0, result.output
    counts = json.loads((trained / "partition.json").read_text())["counts"]
    rows = [line.split() for line in result.output.splitlines()[1:1 + len(counts)]]
    assert [[int(v) for v in row[1:-1]] for row in rows] == counts
    assert (tmp_path / "run.png").stat().st_size > 1000


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
        (["train", "--preset", "tiny", "--set", "fl.bogus=1", "--out", "r"], "fl.bogus: unknown key"),
        (["train", "--preset", "tiny", "--set", "data.dataset=mnist", "--out", "r"], "FEDGEN_DATA"),
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
    result = runner.invoke(app, ["train", "--preset", "tiny", "--set", "data.dataset=mnist", "--out", "r"])
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


# ------------------------------------------------------------------------ the first hour: one-line errors, outputs


def test_an_output_image_without_a_format_is_refused_before_sampling(trained, tmp_path, monkeypatch):
    monkeypatch.setattr("fedgen.report.grid.sample_grid", lambda *a, **k: pytest.fail("sampled before the check"))
    result = runner.invoke(app, ["sample", str(trained), "--out", str(tmp_path / "noext")])
    assert result.exit_code == 1
    assert result.output == (f"error: --out {tmp_path / 'noext'}: an image file name must end in .png, .jpg, "
                             ".jpeg (got no extension)\n")
    for args in (["partition", str(trained), "--out", "h.tiff"], ["compare", str(trained), "--out", "c.txt"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "an image file name must end in .png" in result.output, result.output


def test_sample_and_partition_write_inside_the_run_by_default(trained):
    result = runner.invoke(app, ["sample", str(trained), "--n", "10"])
    assert result.exit_code == 0, result.output
    assert (trained / "samples" / "sample.png").exists() and str(trained / "samples" / "sample.png") in result.output
    result = runner.invoke(app, ["partition", str(trained)])
    assert result.exit_code == 0 and (trained / "partition.png").exists()
    result = runner.invoke(app, ["partition", "--dataset", "digits"])
    assert result.exit_code == 1 and result.output.startswith("error: --out is needed without a run directory")


def test_compare_writes_its_plot_into_the_first_run(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compare", str(trained), str(trained)])
    assert result.exit_code == 0, result.output
    metric = "fid_domain_test" if "fid_domain_test" in (trained / "metrics.jsonl").read_text() else "global_test_loss"
    assert (trained / f"compare-{metric}.png").exists() and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(("command", "minimum", "why"), [
    ("sample", 1, "images to draw"),
    ("evaluate", 10, "FID and precision/recall need that many generated images"),
    ("audit", 20, "members, and as many non-members, for the attacks' ROC"),
])
def test_a_count_below_its_minimum_has_one_wording(trained, command, minimum, why):
    result = runner.invoke(app, [command, str(trained), "--n", "0"])
    assert result.exit_code == 1
    assert result.output == f"error: --n must be at least {minimum} ({why}), got 0\n"


def test_evaluate_on_a_folder_too_small_to_score_is_one_line(tmp_path, monkeypatch):
    """One class of 12 images trains; its ~3-image test split cannot be scored (k-NN precision/recall)."""
    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "a").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(tmp_path / "data" / "a" / f"{i}.png")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(run), "--set", "fl.rounds=1",
                                 "--set", "data.dataset=image-folder", "--set", f"data.path={tmp_path / 'data'}",
                                 "--set", "data.image_size=8", "--set", "data.channels=1", "--set", "fl.clients=1",
                                 "--set", "fl.clients_per_round=1", "--set", "data.partition=iid"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "test split has 3 images; evaluation needs at " \
        "least 10" in lines[0], result.output
    assert not list((tmp_path / "cache").glob("domain-*"))  # refused before the domain classifier was trained


def test_a_command_line_that_cannot_be_parsed_is_one_line(monkeypatch, capsys):
    from fedgen import cli

    for argv, message in ((["sample"], "error: Missing argument 'RUN'. (see fedgen sample --help)"),
                          (["sample", "r", "--n", "many"], "error: Invalid value for '--n'")):
        monkeypatch.setattr("sys.argv", ["fedgen", *argv])
        with pytest.raises(SystemExit) as stop:
            cli.main()
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_ctrl_c_during_training_says_how_to_resume(tmp_path, monkeypatch):
    def interrupted(cfg, out, console):
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"event": "round", "round": 1}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr("fedgen.runtimes.local.train", interrupted)
    run = tmp_path / "r"
    result = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(run)])
    assert result.exit_code == 130
    assert result.output.splitlines()[-1] == (f"error: interrupted: {run} keeps its last complete round (1 of 2); "
                                              "rerun the same command to resume from it")


def test_round_lines_name_an_unchanging_privacy_state_once(tmp_path):
    result = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    rounds = [line for line in result.output.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2
    assert "no formal guarantee" in rounds[0] and "no formal guarantee" not in rounds[1]
    assert result.output.count("no formal guarantee") == 2  # round 1, and the run's summary at the end
