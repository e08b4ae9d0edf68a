"""Domain FID against network evaluations (NFE) for each sampler, on one trained run.

    .venv/bin/python bench/sampler_fid.py runs/demo [--n 2000] [--out bench/results/sampler_fid.json]

For each (sampler, steps) it generates `n` labelled images with the test set's class proportions from the
run's global model and reports domain FID against the real test set (features of the cached domain
classifier; not comparable with Inception FID) and the wall time. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import device_name

from fedgen.data.prepare import load_reference
from fedgen.diffusion.sampling import sample
from fedgen.evaluation.evaluate import labels_like, real_features
from fedgen.evaluation.features import domain_extractor
from fedgen.evaluation.generative import fid
from fedgen.runs.load import load_run_model

GRID = [("ddpm", None), ("ddpm", 25), ("ddpm", 20), ("ddim", 20), ("dpm-solver", 20), ("dpm-solver", 10),
        ("dpm-solver-3", 20), ("dpm-solver-3", 10), ("dpm-solver-sde", 20), ("unipc", 20), ("unipc", 10),
        ("unipc", 5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=2000, help="generated images per setting")
    ap.add_argument("--out", type=Path, default=Path("bench/results/sampler_fid.json"))
    ap.add_argument("--grid", default=None, help="sampler:steps,... (default: the built-in grid)")
    ap.add_argument("--raw", action="store_true", help="the plain global weights, not their EMA")
    ap.add_argument("--fp32", action="store_true", help="float32 network (default: bf16 autocast)")
    args = ap.parse_args()
    grid = GRID if args.grid is None else [(s.split(":")[0], int(s.split(":")[1])) for s in args.grid.split(",")]
    loaded = load_run_model(args.run, raw=args.raw)
    cfg = loaded.cfg
    ds = load_reference(cfg.data)
    device = next(loaded.model.parameters()).device
    extractor, info = domain_extractor(ds, device=device, epochs=cfg.eval.classifier_epochs)
    real, _ = real_features(extractor, info["cache_key"], "test", ds.test.images)
    labels = labels_like(ds.test.labels, args.n, ds.num_classes)
    rows = []
    for sampler, steps in grid:
        steps = steps or cfg.diffusion.timesteps
        t0 = time.perf_counter()
        x = sample(loaded.model, cfg.diffusion, labels, loaded.image_shape, seed=0, sampler=sampler, steps=steps,
                   bf16=not args.fp32)
        seconds = time.perf_counter() - t0
        feats, _ = extractor.features_and_logits(x)
        rows.append({"sampler": sampler, "nfe": steps, "fid_domain_test": fid(real, feats), "seconds": seconds,
                     "images_per_s": args.n / seconds})
        r = rows[-1]
        print(f"{sampler:<14} NFE {steps:>4}  fid_domain_test {r['fid_domain_test']:8.3f}  {seconds:7.1f}s", flush=True)
    print(f"\n{loaded.source}, {'fp32' if args.fp32 else 'bf16 autocast'}, n={args.n}")
    print(f"{'sampler':<14} {'NFE':>4} {'fid_domain_test':>16} {'seconds':>8} {'img/s':>7}")
    for r in rows:
        print(f"{r['sampler']:<14} {r['nfe']:>4} {r['fid_domain_test']:>16.3f} {r['seconds']:>8.1f} "
              f"{r['images_per_s']:>7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"run": str(args.run), "round": loaded.round, "n": args.n, "device": device_name(device),
            "weights": loaded.weights, "precision": "fp32" if args.fp32 else "bf16 autocast",
            "threads": torch.get_num_threads(), "domain_classifier_real_test_accuracy":
            info["real_test_accuracy"], "note": "domain FID: features of fedgen's EvalCNN, not Inception"}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
