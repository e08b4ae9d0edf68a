"""Quality at a fixed compute budget: variants of the default job (`fmnist-quick`), domain FID of each.

    .venv/bin/python bench/participation_sweep.py [--n 2000] [--device auto] [--only k2r30,base]

Every variant processes about the same number of training images (~60k image-steps: K clients x ~1000 images
x E epochs x R rounds, or 6 centralized epochs over the 10k subset), so the table says which way of spending
one machine's compute gives the better model. Each variant is trained from scratch with fedgen's own loop
into `bench/results/sweep/<name>`, then `n` images with the test set's class proportions are drawn with the
ancestral sampler (T steps) and with DPM-Solver++ (25 steps) and scored by domain FID against the test set
(fedgen's EvalCNN features; not comparable with Inception FID). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import device_name
from rich.console import Console

from fedgen import config as config_mod
from fedgen.core.device import resolve_device
from fedgen.data.prepare import load_reference
from fedgen.diffusion.sampling import sample
from fedgen.evaluation.evaluate import labels_like, real_features
from fedgen.evaluation.features import domain_extractor
from fedgen.evaluation.generative import fid
from fedgen.runs.load import load_run_model
from fedgen.runtimes.local import train

VARIANTS: dict[str, list[str]] = {
    "base (K=10, R=6)": ["fl.clients_per_round=10", "fl.rounds=6"],
    "K=10, R=6, lr 2e-3": ["fl.clients_per_round=10", "fl.rounds=6", "train.lr=2e-3"],
    "K=5, R=12": ["fl.clients_per_round=5", "fl.rounds=12"],
    "K=2, R=30 (fmnist-quick)": [],
    "K=2, R=30, lr 2e-3": ["train.lr=2e-3"],
    "K=3, R=20, lr 2e-3": ["fl.clients_per_round=3", "fl.rounds=20", "train.lr=2e-3"],
    "K=2, R=30, lr 2e-3, cosine": ["train.lr=2e-3", "diffusion.schedule=cosine"],
    "centralized, 6 epochs": ["fl.centralized=true", "fl.rounds=6"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="generated images per variant and sampler")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default=None, help="comma-separated substrings of variant names to run")
    ap.add_argument("--runs", type=Path, default=Path("bench/results/sweep"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/participation_sweep.json"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    base = config_mod.load("fmnist-quick")
    ds = load_reference(base.data)
    extractor, info = domain_extractor(ds, device=device, epochs=base.eval.classifier_epochs)
    real, _ = real_features(extractor, info["cache_key"], "test", ds.test.images)
    labels = labels_like(ds.test.labels, args.n, ds.num_classes)
    wanted = [s.strip() for s in args.only.split(",")] if args.only else None
    rows = []
    for name, overrides in VARIANTS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        cfg = config_mod.load("fmnist-quick", overrides=[*overrides, f"train.device={device}"])
        out = args.runs / name.replace(" ", "").replace(",", "_").replace("(", "").replace(")", "")
        t0 = time.perf_counter()
        train(cfg, out, quiet)
        row = {"variant": name, "overrides": overrides, "train_s": round(time.perf_counter() - t0, 1)}
        model = load_run_model(out, device=str(device))
        for sampler, steps in (("ddpm", None), ("dpm-solver", 25)):
            x = sample(model.model, cfg.diffusion, labels, model.image_shape, seed=0, sampler=sampler, steps=steps)
            row[f"fid_domain_test_{sampler}"] = fid(real, extractor.features_and_logits(x)[0])
        rows.append(row)
        print(f"{name:<28} ddpm {row['fid_domain_test_ddpm']:7.2f}  dpm-solver-25 "
              f"{row['fid_domain_test_dpm-solver']:7.2f}  train {row['train_s']:6.1f}s", flush=True)
    print(f"\n{'variant':<28} {'FID ddpm (T)':>12} {'FID dpm-solver 25':>18} {'train s':>8}")
    for r in rows:
        print(f"{r['variant']:<28} {r['fid_domain_test_ddpm']:>12.2f} {r['fid_domain_test_dpm-solver']:>18.2f} "
              f"{r['train_s']:>8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "n": args.n, "domain_classifier_real_test_accuracy":
            info["real_test_accuracy"], "note": "domain FID against the real test set; not Inception FID"}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
