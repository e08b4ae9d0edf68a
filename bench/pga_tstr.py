"""PGA as the paper's Tables 1-2: train-on-synthetic/test-on-real of the global generator next to each party's
local CNN and the all-data CNN, for several presets and variants, optionally as a curve against generator steps.

    .venv/bin/python bench/pga_tstr.py [--variants fmnist-1,fmnist-5,...] [--curve 1500,3000] [--out FILE.json]

A variant is a preset plus `--set` overrides (see VARIANTS). Each is trained with `fedgen train` into
bench/results/pga/<name> (a run cut short resumes, bit-identically; `--fresh` starts over), then
`fedgen evaluate --tstr` (as many synthetic images as the real training set, with its class counts; domain FID on
10,000). The silos' own CNNs and the all-data CNN are trained once per preset (they depend only on its partition
and seed) and their numbers repeated in the other rows of that preset. `--curve S1,S2,...` trains each variant on
to S1 generator steps, evaluates, trains on to S2 (extending fl.rounds, which resumes the same run), and so on: the
rows are one run seen at several budgets. A run with `pga.ema_decay` is evaluated with the average and (unless
`--skip-raw`) with the raw generator; EMA never feeds back into training, so the raw row is the same run without
it. The paper (Fashion-MNIST, its own networks, an unstated budget): TSTR 90.16 / 88.54 / 86.87% for 1 / 5 / 10
parties, local CNN 92.40 / 88.26 / 86.63%.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from common import device_name, evaluation, fedgen, tstr_fields

from fedgen import config as config_mod
from fedgen.federation.rundir import RunDir

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "smoke": ("pga-smoke", ["pga.loss=acgan"]),  # seconds: checks this script
    "fmnist-1": ("pga-fmnist-1-quick", []),
    "fmnist-5": ("pga-fmnist-5-quick", []),
    "fmnist-10": ("pga-fmnist-10-quick", []),
    "fmnist-5-mean": ("pga-fmnist-5-quick", ["pga.aggregation=mean"]),
    "fmnist-5-literal": ("pga-fmnist-5-quick", ["pga.aggregation=literal"]),
    "fmnist-5-no-noise": ("pga-fmnist-5-quick", ["pga.noise_ratio=0"]),
    "fmnist-5-acgan": ("pga-fmnist-5-quick", ["pga.loss=acgan"]),
    "fmnist-5-mean-acgan": ("pga-fmnist-5-quick", ["pga.aggregation=mean", "pga.loss=acgan"]),
    # the centralized twin at the same generator steps and batch: one party holding all the data, one DCGAN
    # discriminator, the generator updated from its gradient alone (what the protocol is measured against)
    "fmnist-central-1500": ("pga-fmnist-1-quick", ["fl.rounds=15", "pga.aggregation=mean"]),
    # one change each on top of the paper's reading of the 5-party preset (run with --set pga.ema_decay=0.999 for
    # an EMA row and its raw twin), or on top of the auxiliary classifier
    "fmnist-5-ema": ("pga-fmnist-5-quick", ["pga.ema_decay=0.999"]),
    "fmnist-5-acgan-g128": ("pga-fmnist-5-quick", ["pga.loss=acgan", "pga.width=128"]),
    "fmnist-5-acgan-dcgan-zoo": ("pga-fmnist-5-quick", ["pga.loss=acgan", 'pga.discriminators=["dcgan"]']),
    "fmnist-5-acgan-sn": ("pga-fmnist-5-quick", ["pga.loss=acgan", "pga.spectral_norm=true"]),
    "fmnist-5-acgan-diffaugment": ("pga-fmnist-5-quick", ["pga.loss=acgan", "pga.diffaugment=true"]),
    "fmnist-5-acgan-ms": ("pga-fmnist-5-quick", ["pga.loss=acgan", "pga.mode_seeking=1"]),
    # the hinge loss makes g_i signed, so it cannot go with the ratio reading: compare with fmnist-5-mean-acgan
    "fmnist-5-mean-acgan-hinge": ("pga-fmnist-5-quick", ["pga.aggregation=mean", "pga.loss=acgan",
                                                         "pga.adversarial=hinge"]),
}


BASELINE_KEYS = ("local_real_accuracy_mean", "local_real_accuracy", "real_train_real_test_accuracy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], help="extra override for every variant")
    ap.add_argument("--curve", default=None, help="generator step counts to evaluate each variant at, e.g. "
                    "1500,3000,6000 (multiples of pga.steps_per_round; default: the preset's own)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/pga_tstr.json"))
    ap.add_argument("--runs", type=Path, default=Path("bench/results/pga"))
    ap.add_argument("--skip-raw", action="store_true", help="with pga.ema_decay: evaluate the average only")
    ap.add_argument("--fresh", action="store_true", help="retrain from scratch (default: resume or reuse a run)")
    ap.add_argument("--baselines-from", type=Path, action="append", default=[],
                    help="a JSON this script wrote: reuse its presets' silo and all-data CNN accuracies")
    args = ap.parse_args()
    rows = []
    baselines: dict[str, dict] = {}  # preset -> its silos' and the all-data CNN's accuracies
    for path in args.baselines_from:
        for r in json.loads(path.read_text())["results"]:
            baselines.setdefault(r["preset"], {k: r[k] for k in (*BASELINE_KEYS, "baselines_from")})
    for name in args.variants.split(","):
        preset, overrides = VARIANTS[name]
        out = args.runs / name
        if args.fresh:
            shutil.rmtree(out, ignore_errors=True)
        sets = [a for o in [*overrides, *args.set] for a in ("--set", o)]
        budgets = [int(s) for s in args.curve.split(",")] if args.curve else [None]
        for budget in budgets:
            extend = []
            if budget is not None:
                per_round = config_mod.load(preset, overrides=[*overrides, *args.set]).pga.steps_per_round
                if budget % per_round:
                    raise SystemExit(f"--curve {budget}: not a multiple of pga.steps_per_round={per_round}")
                extend = ["--set", f"fl.rounds={budget // per_round}"]
            fedgen("train", "--preset", preset, "--out", str(out), *sets, *extend)  # resumes, or extends
            rows += _evaluated(out, name, preset, overrides + args.set, baselines, args.skip_raw)
            _write(args.out, rows)
            r = rows[-1]
            print(f"{r['variant']:<28} {r['generator_steps']:>6} steps  TSTR {r['tstr_accuracy']:.4f}  local "
                  f"{r['local_real_accuracy_mean']:.4f}  FID_domain {r['fid_domain_test']:.2f}  "
                  f"agreement {r['label_agreement_domain']:.3f}", flush=True)
    print(f"\n{'variant':<28} {'steps':>6} {'TSTR':>7} {'local':>7} {'global-local':>12} {'all data':>8} "
          f"{'FID dom':>8} {'agree':>6} {'steps/s':>8}")
    for r in rows:
        print(f"{r['variant']:<28} {r['generator_steps']:>6} {r['tstr_accuracy']:>7.4f} "
              f"{r['local_real_accuracy_mean']:>7.4f} {r['tstr_minus_local_mean']:>+12.4f} "
              f"{r['real_train_real_test_accuracy']:>8.4f} {r['fid_domain_test']:>8.2f} "
              f"{r['label_agreement_domain']:>6.3f} {r['steps_per_s']:>8.2f}")
    _write(args.out, rows)
    print(f"wrote {args.out}")


def _evaluated(out: Path, name: str, preset: str, overrides: list[str], baselines: dict[str, dict],
               skip_raw: bool) -> list[dict]:
    """The bench rows of run `out` as it stands: one per weights (EMA and raw where the run keeps an EMA)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r.get("event") == "round"]
    steps = sum(r["steps"] for r in rounds)
    train_s = sum(r["train_time_s"] for r in rounds)  # the rounds' own time: right for a resumed run too
    # a run that keeps an EMA of its generator (pga.ema_decay) is evaluated twice: with the average (the
    # default) and with the generator itself (--raw), so one training run shows what the EMA bought
    with_ema = RunDir(out).config().pga.ema_decay > 0
    rows = []
    for weights in (["ema"] if skip_raw else ["ema", "raw"]) if with_ema else ["raw"]:
        ev = evaluation(out, weights, baselines=preset not in baselines)
        if preset not in baselines:
            baselines[preset] = {k: ev[k] for k in BASELINE_KEYS} | {"baselines_from": f"{name} ({weights})"}
        ev = ev | baselines[preset]
        ev["tstr_minus_local_mean"] = ev["tstr_accuracy"] - ev["local_real_accuracy_mean"]
        rows.append({"variant": name if weights == "raw" or not with_ema else f"{name}+ema", "preset": preset,
                     "overrides": overrides, "weights": weights, "generator_steps": steps,
                     "train_s": round(train_s, 1), "steps_per_s": round(steps / train_s, 2),
                     "baselines_from": baselines[preset]["baselines_from"], **tstr_fields(ev)})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    """After every variant, so a run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path.write_text(json.dumps({"meta": {"device": device_name(device)}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
