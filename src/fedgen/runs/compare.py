"""`fedgen compare RUN...`: one metric across runs, against rounds and against training compute, labelled with
what differs between the runs' configs (the FedDM paper's tables are such comparisons).

Compute is counted in image passes: each round, every trained client's local epochs times its number of images
(the centralized baseline: its epochs times the whole training set). Two runs with equal image passes did equal
forward-backward work on the network, whatever the split into clients and rounds. PGA runs count generator steps
times the batch times the parties instead (one discriminator step per party and generator step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from fedgen import config as config_mod
from fedgen.core.errors import UsageError
from fedgen.federation.rundir import RunDir

# metrics where larger is better; everything else (FID, KID, losses) is lower-is-better
HIGHER_IS_BETTER = ("is_", "tstr_acc", "precision", "recall", "accuracy")
# config keys that never change what a run computes, left out of the labels
_NOT_A_DIFFERENCE = ("name", "description", "runtime.", "log.", "train.device", "train.cpu_threads", "eval.",
                     "fl.rounds")  # rounds: a column of its own


@dataclass
class Series:
    run: Path
    config: dict
    label: str = ""
    rounds: list[int] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)  # cumulative image passes at each point
    values: list[float] = field(default_factory=list)
    total_rounds: int = 0
    total_compute: float = 0.0


def cumulative_compute(records: list[dict], cfg) -> dict[int, float]:
    """Image passes after each round."""
    start = next((r for r in records if r.get("event") == "start"), {})
    sizes = start.get("client_sizes") or []
    total, out = 0.0, {}
    for rec in records:
        if rec.get("event") != "round":
            continue
        if cfg.algorithm == "pga":
            total += cfg.pga.steps_per_round * cfg.train.batch_size * cfg.fl.clients
        elif cfg.algorithm == "merf":  # every silo embeds its data once, in round 1; the generator sees no image
            total += sum(sizes) if rec.get("clients") else 0
        else:
            trained = rec.get("clients", [])
            total += cfg.fl.local_epochs * sum(sizes[c] for c in trained if c < len(sizes))
        out[int(rec["round"])] = total
    return out


def load_series(run: Path, metric: str) -> Series:
    rundir = RunDir(run)
    cfg = rundir.config()
    records = rundir.read_metrics()
    compute = cumulative_compute(records, cfg)
    series = Series(run=Path(run), config=config_mod.flatten(config_mod.to_dict(cfg)))
    series.total_rounds = max(compute, default=0)
    series.total_compute = compute.get(series.total_rounds, 0.0)
    points: dict[int, float] = {}
    for rec in records:
        if rec.get("event") not in ("round", "evaluate") or rec.get("model", "global") != "global":
            continue
        value = rec.get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            points[int(rec["round"])] = float(value)  # the last record of a round wins (a re-evaluation)
    for r in sorted(points):
        series.rounds.append(r)
        series.compute.append(compute.get(r, math.nan))
        series.values.append(points[r])
    return series


def label_runs(series: list[Series]) -> None:
    """Each run's label: the config values that differ between the runs (or its directory name if none do)."""
    keys = sorted({k for s in series for k in s.config})
    differing = [k for k in keys if not k.startswith(_NOT_A_DIFFERENCE)
                 and len({repr(s.config.get(k)) for s in series}) > 1]
    tails = [k.rsplit(".", 1)[-1] for k in differing]
    names = tails if len(set(tails)) == len(tails) else differing  # "strategy=fedadam" where unambiguous
    for s in series:
        parts = [f"{name}={s.config.get(k, '-')}" for name, k in zip(names, differing, strict=True)]
        s.label = ", ".join(parts) if parts else s.run.name


def passes(n: float) -> str:
    """Image passes, short: 12.3k, 4.56M."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def better(metric: str) -> str:
    return "max" if any(metric.startswith(p) or p in metric for p in HIGHER_IS_BETTER) else "min"


def at_compute(s: Series, budget: float) -> float | None:
    """The metric's last value at or before `budget` image passes."""
    seen = [v for c, v in zip(s.compute, s.values, strict=True) if c <= budget * (1 + 1e-9)]
    return seen[-1] if seen else None


# `compare` without --metric: the evaluation's domain FID, else (runs never evaluated) the per-round test loss
DEFAULT_METRICS = ("fid_domain_test", "global_test_loss")


def compare(runs: list[Path], metric: str | None = None) -> tuple[list[Series], float, str]:
    """The runs' series of `metric` (None: the first of DEFAULT_METRICS that any run has), labelled, the
    equal-compute budget (the least total compute of the runs that have the metric) and the metric used."""
    if not runs:
        raise UsageError("compare needs at least one run directory")
    for name in (metric,) if metric is not None else DEFAULT_METRICS:
        series = [load_series(r, name) for r in runs]
        if any(s.values for s in series):
            break
    else:
        asked = repr(metric) if metric is not None else " or ".join(DEFAULT_METRICS)
        raise UsageError(f"no run has {asked} in its metrics.jsonl (evaluation metrics appear after `fedgen "
                         "evaluate` or with eval.every; per-round: global_test_loss, global_client_loss_mean)")
    label_runs(series)
    budget = min(s.total_compute for s in series if s.values)
    return series, budget, name


def how_to_get(metric: str) -> str:
    """How a run comes to have `metric` in its metrics.jsonl."""
    if metric.startswith(("global_", "loss", "d_", "g_", "rho", "bytes")):
        return "it is logged every round by this algorithm only"
    if metric.startswith("tstr") or metric.startswith("local_real"):
        return "run `fedgen evaluate RUN --tstr`"
    if metric.startswith("mia_") or metric.startswith("memorisation"):
        return "run `fedgen audit RUN`"
    return "run `fedgen evaluate RUN` (or train with eval.every)"


def missing(series: list[Series], metric: str) -> list[str]:
    """One line per run without the metric: it is not in the table's values nor in the plot, and how to get it."""
    return [f"{s.run.name} has no {metric} and is not plotted: {how_to_get(metric).replace('RUN', str(s.run))}"
            for s in series if not s.values]


def legend(s: Series) -> str:
    """A run's name in a plot legend, with what differs (its label) where that is not the name itself."""
    return s.run.name if s.label == s.run.name else f"{s.run.name}: {s.label}"


def figure(series: list[Series], metric: str, x: str = "compute"):
    """The metric against image passes (x='compute') or rounds, one line per run, named; runs without the metric
    named under the plot. A matplotlib Figure (close it after saving)."""
    import matplotlib  # plotting only; the backend is chosen before pyplot is imported

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    for s in series:
        if not s.values:
            continue
        xs = [c / 1e6 for c in s.compute] if x == "compute" else s.rounds
        ax.plot(xs, s.values, marker="o" if len(xs) < 40 else None, ms=3, label=legend(s))
    ax.set_xlabel("training compute (million image passes)" if x == "compute" else "round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({better(metric)} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    absent = [s.run.name for s in series if not s.values]
    if absent:
        fig.text(0.01, 0.01, f"not plotted (no {metric}): {', '.join(absent)}", fontsize=7, color="firebrick")
    fig.tight_layout(rect=(0, 0.04 if absent else 0, 1, 1))
    return fig


def plot(series: list[Series], metric: str, path: Path, x: str = "compute") -> None:
    """A PNG of `figure`."""
    fig = figure(series, metric, x)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def table(series: list[Series], budget: float, used: str, fell_back: bool = False) -> Table:
    """The comparison as a table: per run, what differs, its rounds and compute, the metric's last and best values
    and its value at equal compute. `fell_back`: no --metric was given and no run was evaluated."""
    goal = better(used)
    fallback = f" (no run was evaluated: the per-round {used} instead of {DEFAULT_METRICS[0]})" if fell_back else ""
    out = Table(title=f"{used}{fallback}, {goal} is better; compute in image passes, equal compute = "
                f"{passes(budget)} (the least of the runs)")
    out.add_column("run", overflow="fold")
    out.add_column("differs", overflow="fold", min_width=16)
    for name in ("rounds", "passes", "last", "best (round)", "at equal compute"):
        out.add_column(name)
    for s in series:
        row = [s.run.name, s.label, str(s.total_rounds), passes(s.total_compute)]
        if not s.values:
            out.add_row(*row, "-", "-", "-")
            continue
        best = (max if goal == "max" else min)(range(len(s.values)), key=lambda i: s.values[i])
        at = at_compute(s, budget)
        out.add_row(*row, f"{s.values[-1]:.4g}", f"{s.values[best]:.4g} ({s.rounds[best]})",
                    "-" if at is None else f"{at:.4g}")
    return out
