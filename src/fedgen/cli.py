"""The `fedgen` command: parsing and dispatch only; the work is in runtimes/ (train) and runs/ (sample, evaluate,
audit, compare).

Each subcommand imports what it runs inside its own body: torch, diffusers and Flower take seconds to import, and
`fedgen --help`, `fedgen presets` or a mistyped option must not wait for them."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape

from fedgen import config as config_mod
from fedgen.core.errors import FedgenError, UsageError
from fedgen.core.paths import image_output
from fedgen.core.progress import progress_bar

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated training of generative image models across data silos.")


def _console(stderr: bool = False) -> Console:
    """On a terminal, its own width; anywhere else (a pipe, a log file, CI) no wrapping at all, so an error or a
    config line stays one line for grep and for pasting, and tables keep every column. Colour only on a terminal
    (rich's default)."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, width=None if tty else 10_000, soft_wrap=not tty)


console = _console()
err = _console(stderr=True)


def _error_line(message: str) -> None:
    err.print("[bold red]error:[/] " + escape(message), highlight=False)


def _fail(message: str, code: int = 1) -> None:
    _error_line(message)
    raise typer.Exit(code)


@contextmanager
def _user_errors(interrupted: str | Callable[[], str] = "interrupted; nothing was written"):
    """fedgen's own errors (bad input, a state the user can fix) become one line and exit 1 (or the error's own
    exit_code); Ctrl-C says what it left behind (exit 130); anything else is a bug and keeps its traceback."""
    try:
        yield
    except FedgenError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail(interrupted() if callable(interrupted) else interrupted, 130)


def _interrupted_training(out: Path, rounds: int) -> str:
    from fedgen.federation.rundir import RunDir

    done = len(RunDir(out).round_records()) if (out / "metrics.jsonl").exists() else 0
    return (f"interrupted: {out} keeps its last complete round ({done} of {rounds}); rerun the same command to "
            "resume from it")


def _at_least(option: str, value: int, minimum: int, why: str) -> None:
    """The one wording of a count option that is too small, for every command."""
    if value < minimum:
        raise UsageError(f"{option} must be at least {minimum} ({why}), got {value}")


def _refresh_report(run: Path) -> Path | None:
    """Rewrite RUN/report.html after a command that added to the run; a report that cannot be written is a
    warning, never the command's failure (its work is done and recorded)."""
    from fedgen.runs.report import write_report

    try:
        path, _ = write_report([run])
    except FedgenError as exc:
        console.print(f"[yellow]warning:[/] {run / 'report.html'} not updated: {escape(str(exc))}", highlight=False)
        return None
    except Exception as exc:  # noqa: BLE001 - the command's own work is done; say what failed and go on
        console.print(f"[yellow]warning:[/] {run / 'report.html'} not updated ({type(exc).__name__}: "
                      f"{escape(str(exc))}); `fedgen report {run}` shows the traceback", highlight=False)
        return None
    return path


def _train_summary(out: Path, report: Path | None) -> str:
    """The one line `fedgen train` ends with: rounds, wall time, the last test loss, privacy, and the report."""
    from fedgen.runs.report import read_run, summary_line

    line = summary_line(read_run(out), with_privacy=False)  # training's last line has just said it
    return f"{line}; report: {report} (open it in a browser)" if report else line


# the options `sample` and `evaluate` share
GuidanceOption = Annotated[float | None, typer.Option(help="classifier-free guidance scale (label-dropout models)")]
RawOption = Annotated[bool, typer.Option("--raw", help="the plain global weights, not their EMA")]
Fp32Option = Annotated[bool, typer.Option("--fp32", help="float32 network, whatever eval.bf16 says")]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fedgen {version('fedgen')}")
        raise typer.Exit()


@app.callback()
def _main(show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                     help="print fedgen's version and exit")] = False) -> None:
    pass  # the app's own help text stays its description


@app.command()
def presets(name: Annotated[str | None, typer.Argument(help="print this preset as TOML (a config template)")]
            = None) -> None:
    """List the presets with a one-line description, or print one as TOML to start a config file from."""
    if name is not None:
        with _user_errors():
            cfg = config_mod.load(name)
        # every setting, resolved, so the template shows what can be changed. A bare --config builds on the default
        # preset (whose other algorithm's settings would be refused), hence --preset in the hint.
        # Plain echo, not rich: TOML's [tables] would be read as markup.
        typer.echo(f"# preset {name}, every setting; edit, then: fedgen train --preset {name} --config my.toml\n"
                   f"{config_mod.to_toml(cfg)}", nl=False)
        return
    from fedgen.report.tables import folding_table

    table = folding_table("preset", "description")
    for name, raw in config_mod.PRESETS.items():
        table.add_row(name, raw.get("description", ""))
    console.print(table)


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory (resumed if it exists)")],
    preset: Annotated[str | None, typer.Option(help="start from this preset (see `fedgen presets`)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set fl.rounds=20")] = None,
    centralized: Annotated[bool, typer.Option("--centralized", help="centralized baseline")] = False,
    runtime: Annotated[str, typer.Option(help="local (in-process) | flower-sim (Flower's simulation engine) | "
                                              "flower (a SuperLink and SuperNodes)")] = "local",
    superlink: Annotated[str | None, typer.Option(help="--runtime flower: the SuperLink, HOST:PORT")] = None,
    certs: Annotated[Path | None, typer.Option(help="--runtime flower: the folder of `fedgen flower certs` "
                                                    "(its ca.crt)")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="--runtime flower: plaintext, no TLS")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also print the resolved config (it is always "
                                                                  "written to OUT/config.toml)")] = False,
) -> None:
    """Train a federated (or centralized) class-conditional diffusion model; resumes an existing run.

    The config is the preset (default: the default job, fmnist-quick), then --config, then --set; on an existing run
    directory with neither --preset nor --config, the run's own config.
    """
    from fedgen.federation.rundir import RunDir
    from fedgen.runtimes.local import train as run_training

    overrides = list(set_ or [])
    if centralized:
        overrides.append("fl.centralized=true")
    with _user_errors():
        if preset is None and config is None and RunDir(out).exists():
            cfg = config_mod.validate(config_mod.apply_overrides(config_mod.to_dict(RunDir(out).config()),
                                                                 overrides))
            origin = f"the config of {out}"
        else:
            keys = {o.split("=", 1)[0].strip() for o in overrides}
            budget_only = preset is None and config is None and "privacy.mode" not in keys and \
                bool(keys & {"privacy.target_epsilon", "privacy.noise_multiplier"})
            # a privacy budget and nothing else: the measured DP recipe, not the (non-private) default job
            base = preset or (config_mod.DP_RECIPE if budget_only else config_mod.DEFAULT_PRESET)
            notes: list[str] = []
            cfg = config_mod.load(base, config, overrides, notes)
            origin = f"preset {base}" + ("" if preset else " (the DP recipe: a privacy budget without a preset)"
                                         if budget_only else " (the default job)") + (f" + {config}" if config else "")
            for note in notes:
                console.print(f"note: {note}", highlight=False)
        if overrides:
            origin += " + " + " ".join(f"--set {o}" for o in overrides)
        console.print(f"config: {origin}", highlight=False)
        if verbose:
            typer.echo(f"resolved config:\n{config_mod.to_toml(cfg)}", nl=False)  # echo: TOML's [tables] are not markup
    with _user_errors(lambda: _interrupted_training(out, cfg.fl.rounds)):
        if runtime == "local":
            run_training(cfg, out, console)
        elif runtime == "flower-sim":
            from fedgen.runtimes.flower.simulation import train_simulation

            train_simulation(cfg, out, console)
        elif runtime == "flower":
            from fedgen.runtimes.flower.deploy.submit import submit

            if superlink is None or (certs is None and not insecure):
                raise UsageError("--runtime flower needs --superlink HOST:PORT and --certs DIR (or --insecure)")
            submit(cfg, out, superlink, None if insecure else certs,
                   echo=lambda line: console.print(line, highlight=False, markup=False))
        else:
            raise UsageError(f"unknown runtime {runtime!r}; expected local, flower-sim or flower")
    if (out / "metrics.jsonl").exists():  # --runtime flower writes the run where the SuperLink runs
        report = _refresh_report(out)
        with _user_errors():
            console.print(_train_summary(out, report), highlight=False)


@app.command()
def partition(
    run: Annotated[Path | None, typer.Argument(help="a run directory: draw the split it trains on")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="heatmap image (default with RUN: "
                                                                 "RUN/partition.png)")] = None,
    dataset: Annotated[str, typer.Option(help="dataset name")] = "fashion-mnist",
    clients: Annotated[int, typer.Option(help="number of clients N")] = 10,
    beta: Annotated[float, typer.Option(help="Dirichlet concentration")] = 0.5,
    seed: Annotated[int, typer.Option()] = 0,
    iid: Annotated[bool, typer.Option("--iid", help="IID split instead of Dirichlet")] = False,
    path: Annotated[str | None, typer.Option(help="dataset location")] = None,
) -> None:
    """Print the client x class count table of a split and write its heatmap (the paper's Fig. 3).

    With RUN, the split that run trains on (its partition.json); otherwise a new split of a whole dataset.
    """
    from fedgen.data.partition import format_table, partition_labels, plot_heatmap
    from fedgen.data.sources import DATASETS, DatasetError, load_dataset

    with _user_errors():
        if out is None and run is None:
            raise UsageError("--out is needed without a run directory: where to write the heatmap, e.g. "
                             "--out split.png")
        out = image_output(out or run / "partition.png")
        if run is not None:
            from fedgen.federation.rundir import RunDir

            part, classes = RunDir(run).partition()
        else:
            if dataset not in DATASETS:
                raise DatasetError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
            ds = load_dataset(dataset, path, seed=seed)
            part = partition_labels(ds.train.labels, clients, method="iid" if iid else "dirichlet", beta=beta,
                                    seed=seed, num_classes=ds.num_classes)
            classes = ds.classes
    console.print(format_table(part, classes), highlight=False)
    plot_heatmap(part, classes, out)
    console.print(f"heatmap: {out}")


@app.command()
def sample(
    run: Annotated[Path, typer.Argument(help="run directory")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="grid image (default: RUN/samples/sample.png, "
                                                                 "or sample-client-N.png)")] = None,
    n: Annotated[int, typer.Option(help="number of images (rounded up to a full row per class)")] = 64,
    client: Annotated[int | None, typer.Option(help="sample client N's own final local model")] = None,
    sampler: Annotated[str, typer.Option(help="ddpm (eq. 3) | ddim | dpm-solver | dpm-solver-3 | dpm-solver-sde | "
                                              "unipc (diffusion runs)")] = "ddpm",
    steps: Annotated[int | None, typer.Option(help="network evaluations (default: T for ddpm, 50 otherwise)")] = None,
    sigma: Annotated[str | None, typer.Option(help="ddpm variance: beta | beta-tilde (default: the config's)")] = None,
    guidance: GuidanceOption = None,
    raw: RawOption = False,
    fp32: Fp32Option = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Sample a grid with one row per class from the global (or a client's) model."""
    from fedgen.report.grid import sample_grid
    from fedgen.runs.load import load_run_model

    with _user_errors():
        _at_least("--n", n, 1, "images to draw")
        out = image_output(out or run / "samples" / ("sample.png" if client is None else f"sample-client-{client}.png"))
        loaded = load_run_model(run, client=client, raw=raw)
        labelled = loaded.sampler(sampler, steps, sigma, guidance, False if fp32 else None)  # checks the options
        per_class = math.ceil(n / len(loaded.classes))
        with progress_bar(console) as progress:
            sample_grid(labelled, loaded.classes, per_class, out, seed=seed, with_palette=client is not None,
                        progress=progress)
    console.print(f"{per_class * len(loaded.classes)} samples ({per_class} per class) from {loaded.source}: {out}")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="run directory")],
    client: Annotated[int | None, typer.Option(help="evaluate client N's personalised model")] = None,
    n: Annotated[int | None, typer.Option("--n", help="generated images (default: the config's, else test size)")]
    = None,
    sampler: Annotated[str | None, typer.Option(help="ddpm | ddim | dpm-solver | dpm-solver-3 | dpm-solver-sde | "
                                                     "unipc (default: the config's)")] = None,
    steps: Annotated[int | None, typer.Option(help="network evaluations per image")] = None,
    tstr: Annotated[bool, typer.Option("--tstr", help="also train on synthetic, test on real")] = False,
    tstr_samples: Annotated[int | None, typer.Option(help="synthetic training images (default: train size)")]
    = None,
    baselines: Annotated[bool, typer.Option(help="with --tstr: also each silo's CNN on its own real data (the "
                                                 "PGA paper's local column; costs as much as TSTR)")] = True,
    inception_weights: Annotated[Path | None, typer.Option(help="local FID Inception weights (.pth)")] = None,
    guidance: GuidanceOption = None,
    raw: RawOption = False,
    fp32: Fp32Option = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """FID/KID/IS/precision-recall (domain, and Inception with local weights) and TSTR; appends to metrics.jsonl."""
    from fedgen.report.tables import record_table, tstr_table
    from fedgen.runs.evaluate import evaluate_run

    with _user_errors(), progress_bar(console) as progress:
        if n is not None:
            _at_least("--n", n, 10, "FID and precision/recall need that many generated images")
        record, loaded = evaluate_run(run, client=client, raw=raw, n=n, sampler=sampler, steps=steps, tstr=tstr,
                                      tstr_samples=tstr_samples, inception_weights=inception_weights,
                                      guidance=guidance, fp32=fp32, seed=seed, baselines=baselines,
                                      progress=progress,
                                      log=lambda m: console.print(m, highlight=False))
    console.print(record_table(record, loaded.source))
    if "tstr_minus_local_mean" in record:  # the PGA paper's Tables 1-2
        console.print(tstr_table(record))
    if (report := _refresh_report(run)) is not None:
        console.print(f"report: {report}", highlight=False)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="run directories")],
    metric: Annotated[str | None, typer.Option(help="a key of the runs' round or evaluate records, e.g. "
                                                    "fid_domain_test, global_test_loss (default: fid_domain_test, "
                                                    "else global_test_loss where no run was evaluated)")] = None,
    x: Annotated[str, typer.Option("--x", help="plot against compute (image passes) or rounds")] = "compute",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="plot image (default: compare-METRIC.png in "
                                                                 "the first run's directory)")] = None,
) -> None:
    """One metric across runs: a table labelled with what differs between their configs, and a PNG plot."""
    from fedgen.runs import compare as cmp

    with _user_errors():
        if x not in ("compute", "rounds"):
            raise UsageError(f"--x must be compute or rounds, got {x!r}")
        if out is not None:
            image_output(out)
        series, budget, used = cmp.compare(runs, metric)
        path = out or runs[0] / f"compare-{used}.png"
        cmp.plot(series, used, path, x)
    console.print(cmp.table(series, budget, used, fell_back=metric is None and used != cmp.DEFAULT_METRICS[0]))
    for line in cmp.missing(series, used):
        console.print(f"note: {line}", highlight=False)
    console.print(f"plot: {path}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories (several: a comparison)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="the HTML file (default: RUN/report.html, the "
                                                                 "first run's)")] = None,
) -> None:
    """One self-contained HTML page of what fedgen knows about a run (or a comparison of several): config, data,
    training curves, samples, the privacy ledger and audits. Opens offline; printable."""
    from fedgen.runs.report import write_report

    with _user_errors():
        if out is not None and out.suffix.lower() not in (".html", ".htm"):
            raise UsageError(f"--out {out}: the report is an HTML page; name it .html")
        path, seconds = write_report(runs, out)
    size = path.stat().st_size
    console.print(f"report: {path} ({size / 1e6:.2f} MB, {seconds:.1f}s)", highlight=False)


@app.command()
def privacy(run: Annotated[Path, typer.Argument(help="run directory")]) -> None:
    """The run's privacy ledger: epsilon per silo and for the run, delta, accountant and every input."""
    from fedgen.federation.rundir import RunDir
    from fedgen.report.tables import ledger_lines, ledger_table

    with _user_errors():
        rundir = RunDir(run)
        cfg = rundir.config()
        rounds = rundir.round_records()
        twice = rundir.duplicate_rounds()
    if not rounds:
        _fail(f"{run} has no completed round yet")
    entry = rounds[-1].get("privacy")
    console.print(f"{run}: {len(rounds)} rounds, privacy.mode={cfg.privacy.mode}")
    if twice:
        console.print(f"[yellow]note:[/] metrics.jsonl records rounds {twice} twice (two writers, before run "
                      "directories were locked); each is read once, the later record", highlight=False)
    if not isinstance(entry, dict):
        console.print(f"privacy: {entry}", highlight=False)
    else:
        start = next((r for r in rundir.read_metrics() if r.get("event") == "start"), {})
        console.print(ledger_table(entry, len(start.get("client_sizes") or [])))
        for line in ledger_lines(entry):
            console.print(line, highlight=False)
    if (report := _refresh_report(run)) is not None:
        console.print(f"report: {report}", highlight=False)


@app.command()
def audit(
    run: Annotated[Path, typer.Argument(help="run directory")],
    n: Annotated[int, typer.Option("--n", help="members and as many non-members")] = 1000,
    generated: Annotated[int, typer.Option(help="generated images (distance attack, memorisation)")] = 2000,
    silo: Annotated[int | None, typer.Option(help="members from this silo only (default: all silos)")] = None,
    timesteps: Annotated[int, typer.Option(help="loss attack: timesteps scanned")] = 8,
    draws: Annotated[int, typer.Option(help="loss attack: noise draws per timestep")] = 2,
    copy_ratio: Annotated[float, typer.Option(help="near-copy: nearest / mean of 50 nearest below this")] = 1 / 3,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Membership inference (loss threshold, nearest-sample distance), memorisation, and the DP bound check."""
    from fedgen.federation.rundir import RunDir
    from fedgen.report.tables import record_table
    from fedgen.runs.audit import audit_run
    from fedgen.runs.load import load_run_model

    with _user_errors():
        _at_least("--n", n, 20, "members, and as many non-members, for the attacks' ROC")
        _at_least("--generated", generated, 10, "images for the distance attack and memorisation")
        _at_least("--timesteps", timesteps, 1, "timesteps the loss attack scans")
        _at_least("--draws", draws, 1, "noise draws per timestep")
        loaded = load_run_model(run)
        with progress_bar(console) as progress:
            record = audit_run(run, loaded, n=n, generated=generated, silo=silo, seed=seed, timesteps=timesteps,
                               draws=draws, copy_ratio=copy_ratio, progress=progress,
                               log=lambda m: console.print(m, highlight=False))
    record = {"event": "audit", "round": loaded.round, "model": "global", **record}
    RunDir(run).log(record)
    console.print(record_table(record, f"privacy audit of {loaded.source}", compact=True))
    from fedgen.evaluation.audit import verdict

    for i, line in enumerate(verdict(record)):
        console.print(("verdict: " if i == 0 else "  ") + line, highlight=False, markup=False)
    console.print(f"nearest pairs: {record['memorisation_png']}", highlight=False)
    if (report := _refresh_report(run)) is not None:
        console.print(f"report: {report}", highlight=False)


flower = typer.Typer(no_args_is_help=True, help="Deploy on Flower: certificates, a SuperLink, one SuperNode per silo.")
app.add_typer(flower, name="flower")


@flower.command("certs")
def flower_certs(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the CA, the SuperLink's certificate and keys")],
    nodes: Annotated[int, typer.Option(help="number of SuperNode key pairs (node-1 .. node-N)")] = 2,
    host: Annotated[list[str] | None, typer.Option(help="a name or IP nodes dial the SuperLink by (repeatable; "
                                                        "localhost and 127.0.0.1 are always included)")] = None,
) -> None:
    """A CA, the SuperLink's TLS certificate and one authentication key pair per SuperNode."""
    from fedgen.runtimes.flower.deploy.certs import write_certs

    with _user_errors():
        _at_least("--nodes", nodes, 1, "one key pair per SuperNode")
        written = write_certs(out, nodes, list(host or []))
    console.print(f"wrote {', '.join(p.name for p in written)} to {out}\n"
                  f"the SuperLink machine needs ca.crt, superlink.crt, superlink.key and the node-*.pub files; "
                  f"silo i needs ca.crt and node-i (keep ca.key offline)", highlight=False)


@flower.command("superlink")
def flower_superlink(
    certs: Annotated[Path | None, typer.Option(help="folder of `fedgen flower certs` (TLS and node keys)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for remote SuperNodes)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the SuperLink's one HTTPS port")] = 8000,
    state: Annotated[Path | None, typer.Option(help="folder for the SuperLink's database (node registrations "
                                                    "survive restarts)")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="plaintext and no node authentication")] = False,
) -> None:
    """Run the SuperLink (TLS + SuperNode authentication) and register the nodes' keys; Ctrl-C stops it."""
    from fedgen.runtimes.flower.deploy.superlink import serve_superlink

    with _user_errors():
        if certs is None and not insecure:
            raise UsageError("pass --certs DIR (from `fedgen flower certs`), or --insecure for plaintext")
        database = None
        if state is not None:
            state.mkdir(parents=True, exist_ok=True)
            database = state / "superlink.db"
        code = serve_superlink(None if insecure else certs, host, port, database,
                               log=lambda m: console.print(m, highlight=False))
    raise typer.Exit(code)


@flower.command("supernode")
def flower_supernode(
    superlink: Annotated[str, typer.Option(help="the SuperLink, HOST:PORT")],
    partition_id: Annotated[int, typer.Option("--partition-id", help="this silo's number, 0..N-1")],
    certs: Annotated[Path | None, typer.Option(help="folder holding the CA certificate ca.crt")] = None,
    key: Annotated[Path | None, typer.Option(help="this node's private key (node-i from `fedgen flower certs`)")]
    = None,
    data: Annotated[Path | None, typer.Option(help="this silo's own data: a folder in the run's data.dataset "
                                                   "format (default: its share of a dataset every node reads)")]
    = None,
    port: Annotated[int, typer.Option(help="local port of this SuperNode (distinct per node on one machine)")]
    = 9094,
    max_wait: Annotated[float, typer.Option(help="give up after this many seconds without the SuperLink")] = 60.0,
    state: Annotated[Path | None, typer.Option(help="folder for this silo's persistent state: privacy accounts, "
                                                    "noise secrets, control variates, discriminators. Keep it (and "
                                                    "back it up) for the life of every run (default: "
                                                    "$XDG_STATE_HOME/fedgen/silos, ~/.local/state/fedgen/silos)")]
    = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="plaintext, no node authentication")] = False,
    fast: Annotated[bool, typer.Option(help="fedgen's fast path: short waits and a long-lived worker that keeps "
                                            "the silo loaded (--no-fast: Flower's stock SuperNode, a new process "
                                            "per message)")] = True,
) -> None:
    """Run one silo's SuperNode: it trains on its own data only and sends back weights and metrics."""
    from fedgen.runtimes.flower.deploy.supernode import serve_supernode

    with _user_errors():
        if certs is None and not insecure:
            raise UsageError("pass --certs DIR and --key NODE_KEY (from `fedgen flower certs`), or --insecure")
        code = serve_supernode(superlink, None if insecure else certs, None if insecure else key, partition_id,
                               data, port, max_wait, state, fast=fast)
    raise typer.Exit(code)


@flower.command("register")
def flower_register(
    public_key: Annotated[Path, typer.Argument(help="a node's public key (node-i.pub)")],
    superlink: Annotated[str, typer.Option(help="the SuperLink, HOST:PORT")],
    certs: Annotated[Path | None, typer.Option(help="folder holding ca.crt")] = None,
) -> None:
    """Register one more SuperNode key with a running SuperLink."""
    from fedgen.runtimes.flower.deploy.common import FlwrHome
    from fedgen.runtimes.flower.deploy.superlink import register_keys

    with _user_errors():
        home = FlwrHome(superlink, certs / "ca.crt" if certs else None)
        try:
            register_keys(home, [public_key], log=lambda m: console.print(m, highlight=False))
        finally:
            home.close()


def main() -> None:
    """The installed `fedgen` command: `app` with a command line that cannot be parsed (a missing option, a value
    of the wrong type) said in one `error:` line too, exit 2, naming the command's --help."""
    try:
        code = app(standalone_mode=False, prog_name="fedgen")
    except click.exceptions.NoArgsIsHelpError as exc:  # `fedgen` or `fedgen flower` alone: the help
        typer.echo(exc.ctx.get_help())
        code = 0
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "fedgen"
        _error_line(f"{exc.format_message()} (see {where} --help)")
        code = 2
    except click.Abort:  # Ctrl-C outside a command's own handling (while parsing, or before it started)
        _error_line("interrupted")
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
