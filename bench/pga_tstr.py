"""PGA as the paper's Tables 1-2: train-on-synthetic/test-on-real of the global generator next to each party's
local CNN and the all-data CNN, for several presets and variants.

    .venv/bin/python bench/pga_tstr.py [--variants fmnist-1,fmnist-5,...] [--out bench/results/pga_tstr.json]

A variant is a preset plus `--set` overrides (see VARIANTS). Each is trained with `fedgen train` into
bench/results/pga/<name> (a run cut short resumes, bit-identically; `--fresh` starts over), then
`fedgen evaluate --tstr` (as many synthetic images as the real training set, with its class counts; each silo's
CNN on its own shard; the CNN on all real data; domain FID). Prints a table, writes JSON; a run with
`pga.ema_decay` is evaluated with the average and with the raw generator. The paper (Fashion-MNIST, its own
networks, an unstated budget): TSTR 90.16 / 88.54 / 86.87% for 1 / 5 / 10 parties, local CNN 92.40 / 88.26 /
86.63%.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from common import device_name, evaluation, fedgen, tstr_fields

from fedgen.federation.rundir import RunDir

VARIANTS: dict[str, tuple[str, list[str]]] = {
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
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], help="extra override for every variant")
    ap.add_argument("--out", type=Path, default=Path("bench/results/pga_tstr.json"))
    ap.add_argument("--runs", type=Path, default=Path("bench/results/pga"))
    ap.add_argument("--skip-raw", action="store_true", help="with pga.ema_decay: evaluate the average only")
    ap.add_argument("--fresh", action="store_true", help="retrain from scratch (default: resume or reuse a run)")
    args = ap.parse_args()
    rows = []
    for name in args.variants.split(","):
        preset, overrides = VARIANTS[name]
        out = args.runs / name
        if args.fresh:
            shutil.rmtree(out, ignore_errors=True)
        sets = [a for o in [*overrides, *args.set] for a in ("--set", o)]
        fedgen("train", "--preset", preset, "--out", str(out), *sets)  # resumes a run cut short
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in records if r.get("event") == "round"]
        steps = sum(r["steps"] for r in rounds)
        train_s = sum(r["train_time_s"] for r in rounds)  # the rounds' own time: right for a resumed run too
        # a run that keeps an EMA of its generator (pga.ema_decay) is evaluated twice: with the average (the
        # default) and with the generator itself (--raw), so one training run shows what the EMA bought
        with_ema = RunDir(out).config().pga.ema_decay > 0
        for weights in (["ema"] if args.skip_raw else ["ema", "raw"]) if with_ema else ["raw"]:
            ev = evaluation(out, weights)
            rows.append({"variant": name if weights == "raw" or not with_ema else f"{name}+ema", "preset": preset,
                         "overrides": overrides + args.set, "weights": weights, "generator_steps": steps,
                         "train_s": round(train_s, 1),
                         "steps_per_s": round(steps / train_s, 2),
                         **tstr_fields(ev)})
        _write(args.out, rows)
        r = rows[-1]
        print(f"{name:<18} TSTR {r['tstr_accuracy']:.4f}  local {r['local_real_accuracy_mean']:.4f}  "
              f"all {r['real_train_real_test_accuracy']:.4f}  FID_domain {r['fid_domain_test']:.2f}  "
              f"{r['steps_per_s']:.1f} steps/s", flush=True)
    print(f"\n{'variant':<18} {'TSTR':>7} {'local':>7} {'global-local':>12} {'all data':>8} {'FID dom':>8} "
          f"{'steps/s':>8}")
    for r in rows:
        print(f"{r['variant']:<18} {r['tstr_accuracy']:>7.4f} {r['local_real_accuracy_mean']:>7.4f} "
              f"{r['tstr_minus_local_mean']:>+12.4f} {r['real_train_real_test_accuracy']:>8.4f} "
              f"{r['fid_domain_test']:>8.2f} {r['steps_per_s']:>8.1f}")
    _write(args.out, rows)
    print(f"wrote {args.out}")


def _write(path: Path, rows: list[dict]) -> None:
    """After every variant, so a run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path.write_text(json.dumps({"meta": {"device": device_name(device)}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
