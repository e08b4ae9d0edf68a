"""`fedgen report`: the HTML page of a run (smoke, pga-smoke, a DP run with an audit) and of a comparison, opened
in a real headless browser (Debian's chromium; skipped without it); what the records gained for it (timestamps, an
end record, every silo in the ledger, the audit's verdict, compare's names and missing runs); TensorBoard."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from fedgen import config as C
from fedgen.cli import app
from fedgen.federation.rundir import RunDir
from fedgen.runtimes.local import train

QUIET = Console(file=io.StringIO())
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not on PATH (apt-get install chromium): the "
                                                              "browser checks of the report are skipped")
FAST = ["--set", "train.cpu_threads=1"]
ONE_SILO_UNSAMPLED = ["train.cpu_threads=1", "privacy.mode=dp-sgd", "privacy.accountant=rdp",
                      "privacy.noise_multiplier=1.0", "fl.rounds=3"]  # rounds 1-3 sample silos 0, 1, 3: never 2


@pytest.fixture(autouse=True)
def _notes_said_once_stay_unsaid():
    """`fedgen evaluate` says some notes once per process (evaluation/evaluate.py `_said`): the evaluations here
    must not take them from the tests that read them."""
    from fedgen.evaluation import evaluate

    before = set(evaluate._said)
    yield
    evaluate._said.clear()
    evaluate._said.update(before)


def _cli(*args: str) -> str:
    done = CliRunner().invoke(app, list(args))
    assert done.exit_code == 0, done.output
    return " ".join(done.output.split())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A smoke run trained by the CLI, a pga-smoke run, a DP run with an audit: the three kinds of page."""
    root = tmp_path_factory.mktemp("report")
    out = {"smoke": root / "smoke", "pga": root / "pga-smoke", "dp": root / "dp"}
    out["train_output"] = _cli("train", "--preset", "smoke", "--out", str(out["smoke"]), *FAST)
    train(C.load("pga-smoke", overrides=["train.cpu_threads=1"]), out["pga"], QUIET)
    train(C.load("tiny", overrides=ONE_SILO_UNSAMPLED), out["dp"], QUIET)
    out["audit_output"] = _cli("audit", str(out["dp"]), "--n", "40", "--generated", "60", "--timesteps", "2")
    out["privacy_output"] = _cli("privacy", str(out["dp"]))
    return out


def browse(page: Path, shot: Path) -> tuple[str, str]:
    """Open `page` in headless chromium: its DOM after the load event and the browser's log (console messages are
    `CONSOLE` lines), and a screenshot at `shot`."""
    profile = shot.parent / f"chromium-{shot.stem}"
    common = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
              f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*common, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    snap = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,8000", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert snap.returncode == 0 and shot.stat().st_size > 0, snap.stderr[-2000:]
    return dom.stdout, dom.stderr + snap.stderr


def check_page(page: Path, shot: Path, sections: list[str]) -> str:
    """Opened in a browser: no console message, every image loaded (natural width > 0), the sections present."""
    dom, log = browse(page, shot)
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console
    source = page.read_text()
    images = source.count("<img ")
    assert images > 0 and "http://" not in source and "https://" not in source  # inline only, nothing fetched
    assert f'data-checked="{images}"' in dom  # the page's own script ran after every image was in
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == images and min(widths) > 0, widths
    assert re.search(r'<pre id="report-errors" hidden="">\s*</pre>', dom)
    for section in sections:
        assert f'<section id="{section}">' in dom, section
    return dom


ONE_RUN = ["glance", "trained", "data", "training", "samples", "privacy"]


@needs_chromium
def test_the_report_of_a_smoke_run_in_a_browser(runs, tmp_path):
    page = runs["smoke"] / "report.html"  # written by `fedgen train` itself
    assert f"report: {page}" in runs["train_output"]
    assert re.search(r": 12 of 12 rounds in [\d.]+ s; test loss [\d.]+; report: ", runs["train_output"])
    dom = check_page(page, tmp_path / "smoke.png", ONE_RUN)
    rounds = RunDir(runs["smoke"]).round_records()
    assert "12 of 12 rounds" in dom and f"test loss {rounds[-1]['global_test_loss']:.4g}" in dom
    assert "train.cpu_threads" in dom.split("what differs from the preset smoke")[1].split("</table>")[0]
    sampled = sum(0 in r["clients"] for r in rounds)
    assert f"<td>0</td><td>532</td><td>{sampled} of 12</td>" in dom  # silo 0: its images, its rounds
    assert "round_0012.png: the last round" in dom and "No formal guarantee" in dom


@needs_chromium
def test_the_report_of_a_pga_run_in_a_browser(runs, tmp_path):
    done = _cli("report", str(runs["pga"]))
    page = runs["pga"] / "report.html"
    assert f"report: {page}" in done
    dom = check_page(page, tmp_path / "pga.png", ONE_RUN)
    for plot in ("each party's discriminator loss d_i", "each party's generator loss g_i", "PGA's rho",
                 "PGA's representatives"):
        assert f'alt="{plot}"' in dom
    assert "PGA's loss noise is a heuristic" in dom


@needs_chromium
def test_the_report_of_a_dp_run_with_an_audit_in_a_browser(runs, tmp_path):
    page = runs["dp"] / "report.html"  # rewritten by `fedgen audit` and `fedgen privacy`
    assert f"report: {page}" in runs["audit_output"] and f"report: {page}" in runs["privacy_output"]
    dom = check_page(page, tmp_path / "dp.png", ONE_RUN)
    audit = [r for r in RunDir(runs["dp"]).read_metrics() if r["event"] == "audit"][-1]
    ledger = RunDir(runs["dp"]).round_records()[-1]["privacy"]
    assert f"record-level ε={ledger['epsilon']:.3g} (δ=1e-05)" in dom
    assert "<td>silo 2</td><td>0</td><td>1e-05</td><td>-</td><td>-</td><td>0</td><td>- (never sampled)</td>" in dom
    assert 'alt="ROC curves of the membership attacks"' in dom and 'alt="epsilon against rounds"' in dom
    assert 'alt="nearest pairs: generated images above their nearest training images"' in dom
    lo, hi = audit["mia_distance_auc_ci"]
    assert f"<td>{audit['mia_distance_auc']:.3f}</td><td>{lo:.3f}-{hi:.3f}</td>" in dom
    assert "verdict: " in dom and "What it is not:" in dom
    assert 'alt="global_client_loss_mean against rounds"' not in dom  # NaN under DP: no empty plot


@needs_chromium
def test_a_comparison_of_three_runs_in_a_browser(runs, tmp_path):
    _cli("evaluate", str(runs["smoke"]), "--n", "50")
    a, b = tmp_path / "avg", tmp_path / "adam"
    train(C.load("tiny", overrides=["train.cpu_threads=1", "fl.rounds=2"]), a, QUIET)
    train(C.load("tiny", overrides=["train.cpu_threads=1", "fl.rounds=2", "fl.strategy=fedadam"]), b, QUIET)
    page = tmp_path / "compare.html"
    done = _cli("report", str(runs["smoke"]), str(a), str(b), "--out", str(page))
    assert f"report: {page}" in done
    dom = check_page(page, tmp_path / "compare.png", ["compare", "run1", "run2", "run3"])
    table = dom.split("fid_domain_test, min is better")[1].split("</table>")[0]
    assert table.count("<tr>") == 4  # a header and the three runs, each labelled by what differs
    assert "strategy=fedadam" in table and "strategy=fedavg" in table
    for run in ("avg", "adam"):  # not evaluated: said, with the command that evaluates it
        assert f"{run} has no fid_domain_test and is not plotted: run `fedgen evaluate {tmp_path / run}`" in dom
    assert dom.count('alt="final samples of') == 3


def test_a_truncated_metrics_file_still_gives_a_report_that_says_what_is_missing(runs, tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(runs["smoke"], run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    kept = lines[:6] + [lines[6][:40]]  # start, five rounds, and half of the sixth round's line
    (run / "metrics.jsonl").write_text("\n".join(kept))
    done = _cli("report", str(run))
    assert f"report: {run / 'report.html'}" in done
    page = (run / "report.html").read_text()
    assert "metrics.jsonl line 7 is not a complete JSON record (the file was cut short" in page
    assert "5 of the 12 planned rounds are recorded" in page and "metrics.jsonl has no end record" in page
    assert "5 of 12 rounds" in page


def test_report_refuses_what_is_not_a_run_in_one_line(tmp_path):
    for path, said in ((tmp_path / "missing", "does not exist"),
                       (tmp_path, "is not a fedgen run directory (no config.toml)")):
        done = CliRunner().invoke(app, ["report", str(path)])
        assert done.exit_code == 1 and done.output.strip().splitlines() == [done.output.strip()]
        assert said in done.output and "Traceback" not in done.output
    C.save(C.load("tiny"), tmp_path / "config.toml")
    done = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert done.exit_code == 1 and "has no metrics yet" in done.output


def test_every_record_has_its_time_and_training_ends_with_an_end_record(tmp_path):
    out = tmp_path / "run"
    train(C.load("tiny", overrides=["train.cpu_threads=1", "fl.rounds=1"]), out, QUIET)
    train(C.load("tiny", overrides=["train.cpu_threads=1", "fl.rounds=2"]), out, QUIET)  # extended
    records = RunDir(out).read_metrics()
    assert [r["event"] for r in records] == ["start", "round", "end", "resume", "round", "end"]
    stamps = [datetime.fromisoformat(r["time"].replace("Z", "+00:00")) for r in records]
    assert all(r["time"].endswith("Z") for r in records) and stamps == sorted(stamps)
    ends = [r for r in records if r["event"] == "end"]
    assert [(e["round"], e["rounds_trained"]) for e in ends] == [(1, 1), (2, 1)]
    assert all(e["wall_s"] > 0 for e in ends) and ends[-1]["privacy"].startswith("privacy none")


def test_the_audit_says_its_verdict_in_words_and_labels_its_nearest_pairs(runs):
    from fedgen.evaluation.audit import verdict

    out = runs["audit_output"]
    audit = [r for r in RunDir(runs["dp"]).read_metrics() if r["event"] == "audit"][-1]
    first = verdict(audit)[0]
    assert f"verdict: {first}" in out
    assert len(audit["mia_distance_roc"]["fpr"]) == len(audit["mia_distance_roc"]["tpr"]) >= 2
    assert "mia_distance_roc" not in out  # the curve is for the report, not the terminal table
    leak = {"mia_distance_auc": 0.71, "mia_distance_auc_ci": [0.62, 0.80], "mia_distance_tpr_at_1pct_fpr": 0.1,
            "mia_distance_respects_dp_bound": False, "mia_distance_epsilon_lower_bound_95": 2.5, "dp_epsilon": 1.0,
            "generated": 100, "memorisation_near_copies": 1, "memorisation_copy_ratio": 1 / 3,
            "memorisation_neighbours": 50, "memorisation_ratio_median": 0.8}
    assert verdict(leak) == [
        "FAIL: nearest-sample distance membership attack (black-box) exceeded the DP guarantee (an audit can show "
        "leakage, never prove its absence)",
        "nearest-sample distance membership attack (black-box): AUC 0.710 (95% interval 0.620-0.800), tells members "
        "from non-members better than chance; it proves ε ≥ 2.5 with 95% confidence, MORE than the ledger's ε = 1: "
        "the guarantee does not hold as implemented",
        "memorisation: 1 of 100 generated images is a near copy of a training image (distance to the nearest below "
        "0.33 of the mean to the 50 nearest); median ratio 0.80 (1 = no closer to one image than to the others)"]
    leak["mia_distance_respects_dp_bound"] = True
    assert verdict(leak)[0].startswith("LEAKAGE MEASURED: nearest-sample distance membership attack (black-box); "
                                       "near copies of training images")
    pairs = np.asarray(Image.open(audit["memorisation_png"]).convert("L"))
    tile = 56  # 8-pixel digits scaled 7x
    assert pairs.shape == (2 * (tile + 2) + 26 + 2, 120 + 16 * (tile + 2) + 2)
    assert (pairs[:tile + 2, :110] < 128).any()  # the first row's label: generated
    assert (pairs[tile + 2:2 * (tile + 2), :110] < 128).any()  # the second's: training image, its nearest
    assert (pairs[2 * (tile + 2):, 120:] < 128).any()  # each pair's distance and ratio under it


def test_the_ledger_shows_every_silo_the_never_sampled_at_zero(runs):
    out = runs["privacy_output"]
    assert re.search(r"silo 2 │ 0 │ 1e-05 │ - │ - │ 0 │ - \(never sampled\)", out), out
    assert re.search(r"silo 3 │ [\d.]+ │ 1e-05 │ 1 │", out)


def test_compare_names_runs_in_its_legend_and_says_which_it_left_out(runs, tmp_path):
    from fedgen.runs.compare import compare, figure

    a = tmp_path / "alpha"
    train(C.load("tiny", overrides=["train.cpu_threads=1", "fl.rounds=1"]), a, QUIET)
    if not any(r["event"] == "evaluate" for r in RunDir(runs["smoke"]).read_metrics()):
        _cli("evaluate", str(runs["smoke"]), "--n", "50")
    series, _, used = compare([runs["smoke"], a], "fid_domain_test")
    fig = figure(series, used)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [f"smoke: {series[0].label}"] and series[0].label != "smoke"
    assert "not plotted (no fid_domain_test): alpha" in [t.get_text() for t in fig.texts]
    done = _cli("compare", str(runs["smoke"]), str(a), "--out", str(tmp_path / "c.png"))
    assert f"note: alpha has no fid_domain_test and is not plotted: run `fedgen evaluate {a}`" in done


def test_tensorboard_holds_the_logged_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(C.load("tiny", overrides=["train.cpu_threads=1", "fl.rounds=2", "log.tensorboard=true",
                                    "log.sample_every=1"]), out, QUIET)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    rounds = RunDir(out).round_records()
    logged = events.Scalars("round/global_test_loss")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([r["global_test_loss"] for r in rounds], rel=1e-6)
    for silo, loss in rounds[-1]["global_client_loss"].items():
        assert events.Scalars(f"round/global_client_loss/silo_{silo}")[-1].value == pytest.approx(loss, rel=1e-6)
    assert [e.value for e in events.Scalars("round/bytes_up")] == [float(r["bytes_up"]) for r in rounds]
    assert [e.step for e in events.Images("samples")] == [1, 2]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "end"


def test_tstr_training_reports_its_epochs_as_progress():
    import torch

    from fedgen.evaluation.tstr import tstr_accuracy

    class Recording:  # the part of a Progress that fedgen calls
        def __init__(self):
            self.tasks, self.done = {}, {}

        def add_task(self, description, total):
            self.tasks[len(self.tasks)] = (description, total)
            self.done[len(self.done)] = 0
            return len(self.tasks) - 1

        def advance(self, task_id, k=1):
            self.done[task_id] += k

        def remove_task(self, task_id):
            pass

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=gen) * 2 - 1, torch.arange(64) % 4
    progress = Recording()
    tstr_accuracy(x, y, x[:16], y[:16], 4, epochs=3, progress=progress)
    assert progress.tasks == {0: ("TSTR classifier: epochs", 3)} and progress.done == {0: 3}


def test_plots_of_a_thousand_silos_lay_out_without_warnings():
    """A run of 1,000 virtual silos: its per-silo plots (a line each, the partition heatmap) drop the legend and the
    row labels that could not fit, so matplotlib lays them out without its tight-layout warning."""
    import warnings

    from fedgen.report.figures import heatmap, lines

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines({str(i): ([1, 2, 3], [0.5, 0.4, 0.3 + i / 1e4]) for i in range(1000)}, "round", "loss", "each silo")
        heatmap([[1, 2, 3]] * 1000, [str(i) for i in range(1000)], ["a", "b", "c"], "split")
