"""`fedgen report RUN [RUN ...]`: what fedgen knows about a run (or several), as one self-contained HTML page.

This module reads run directories (config.toml, partition.json, metrics.jsonl, samples/, audit/) and assembles
the page's sections as plain data; report/html.py renders it and report/figures.py draws its plots. A record
that is missing or cut short is said on the page, never a reason to write no report."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fedgen import config as config_mod
from fedgen.config import Config
from fedgen.core.errors import UsageError
from fedgen.evaluation.audit import ATTACKS, verdict
from fedgen.federation.rundir import RunDir, dedupe_rounds, now_utc
from fedgen.privacy.ledger import NO_GUARANTEE, PGA_NOISE, summary
from fedgen.report import figures
from fedgen.report.html import Details, Facts, Image, Page, Section, Table, Text, render
from fedgen.report.tables import LEDGER_COLUMNS, ledger_lines, ledger_rows, ledger_title
from fedgen.runs import compare as cmp

REPORT_NAME = "report.html"
EVALUATION_METRICS = ("fid_domain_test", "kid_domain_test", "precision_domain_test", "recall_domain_test",
                      "label_agreement_domain", "fid_inception", "tstr_accuracy")
ALGORITHMS = {"feddm": "FedDM: federated averaging of a class-conditional diffusion model",
              "pga": "PGA: one GAN generator against the silos' own discriminators",
              "merf": "DP-MERF: a generator fitted to the silos' (noised) mean embeddings"}


@dataclass
class RunRecords:
    """A run directory as the report reads it: its config, its records (unreadable lines skipped and counted)
    and what is missing."""

    path: Path
    cfg: Config
    records: list[dict]
    problems: list[str] = field(default_factory=list)

    @property
    def start(self) -> dict:
        return next((r for r in self.records if r.get("event") == "start"), {})

    @property
    def rounds(self) -> list[dict]:
        return [r for r in self.records if r.get("event") == "round"]

    def events(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == name]


def read_run(path: Path) -> RunRecords:
    """The run's config and records. A directory that is not a run, or has no metrics.jsonl, is a one-line
    UsageError; a metrics.jsonl cut short (a line that is not JSON, no end record, fewer rounds than planned) is
    read as far as it goes and said in `problems`."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} does not exist (expected a run directory, the --out of `fedgen train`)")
    rundir = RunDir(path)
    if not rundir.exists():
        raise UsageError(f"{path} is not a fedgen run directory (no config.toml)")
    if not rundir.metrics_path.exists() or not rundir.metrics_path.read_text().strip():
        raise UsageError(f"{path} has no metrics yet (metrics.jsonl is missing or empty): train it first")
    cfg = rundir.config()
    records, problems, bad = [], [], []
    for number, line in enumerate(rundir.metrics_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    records = dedupe_rounds(records)
    run = RunRecords(path, cfg, records, problems)
    if bad:
        problems.append(f"metrics.jsonl line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
                        f"{'are' if len(bad) > 1 else 'is'} not a complete JSON record (the file was cut short, "
                        "e.g. a full disk or a copy taken mid-write); the report reads the rest")
    if not run.start:
        problems.append("metrics.jsonl has no start record: the run's device, silo sizes and classes are unknown")
    done = len(run.rounds)
    if done < cfg.fl.rounds:
        problems.append(f"{done} of the {cfg.fl.rounds} planned rounds are recorded: training is still running, "
                        f"was interrupted or failed; `fedgen train --out {path}` resumes it")
    if not run.events("end"):
        problems.append("metrics.jsonl has no end record: training is still running or did not finish (or the run "
                        "predates end records), so its wall time is unknown")
    for failed in [r for r in records if str(r.get("event", "")).endswith("_failed")]:
        problems.append(f"{failed['event'].replace('_', ' ')} after round {failed.get('round')}: {failed.get('error')}")
    return run


# -- small helpers ---------------------------------------------------------------------------------------------
def _num(value, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 60 else f"{seconds:.1f} s"


def _parse_time(stamp) -> datetime | None:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None


def _png(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(b"\x89PNG") else None


def _preset_of(cfg: Config) -> tuple[str | None, dict]:
    """The preset the run's config names, and its flattened values ({} where the name is no preset)."""
    name = cfg.name
    if name not in config_mod.PRESETS:
        return None, {}
    try:
        return name, config_mod.flatten(config_mod.to_dict(config_mod.load(name)))
    except Exception:  # noqa: BLE001 - a preset that no longer validates is shown as no preset
        return None, {}


def _wall_time(run: RunRecords) -> str:
    ends = run.events("end")
    if ends:
        total = sum(float(e.get("wall_s", 0)) for e in ends)
        return f"{_clock(total)} training ({len(ends)} invocation{'s' if len(ends) > 1 else ''})"
    spent = sum(float(r.get("time_s", 0)) for r in run.rounds)
    return f"unknown (no end record); the rounds alone took {_clock(spent)}" if spent else "unknown"


def _privacy_entry(run: RunRecords):
    entry = run.rounds[-1].get("privacy") if run.rounds else None
    return entry


def _compute(run: RunRecords) -> dict[int, float]:
    return cmp.cumulative_compute(run.records, run.cfg)


def _against_compute(compute: dict[int, float], rounds: list[int]) -> tuple[list[float], str]:
    """The image passes after `rounds`, in thousands or millions (whichever reads better), and the axis label."""
    scale, unit = (1e6, "million") if max(compute.values(), default=0) >= 1e6 else (1e3, "thousand")
    return [compute.get(r, math.nan) / scale for r in rounds], f"{unit} image passes"


# -- the sections of one run -------------------------------------------------------------------------------------
def glance(run: RunRecords) -> Section:
    """What a person sees first: what the run is, how far it got, its quality and privacy in one line each, and
    its last samples."""
    cfg, rounds = run.cfg, run.rounds
    blocks: list = []
    quality = []
    if rounds and isinstance(rounds[-1].get("global_test_loss"), int | float):
        quality.append(f"test loss {_num(rounds[-1]['global_test_loss'])} after round {rounds[-1]['round']}")
    evaluated = [r for r in run.events("evaluate") if r.get("model", "global") == "global"]
    if evaluated:
        last = evaluated[-1]
        shown = [f"{k} {_num(last[k])}" for k in EVALUATION_METRICS if isinstance(last.get(k), int | float)]
        quality.append(f"evaluated (round {last.get('round')}): " + ", ".join(shown))
    else:
        quality.append(f"not evaluated: `fedgen evaluate {run.path}` adds domain FID, precision/recall and label "
                       "agreement")
    entry = _privacy_entry(run)
    facts = [("run", str(run.path)), ("algorithm", ALGORITHMS.get(cfg.algorithm, cfg.algorithm)),
             ("progress", f"{len(rounds)} of {cfg.fl.rounds} rounds" + ("" if run.events("end") else
                                                                        " (no end record)")),
             ("quality", "; ".join(quality)),
             ("privacy", summary(entry) if entry is not None else "unknown (no round recorded)")]
    audits = run.events("audit")
    if audits:
        facts.append(("audit", verdict(audits[-1])[0]))
    blocks.append(Facts(facts))
    for problem in run.problems:
        blocks.append(Text(problem, "warn"))
    final = _png(run.path / "samples" / "final.png")
    if final is not None:
        blocks.append(Image(final, "the final samples", "the final samples (samples/final.png): one row per class"))
    return Section("glance", "At a glance", blocks)


def trained(run: RunRecords) -> Section:
    cfg, start = run.cfg, run.start
    compute = _compute(run)
    begun = _parse_time(start.get("time"))
    ended = _parse_time(run.events("end")[-1].get("time")) if run.events("end") else None
    facts = [("algorithm", cfg.algorithm), ("preset", cfg.name or "-"),
             ("dataset", f"{cfg.data.dataset} ({', '.join(start.get('classes') or [])})"),
             ("runtime", str(start.get("runtime", "unknown"))), ("device", str(start.get("device", "unknown"))),
             ("parameters", f"{start['num_params']:,}" if "num_params" in start else "unknown"),
             ("rounds", f"{len(run.rounds)} of {cfg.fl.rounds}"),
             ("silos", f"{cfg.fl.clients}, {cfg.fl.k} sampled per round"
              if not cfg.fl.centralized else "centralized baseline (all data in one place)"),
             ("image passes", cmp.passes(max(compute.values(), default=0.0)) + " (compute: see `fedgen compare`)"),
             ("wall time", _wall_time(run)),
             ("started", f"{begun:%Y-%m-%d %H:%M:%S} UTC" if begun else "unknown (a run from before timestamps)"),
             ("ended", f"{ended:%Y-%m-%d %H:%M:%S} UTC" if ended else "no end record")]
    name, preset = _preset_of(cfg)
    values = config_mod.flatten(config_mod.to_dict(cfg))
    rows, marked = [], set()
    for i, (key, value) in enumerate(sorted(values.items())):
        base = preset.get(key, "-") if name else "-"
        rows.append([key, _cell(value), _cell(base) if name else "-"])
        if name and preset.get(key) != value:
            marked.add(i)
    blocks: list = [Facts(facts)]
    if name:
        changed = [rows[i] for i in sorted(marked)]
        blocks.append(Table(["key", "this run", f"preset {name}"], changed,
                            caption=f"what differs from the preset {name}", marked=set(range(len(changed))))
                      if changed else Text(f"the config is the preset {name}, unchanged", "note"))
    else:
        blocks.append(Text(f"the config names no preset ({cfg.name!r}): every value is shown, none compared", "note"))
    blocks.append(Details(f"the whole resolved config ({len(rows)} settings, config.toml)",
                          [Table(["key", "this run", f"preset {name}" if name else "preset"], rows, marked=marked)]))
    return Section("trained", "What was trained", blocks)


def _cell(value) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def data(run: RunRecords) -> Section:
    blocks: list = []
    part_path = run.path / "partition.json"
    classes = run.start.get("classes")
    counts = None
    if part_path.exists():
        try:
            part = json.loads(part_path.read_text())
            counts = part["counts"]
            classes = classes or [str(k) for k in range(len(counts[0]))]
            how = part.get("method", "?") + (f", β = {part['beta']:g}" if part.get("beta") is not None else "")
            blocks.append(Image(figures.heatmap(counts, [str(i) for i in range(len(counts))], classes,
                                                f"images per silo and class ({how})"),
                                "partition heatmap: silos x classes", "each silo's images per class (partition.json)"))
        except (OSError, ValueError, KeyError, IndexError):
            blocks.append(Text("partition.json cannot be read", "warn"))
    else:
        blocks.append(Text("no partition.json: the split is unknown", "warn"))
    sizes = run.start.get("client_sizes") or ([sum(c) for c in counts] if counts else [])
    sampled, aggregated, rejected = {}, {}, {}
    for r in run.rounds:
        for c in r.get("clients", []):
            sampled[c] = sampled.get(c, 0) + 1
        for c in r.get("aggregated", r.get("clients", [])):
            aggregated[c] = aggregated.get(c, 0) + 1
        for c, why in (r.get("rejected") or {}).items():
            rejected.setdefault(int(c), []).append(f"round {r['round']}: {why}")
    rows = []
    for silo, size in enumerate(sizes):
        reasons = rejected.get(silo, [])
        why = f"{len(reasons)}" + (": " + "; ".join(reasons[:5]) if reasons else "") \
            + (" ..." if len(reasons) > 5 else "")
        rows.append([str(silo), str(size), f"{sampled.get(silo, 0)} of {len(run.rounds)}",
                     str(aggregated.get(silo, 0)), why])
    if rows:
        blocks.append(Table(["silo", "images", "sampled (rounds)", "aggregated", "rejected: why"], rows,
                            caption="the silos: size, how often each took part, what was rejected",
                            marked={i for i, r in enumerate(rows) if r[4] != "0"}))
    return Section("data", "The data", blocks)


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _by_round(rounds: list[dict], key: str) -> tuple[list[float], list[float]]:
    """The rounds where `key` has a finite value (a DP run's silos report no loss on their data: NaN), and it."""
    pts = [(r["round"], r[key]) for r in rounds if _finite(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _per_party(rounds: list[dict], key: str) -> figures.Lines:
    out: dict[str, tuple[list, list]] = {}
    for r in rounds:
        for party, value in (r.get(key) or {}).items():
            xs, ys = out.setdefault(f"silo {party}", ([], []))
            xs.append(r["round"])
            ys.append(value)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split()[1])))


def training(run: RunRecords) -> Section:
    rounds, blocks, row = run.rounds, [], []
    if not rounds:
        return Section("training", "Training", [Text("no round recorded yet", "warn")])
    compute = _compute(run)
    for key, what in (("global_test_loss", "global model's loss on the test set"),
                      ("global_client_loss_mean", "global model's mean loss on the sampled silos"),
                      ("loss_mean", "generator loss (mean embedding distance)"),
                      ("g_representative_mean", "generator loss (representative)")):
        xs, ys = _by_round(rounds, key)
        if ys:
            row.append(Image(figures.lines({key: (xs, ys)}, "round", key, what), f"{key} against rounds"))
            cx, unit = _against_compute(compute, xs)
            row.append(Image(figures.lines({key: (cx, ys)}, unit, key, f"{key} against compute"),
                             f"{key} against compute"))
    per_silo = _per_party(rounds, "global_client_loss")
    if per_silo:
        row.append(Image(figures.lines(per_silo, "round", "loss", "the global model's loss on each sampled silo"),
                         "each silo's loss", "a point where the silo was sampled"))
    if run.cfg.algorithm == "pga":
        for key, what in (("d_mean", "each party's discriminator loss d_i"), ("g_mean", "each party's generator "
                                                                                        "loss g_i")):
            series = _per_party(rounds, key)
            if series:
                row.append(Image(figures.lines(series, "round", key, what), what))
        chosen = _per_party(rounds, "representatives")
        if chosen:
            row.append(Image(figures.lines(chosen, "round", "generator steps", "how often each party was the "
                                           "representative (PGA)"), "PGA's representatives"))
        rho = {k: _by_round(rounds, k) for k in ("rho_mean", "rho_min", "rho_max")}
        if any(ys for _, ys in rho.values()):
            row.append(Image(figures.lines(rho, "round", "ρ", "the aggregation ratio ρ per round (PGA)"), "PGA's rho"))
    traffic = {k: _by_round(rounds, k) for k in ("bytes_down", "bytes_up")}
    if any(ys for _, ys in traffic.values()):
        mb = {k: (xs, [y / 1e6 for y in ys]) for k, (xs, ys) in traffic.items()}
        row.append(Image(figures.lines(mb, "round", "MB", "bytes per round (server to silos, silos to server)"),
                         "bytes per round"))
    blocks.append(row)
    evaluated = [r for r in run.events("evaluate") if r.get("model", "global") == "global"]
    if evaluated:
        eval_row = []
        for key in EVALUATION_METRICS:
            pts = [(r["round"], r[key]) for r in evaluated if isinstance(r.get(key), int | float)]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            eval_row.append(Image(figures.lines({key: (xs, ys)}, "round", key,
                                                f"{key} ({cmp.better(key)} is better)"), f"{key} against rounds"))
            cx, unit = _against_compute(compute, xs)
            eval_row.append(Image(figures.lines({key: (cx, ys)}, unit, key, f"{key} against compute"),
                                  f"{key} against compute"))
        blocks.append(Text("evaluation of the global model (fedgen evaluate, or eval.every during training)"))
        blocks.append(eval_row)
        last = evaluated[-1]
        blocks.append(Table(["metric", "value"], [[k, _num(v)] for k, v in last.items()
                                                  if k not in ("event", "model", "time") and not isinstance(v, dict)],
                            caption=f"the last evaluation (round {last.get('round')})"))
    else:
        blocks.append(Text(f"no evaluation yet: `fedgen evaluate {run.path}` adds domain FID/KID, precision/recall "
                           "and label agreement (and `--tstr`, train on synthetic, test on real) to these plots",
                           "note"))
    clients = [r for r in run.events("evaluate") if str(r.get("model", "")).startswith("client")]
    if clients:
        blocks.append(Table(["model", "round", "fid_domain_test", "label_agreement_domain"],
                            [[r["model"], str(r.get("round")), _num(r.get("fid_domain_test", "-")),
                              _num(r.get("label_agreement_domain", "-"))] for r in clients],
                            caption="personalised (client) models evaluated"))
    return Section("training", "Training", blocks)


def samples(run: RunRecords) -> Section:
    folder = run.path / "samples"
    grids = sorted(folder.glob("round_*.png"))
    blocks: list = []
    if grids:
        *earlier, last = grids
        png = _png(last)
        if png:
            blocks.append(Image(png, f"samples after {last.stem}", f"{last.name}: the last round's samples, one row "
                                "per class", large=True))
        row = [Image(p, f"samples {g.stem}", g.name) for g in earlier[-12:] if (p := _png(g))]
        if row:
            blocks.append(Text("earlier rounds" + (f" (the last {len(row)})" if len(earlier) > 12 else "")
                               + (" — more with log.sample_every" if not run.cfg.log.sample_every else "")))
            blocks.append(row)
    else:
        blocks.append(Text("no sample grid yet (samples/round_NNNN.png is written at the end of training)", "warn"))
    clients = sorted(folder.glob("sample-client-*.png"))
    if clients:
        blocks.append(Text("each personalised (client) model's samples, with its colour palette"))
        blocks.append([Image(p, f"samples of {c.stem}", c.name) for c in clients if (p := _png(c))])
    have = sorted((run.path / "clients").glob("client_*.safetensors"))
    if have and not run.cfg.trains_generator:
        missing = [int(p.stem.split("_")[1]) for p in have
                   if not (folder / f"sample-client-{int(p.stem.split('_')[1])}.png").exists()]
        if missing:
            blocks.append(Text(f"silos {', '.join(map(str, missing))} have a personalised model without a grid: "
                               f"`fedgen sample {run.path} --client N` draws one (samples/sample-client-N.png)",
                               "note"))
    return Section("samples", "Samples", blocks)


GUARANTEE = {
    "none": ("No formal guarantee. FedAvg keeps the images in their silos, but the model updates it exchanges can "
             "leak information about training images; nothing bounds how much.",
             "It is not differential privacy, and it does not stop a model from reproducing a training image: "
             "audit it (`fedgen audit`) and read the nearest pairs."),
    "dp-sgd": ("Record-level (ε, δ)-differential privacy: whatever one training image changes in everything a silo "
               "released (its updates, so the model) is bounded by ε, except with probability δ. Each silo clips "
               "every image's gradient and adds Gaussian noise; the run's ε is the largest silo's (silos hold "
               "disjoint images).",
               "It bounds one image, not a patient with many images, nor a whole silo; it says nothing about what "
               "the data's distribution reveals (a model of a rare disease reveals it is common in the data). "
               "It holds as implemented only: the audits below test it."),
    "dp-release": ("Record-level (ε, δ)-differential privacy: each silo releases one noised summary (the Gaussian "
                   "mechanism on its mean embedding); the generator is fitted to those summaries only, so "
                   "everything after them is post-processing.",
                   "It bounds one image, not a person with several images nor a whole silo; it does not hide what "
                   "is common to the data."),
    "client-dp": ("Client-level (ε, δ)-differential privacy: whatever one silo's whole data changes in the model is "
                  "bounded by ε, except with probability δ. The server clips each silo's update and adds noise.",
                  "The server adds the noise, so the silos must trust it with their clipped updates; the bound is "
                  "per silo, so with few silos the noise is large or ε is."),
}


def privacy(run: RunRecords) -> Section:
    blocks: list = []
    mode = run.cfg.privacy.mode
    entry = _privacy_entry(run)
    if isinstance(entry, str):
        what, what_not = GUARANTEE["none"]
        if entry == PGA_NOISE:
            what = ("PGA's loss noise is a heuristic: it makes the discriminators' replies noisy but gives no "
                    "(ε, δ) guarantee.")
        blocks.append(Text(f"privacy: {entry}", "verdict"))
    else:
        what, what_not = GUARANTEE.get(mode, GUARANTEE["none"])
    blocks.append(Text(f"What the guarantee is: {what}"))
    blocks.append(Text(f"What it is not: {what_not}"))
    if isinstance(entry, dict):
        blocks.append(Text(f"run: {summary(entry)} after {len(run.rounds)} rounds", "verdict"))
        silos = len(run.start.get("client_sizes") or [])
        rows = ledger_rows(entry, silos)
        blocks.append(Table(list(LEDGER_COLUMNS), rows, caption=f"the ledger: {ledger_title(entry)}",
                            marked={i for i, r in enumerate(rows) if r[-1].startswith("- (never")}))
        for line in ledger_lines(entry):
            blocks.append(Text(line, "note"))
        eps: figures.Lines = {"run": ([], [])}
        for r in run.rounds:
            p = r.get("privacy")
            if not isinstance(p, dict):
                continue
            eps["run"][0].append(r["round"])
            eps["run"][1].append(p["epsilon"])
            for party, rep in (p.get("parties") or {}).items():
                xs, ys = eps.setdefault(f"silo {party}", ([], []))
                xs.append(r["round"])
                ys.append(rep["epsilon"])
        blocks.append([Image(figures.lines(eps, "round", "ε", f"ε against rounds (δ = {entry['delta']:g})"),
                             "epsilon against rounds", "the run's ε and each silo's, as the ledger recorded them")])
    elif entry is None:
        blocks.append(Text("no round recorded: no ledger", "warn"))
    blocks += audits(run)
    return Section("privacy", "Privacy", blocks)


def audits(run: RunRecords) -> list:
    records = run.events("audit")
    if not records:
        return [Text(f"no audit yet: `fedgen audit {run.path}` runs membership-inference attacks and a "
                     "memorisation check (and, for a DP run, checks the attacks against its ε)", "note")]
    record = records[-1]
    lines = verdict(record)
    blocks: list = [Text(f"audit of the model after round {record.get('round')} ({record.get('members')} members, "
                         f"as many non-members: {record.get('non_member_source')})"),
                    Text("verdict: " + lines[0], "verdict")]
    blocks += [Text(line) for line in lines[1:]]
    curves = {name: (record[f"{p}_roc"]["fpr"], record[f"{p}_roc"]["tpr"])
              for p, name in ATTACKS.items() if isinstance(record.get(f"{p}_roc"), dict)}
    row: list = []
    if curves:
        row.append(Image(figures.roc(curves, "membership attacks: ROC"), "ROC curves of the membership attacks",
                         "ROC of each attack on its targets; the dashed line is a guess", large=True))
    else:
        blocks.append(Text("this audit predates ROC curves in the record: rerun `fedgen audit` to draw them", "note"))
    rows = []
    for p, name in ATTACKS.items():
        if f"{p}_auc" not in record:
            continue
        lo, hi = record[f"{p}_auc_ci"]
        dp = "-"
        if f"{p}_respects_dp_bound" in record:
            dp = (f"ε ≥ {_num(record[f'{p}_epsilon_lower_bound_95'], 3)} (95%) vs ledger ε = "
                  f"{_num(record['dp_epsilon'], 3)}: " + ("within" if record[f"{p}_respects_dp_bound"] else "EXCEEDED"))
        rows.append([name, f"{record[f'{p}_auc']:.3f}", f"{lo:.3f}-{hi:.3f}",
                     f"{record[f'{p}_tpr_at_1pct_fpr']:.3f}", dp])
    blocks.append(Table(["attack", "AUC", "95% interval", "TPR at 1% FPR", "the DP-bound check"], rows,
                        caption="membership inference (0.5 = chance)",
                        marked={i for i, r in enumerate(rows) if r[-1].endswith("EXCEEDED")}))
    pairs = _png(Path(record.get("memorisation_png", ""))) or \
        _png(run.path / "audit" / f"nearest_pairs_round_{int(record.get('round', 0)):04d}.png")
    if pairs:
        row.append(Image(pairs, "nearest pairs: generated images above their nearest training images",
                         "the generated images closest to a training image: each above its nearest training image, "
                         "with their distance d and ratio r (nearest / mean of the nearest; red: a near copy)",
                         large=True))
    blocks.append(row)
    return blocks


def summary_line(run: RunRecords, with_privacy: bool = True) -> str:
    """One line: how far the run got, in what wall time, its last test loss and (`with_privacy`) its privacy."""
    parts = [f"{run.path}: {len(run.rounds)} of {run.cfg.fl.rounds} rounds"]
    ends = run.events("end")
    if ends:
        parts[0] += f" in {_clock(float(ends[-1].get('wall_s', 0)))}"
    if run.rounds and isinstance(run.rounds[-1].get("global_test_loss"), int | float):
        parts.append(f"test loss {_num(run.rounds[-1]['global_test_loss'])}")
    entry = _privacy_entry(run)
    if entry is not None and with_privacy:
        parts.append(summary(entry))
    return "; ".join(parts)


def single(run: RunRecords) -> list[Section]:
    return [glance(run), trained(run), data(run), training(run), samples(run), privacy(run)]


# -- several runs ------------------------------------------------------------------------------------------------
def comparison(runs: list[RunRecords]) -> Section:
    paths = [r.path for r in runs]
    blocks: list = []
    evaluated = any(any(isinstance(e.get("fid_domain_test"), int | float) for e in r.events("evaluate"))
                    for r in runs)
    for metric in (("fid_domain_test", "global_test_loss") if evaluated else ("global_test_loss",)):
        try:
            series, budget, used = cmp.compare(paths, metric)
        except UsageError as exc:
            blocks.append(Text(str(exc), "warn"))
            continue
        goal = cmp.better(used)
        rows = []
        for s in series:
            row = [s.run.name, s.label, str(s.total_rounds), cmp.passes(s.total_compute)]
            if not s.values:
                rows.append(row + ["-", "-", "-"])
                continue
            best = (max if goal == "max" else min)(range(len(s.values)), key=lambda i: s.values[i])
            at = cmp.at_compute(s, budget)
            rows.append(row + [f"{s.values[-1]:.4g}", f"{s.values[best]:.4g} ({s.rounds[best]})",
                               "-" if at is None else f"{at:.4g}"])
        blocks.append(Table(["run", "differs", "rounds", "passes", "last", "best (round)", "at equal compute"], rows,
                            caption=f"{used}, {goal} is better; equal compute = {cmp.passes(budget)} image passes"))
        for line in cmp.missing(series, used):
            blocks.append(Text(line, "warn"))
        row = []
        for x in ("compute", "rounds"):
            fig = cmp.figure(series, used, x)
            row.append(Image(figures.png(fig), f"{used} against {x}", f"{used} against {x}, one line per run"))
        blocks.append(row)
    grids = [Image(p, f"final samples of {r.path.name}", f"{r.path.name}")
             for r in runs if (p := _png(r.path / "samples" / "final.png"))]
    if grids:
        blocks.append(Text("each run's final samples"))
        blocks.append(grids)
    glance_rows = []
    for r in runs:
        entry = _privacy_entry(r)
        glance_rows.append([r.path.name, r.cfg.algorithm, f"{len(r.rounds)} of {r.cfg.fl.rounds}",
                            summary(entry) if entry is not None else "-", _wall_time(r),
                            "; ".join(r.problems) or "-"])
    blocks.append(Table(["run", "algorithm", "rounds", "privacy", "wall time", "missing"], glance_rows,
                        caption="the runs", marked={i for i, row in enumerate(glance_rows) if row[-1] != "-"}))
    return Section("compare", "Comparison", blocks)


def build(paths: list[Path]) -> Page:
    """The report of one run, or the comparison of several followed by each run's own sections (prefixed)."""
    if not paths:
        raise UsageError("report needs at least one run directory")
    runs = [read_run(p) for p in paths]
    if len(runs) == 1:
        run = runs[0]
        entry = _privacy_entry(run)
        return Page(f"fedgen run {run.path.name}",
                    f"{run.cfg.algorithm} on {run.cfg.data.dataset}, {len(run.rounds)} of {run.cfg.fl.rounds} rounds, "
                    f"{summary(entry) if entry is not None else 'privacy unknown'}", single(run), now_utc())
    sections = [comparison(runs)]
    for i, run in enumerate(runs, start=1):
        s = glance(run)
        s.id, s.title = f"run{i}", f"Run {run.path.name}"
        sections.append(s)
    return Page(f"fedgen: {len(runs)} runs compared", ", ".join(str(r.path) for r in runs), sections, now_utc())


def write_report(paths: list[Path], out: Path | None = None) -> tuple[Path, float]:
    """Write the report of `paths` to `out` (default: the first run's report.html); returns the path and the
    seconds it took."""
    t0 = time.perf_counter()
    page = build([Path(p) for p in paths])
    target = Path(out) if out is not None else Path(paths[0]) / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(render(page), encoding="utf-8")
    tmp.replace(target)
    return target, time.perf_counter() - t0


__all__ = ["NO_GUARANTEE", "REPORT_NAME", "build", "read_run", "write_report"]
