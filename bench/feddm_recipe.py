"""FedDM recipe ablation: the default job (`fmnist-quick`) with one change at a time, at the same training budget.

Each variant is `fedgen train --preset PRESET --set ...` (the same rounds, clients, local epochs and data, so the
same image passes unless the variant changes them), timed alone, then evaluated with fedgen's own evaluation:
domain FID of `--n` samples (SDE-DPM-Solver++ at the eval defaults), the share of samples the domain classifier
recognises as their label, and TSTR (the fixed EvalCNN recipe: 4 epochs, never selected on the test set) trained on
`--tstr-samples` samples. Domain metrics only: no Inception weights on this machine.

    .venv/bin/python bench/feddm_recipe.py --variants eps,eps+min-snr,v,v+min-snr --runs bench/results/recipe \
        --out docs/bench/feddm_recipe_cpu.json

A variant already trained in `--runs` is not retrained (its recorded wall time is reused), and one already evaluated
at these settings is not re-evaluated (its record in the run's metrics.jsonl is read back): the script resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import device_name

# each variant against the default job (name -> --set overrides); "eps" is the paper's objective, the default job's
# before v-prediction with min-SNR weights
VARIANTS: dict[str, list[str]] = {
    "eps": ["diffusion.prediction=epsilon", "diffusion.min_snr_gamma=none"],
    "eps+min-snr": ["diffusion.prediction=epsilon"],
    "v": ["diffusion.min_snr_gamma=none"],
    "v+min-snr": [],  # the default job
    "v+min-snr+lr-decay": ["train.lr_decay_rounds=30"],
    "v+min-snr+label-dropout": ["train.label_dropout=0.1"],
    "v+min-snr+lr-decay+label-dropout": ["train.lr_decay_rounds=30", "train.label_dropout=0.1"],
    "v+min-snr+log-normal": ["diffusion.timestep_sampling=log-normal"],  # EDM's noise levels
    "v+min-snr+warmup": ["train.warmup_steps=8"],  # a quarter of a client's ~31 local steps
    "x0+min-snr": ["diffusion.prediction=x0"],
    "v+min-snr+adam-0.99": ["train.adam_betas=[0.9, 0.99]"],
    "v+min-snr+batch-64": ["train.batch_size=64"],  # the same image passes in half the steps
    "v+min-snr+wide": ["model.arch=custom", "model.block_out_channels=[48, 96, 96]", "model.layers_per_block=1",
                       "model.attention_levels=[]"],  # about 2.2x the parameters and arithmetic
    # compressed updates (issue "A deployment that costs what the work costs"): the FID cost at equal rounds
    "v+min-snr+int8": ["fl.compression=int8"],
    "v+min-snr+fp16": ["fl.compression=fp16"],
    # the centralized twin at the same image passes (30 rounds x 2 clients x 1 epoch of ~1,000 images = 6 epochs
    # of the 10,000): how far the federated split is from one party holding all the data
    "v+min-snr+central": ["fl.centralized=true", "fl.rounds=6"],
}


def train(name: str, sets: list[str], runs: Path, preset: str) -> float:
    out = runs / name
    timing = out / "bench_train_s.json"
    if timing.exists():
        return json.loads(timing.read_text())["train_s"]
    cmd = [str(Path(sys.executable).parent / "fedgen"), "train", "--preset", preset, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    timing.write_text(json.dumps({"train_s": seconds, "command": cmd}))
    return seconds


def evaluate(run: Path, n: int, tstr_samples: int, guidance: float | None) -> dict:
    """The run's evaluate record for these settings from its metrics.jsonl (evaluation is seeded, so a record
    already there is what a new one would be), else `fedgen evaluate` in its own process, then its record."""

    def recorded() -> dict | None:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        match = [r for r in records if r.get("event") == "evaluate" and r.get("generated") == n
                 and r.get("tstr_generated") == tstr_samples and r.get("guidance") == (guidance or 1.0)
                 and "label_agreement_domain" in r and r.get("model") == "global"]
        return match[-1] if match else None

    if (found := recorded()) is not None:
        return found
    cmd = [str(Path(sys.executable).parent / "fedgen"), "evaluate", str(run), "--n", str(n), "--tstr",
           "--tstr-samples", str(tstr_samples)] + ([] if guidance is None else ["--guidance", str(guidance)])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return recorded()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="eps,v+min-snr", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="NAME=KEY=VALUE",
                   help="an extra variant: its name, then one override (repeat for more overrides)")
    p.add_argument("--set-all", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every variant (e.g. train.cpu_threads=1 when two benches share the machine)")
    p.add_argument("--preset", default="fmnist-quick")
    p.add_argument("--runs", type=Path, default=Path("bench/results/recipe"))
    p.add_argument("--n", type=int, default=2000, help="samples for domain FID and label agreement")
    p.add_argument("--tstr-samples", type=int, default=5000)
    p.add_argument("--guidance", default="", help="comma-separated guidance scales to also evaluate "
                   "(label-dropout variants only)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    variants = {v: VARIANTS[v] for v in args.variants.split(",") if v}
    for item in args.set:
        name, override = item.split("=", 1)
        variants.setdefault(name, []).append(override)
    variants = {name: args.set_all + sets for name, sets in variants.items()}
    args.runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, sets in variants.items():
        seconds = train(name, sets, args.runs, args.preset)
        scales = [None] + ([float(g) for g in args.guidance.split(",") if g]
                           if any(s.startswith("train.label_dropout") for s in sets) else [])
        for g in scales:
            rec = evaluate(args.runs / name, args.n, args.tstr_samples, g)
            rows.append({"variant": name, "sets": sets, "train_s": round(seconds, 1), "guidance": rec["guidance"],
                         "fid_domain_test": rec["fid_domain_test"],
                         "label_agreement_domain": rec["label_agreement_domain"],
                         "precision_domain_test": rec["precision_domain_test"],
                         "recall_domain_test": rec["recall_domain_test"],
                         "tstr_accuracy": rec["tstr_accuracy"], "sampler": rec["sampler"], "steps": rec["steps"]})
            r = rows[-1]
            print(f"{name:24s} w={r['guidance']:<4g} train {r['train_s']:6.1f}s  FID {r['fid_domain_test']:6.2f}  "
                  f"recognised {r['label_agreement_domain']:.3f}  P/R {r['precision_domain_test']:.2f}/"
                  f"{r['recall_domain_test']:.2f}  TSTR {r['tstr_accuracy']:.3f}", flush=True)
            if args.out:  # after every row: a long queue that stops keeps what it measured
                write(args.out, args, rows)


def write(path: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """Merge `rows` into the JSON at `path` (a variant measured again replaces its old row)."""
    result = {"device": device_name(torch.device("cpu")), "preset": args.preset, "fid_samples": args.n,
              "tstr_samples": args.tstr_samples, "seeds": 1,
              "metrics": "domain (fedgen's EvalCNN features), not Inception", "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {(r["variant"], r["guidance"]) for r in rows}
    result["rows"] = [r for r in existing if (r["variant"], r["guidance"]) not in new] + rows
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
