"""The DP recipe's epsilon -> TSTR curve: `dp-fmnist-quick` (DP-MERF, 10 Dirichlet(0.5) silos, record-level
delta = 1e-5) at several epsilons, and without DP, each trained and evaluated the same way.

    .venv/bin/python bench/dp_tstr.py [--epsilons 1,3,10,inf] [--set key=value ...] [--out bench/results/dp_tstr.json]

Each epsilon is trained with `fedgen train --preset dp-fmnist-quick` into bench/results/dp/<name> (a run cut short
resumes; `--fresh` starts over), then `fedgen evaluate --tstr --n 10000`: an EvalCNN trained with the fixed recipe on
as many synthetic images as the real training set (60,000, with its class counts), tested on the real test set,
never selected on it; domain FID (not Inception) on 10,000 samples. The epsilon in the table is the run's own
ledger (Opacus PRV accountant; the exact epsilon of the Gaussian mechanism is at most that).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from common import device_name, evaluation, fedgen, tstr_fields

PRESET = "dp-fmnist-quick"


def _overrides(eps: float) -> list[str]:
    if math.isinf(eps):
        return ["privacy.mode=none", "privacy.target_epsilon=none"]
    return [f"privacy.target_epsilon={eps:g}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", default="1,3,10,inf")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run")
    ap.add_argument("--out", type=Path, default=Path("bench/results/dp_tstr.json"))
    ap.add_argument("--runs", type=Path, default=Path("bench/results/dp"))
    ap.add_argument("--fresh", action="store_true", help="retrain from scratch (default: resume or reuse a run)")
    args = ap.parse_args()
    rows = []
    for text in args.epsilons.split(","):
        eps = float(text)
        name = "no-dp" if math.isinf(eps) else f"eps{eps:g}"
        out = args.runs / name
        if args.fresh:
            shutil.rmtree(out, ignore_errors=True)
        overrides = [*_overrides(eps), *args.set]
        fedgen("train", "--preset", PRESET, "--out", str(out), *[a for o in overrides for a in ("--set", o)])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in records if r.get("event") == "round"]
        ledger = rounds[-1]["privacy"]
        ev = evaluation(out, "raw")
        rows.append({"run": name, "preset": PRESET, "overrides": overrides,
                     "epsilon_target": None if math.isinf(eps) else eps,
                     "epsilon_ledger": ledger["epsilon"] if isinstance(ledger, dict) else None,
                     "delta": ledger["delta"] if isinstance(ledger, dict) else None,
                     "privacy": ledger if isinstance(ledger, str) else f"{ledger['mode']}, {ledger['accountant']}",
                     "generator_steps": sum(r["steps"] for r in rounds),
                     "train_s": round(sum(r["train_time_s"] for r in rounds), 1), **tstr_fields(ev)})
        _write(args.out, rows)
        r = rows[-1]
        print(f"{name:<8} TSTR {r['tstr_accuracy']:.4f}  FID_domain {r['fid_domain_test']:.2f}  "
              f"train {r['train_s']:.0f}s", flush=True)
    print(f"\n{'run':<8} {'epsilon':>8} {'TSTR':>7} {'all data':>8} {'FID dom':>8} {'train s':>8}")
    for r in rows:
        e = "inf" if r["epsilon_ledger"] is None else f"{r['epsilon_ledger']:.3g}"
        print(f"{r['run']:<8} {e:>8} {r['tstr_accuracy']:>7.4f} {r['real_train_real_test_accuracy']:>8.4f} "
              f"{r['fid_domain_test']:>8.2f} {r['train_s']:>8.0f}")
    print(f"wrote {args.out}")


def _write(path: Path, rows: list[dict]) -> None:
    """After every run, so a sweep cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path.write_text(json.dumps({"meta": {"device": device_name(device), "seeds": 1}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
