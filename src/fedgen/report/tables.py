"""The tables the CLI prints: a metrics record, the TSTR comparison of the PGA paper, the privacy ledger, a
comparison of runs. Rendering only: the records come from the run tools (runs/) and the ledger."""

from __future__ import annotations

from rich.table import Table

from fedgen.privacy.ledger import summary


def folding_table(*headers: str, title: str | None = None) -> Table:
    """A table whose cells fold onto more lines when the page is narrow, never cut with "…" (paths, run names)."""
    out = Table(title=title)
    for header in headers:
        out.add_column(header, overflow="fold")
    return out


def number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def record_table(record: dict, title: str, compact: bool = False) -> Table:
    """One row per key of a metrics record (not its event, round and model). `compact` (audits): tiny values in 4
    significant digits, lists of floats to 4 decimals, the per-timestep calibration lists left out."""
    table = folding_table("metric", "value", title=title)
    for key, value in record.items():
        if key in ("event", "round", "model", "time") or (compact and key.endswith(("_by_timestep", "_roc"))):
            continue
        if not compact:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
            continue
        if isinstance(value, list) and value and isinstance(value[0], float):
            value = "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
        table.add_row(key, number(value))
    return table


def tstr_table(record: dict) -> Table:
    """The PGA paper's Tables 1-2: each silo's own CNN against one trained on the global model's samples."""
    table = folding_table("CNN trained on", "accuracy on the real test set", title="train on synthetic, test on real")
    table.add_row("each silo's own real data (mean)", f"{record['local_real_accuracy_mean']:.4f}")
    table.add_row(f"{record['tstr_generated']} generated images (global)", f"{record['tstr_accuracy']:.4f}")
    table.add_row("all real training data", f"{record['real_train_real_test_accuracy']:.4f}")
    table.add_row("global - local", f"{record['tstr_minus_local_mean']:+.4f}")
    return table


LEDGER_COLUMNS = ("party", "epsilon", "delta", "noise multiplier σ", "sampling rate q", "steps", "planned steps")


def ledger_rows(entry: dict, silos: int = 0) -> list[list[str]]:
    """The ledger's rows (LEDGER_COLUMNS), one per silo or the server's account. `silos`: how many silos the run
    has; a silo that was never sampled has reported no account and is shown at ε = 0 (it released nothing), so
    the rows cover every silo."""
    if "server" in entry:
        parties: dict = {"server": entry["server"]}
    else:
        parties = dict(entry["parties"])
        for silo in range(silos):
            parties.setdefault(str(silo), None)
        parties = dict(sorted(parties.items(), key=lambda kv: int(kv[0])))
    rows = []
    for name, rep in parties.items():
        who = f"silo {name}" if name != "server" else "server (K of N clients)"
        if rep is None:
            rows.append([who, "0", f"{entry['delta']:g}", "-", "-", "0", "- (never sampled)"])
            continue
        rows.append([who, f"{rep['epsilon']:.4g}", f"{rep['delta']:g}", f"{rep['noise_multiplier']:.4g}",
                     f"{rep['sample_rate']:.4g}", str(rep["steps"]), str(rep["planned_steps"])])
    return rows


def ledger_title(entry: dict) -> str:
    return f"{entry['unit']}-level DP ({entry['mode']}), {entry['accountant']}"


def ledger_table(entry: dict, silos: int = 0) -> Table:
    """A round record's `privacy` entry: epsilon and every input of it, per silo (every one of the run's `silos`,
    the never-sampled at ε = 0) or the server's account."""
    table = folding_table(*LEDGER_COLUMNS, title=ledger_title(entry))
    for row in ledger_rows(entry, silos):
        table.add_row(*row)
    return table


def ledger_lines(entry: dict) -> list[str]:
    """What the ledger's table does not say: the run's epsilon and how it follows from the parties'."""
    target = f" (target {entry['target_epsilon']:g})" if entry.get("target_epsilon") else ""
    how = "the largest silo epsilon: silos hold disjoint records" if entry["unit"] == "record" else \
        "clients sampled K of N per round, analysed as Poisson q=K/N"
    lines = [f"run: {summary(entry)}{target}; {how}"]
    if "sensitivity" in entry:
        lines.append(f"Gaussian mechanism, L2 sensitivity {entry['sensitivity']}")
    elif entry["unit"] == "record":
        lines.append(f"clip C={entry['max_grad_norm']:g} per record")
    if entry.get("pga_loss_noise"):
        lines.append(entry["pga_loss_noise"])
    return lines
