"""The federated gap: FedAvg, server optimisers and client remedies against the centralized twin at equal compute;
and the FedDM paper's orderings (FID against beta, N, E, federated vs centralized).

    .venv/bin/python bench/fl_gap.py [--preset fmnist-quick] [--n 2000] [--only fedavg,scaffold] [--set k=v ...]
    .venv/bin/python bench/fl_gap.py --grid orderings --preset tiny --set fl.rounds=20

Each variant of the preset is trained from scratch with fedgen's own loop into `--runs/<variant>` (an existing,
complete run is reused), then `n` images with the test set's class proportions are drawn from its global model
(EMA weights; the config's evaluation sampler and steps) and scored by domain FID against the real test set
(fedgen's EvalCNN features; not comparable with Inception FID). Compute is image passes (local epochs x the
images of each trained client, summed over rounds; fedgen compare's definition).

`--grid gap` (default): one variant per strategy plus the centralized twin, given the FedAvg run's compute in whole
epochs. `--grid orderings`: the paper's base (N=10 all participating, beta=0.5, E=5) and its variations
beta in {0.1, 5}, N in {30, 50} with K=10, E in {1, 10}, and the centralized baseline (R x E epochs, the paper's
definition), for each of `--strategies`. Prints a table, writes JSON. Scores are kept in each run dir, so the grid
can be split across processes (`--strategies fedavg,centralized` and `--strategies scaffold` with one thread each)
and tabled by a last call with all of them.
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
from fedgen.federation.rundir import RunDir
from fedgen.runs.compare import cumulative_compute
from fedgen.runs.load import load_run_model
from fedgen.runtimes.local import train

ORDERINGS: dict[str, list[str]] = {
    "base": [],
    "beta0.1": ["data.beta=0.1"],
    "beta5": ["data.beta=5"],
    "n30": ["fl.clients=30", "fl.clients_per_round=10"],
    "n50": ["fl.clients=50", "fl.clients_per_round=10"],
    "e1": ["fl.local_epochs=1"],
    "e10": ["fl.local_epochs=10"],
}
ORDERINGS_BASE = ["fl.clients=10", "fl.clients_per_round=none", "data.beta=0.5", "fl.local_epochs=5"]

VARIANTS: dict[str, list[str]] = {
    "fedavg": [],
    "fedavgm": ["fl.strategy=fedavgm"],
    "fedadam": ["fl.strategy=fedadam", "fl.server_lr=1e-2"],
    "fedyogi": ["fl.strategy=fedyogi", "fl.server_lr=1e-2"],
    "fedprox": ["fl.strategy=fedprox", "fl.prox_mu=0.01"],
    "scaffold": ["fl.strategy=scaffold"],
    "centralized": ["fl.centralized=true"],
}


def _jobs(args) -> list[tuple[str, list[str]]]:
    """(variant name, overrides) in run order; "centralized" of the gap grid is sized after the federated runs."""
    if args.grid == "gap":
        names = args.only.split(",") if args.only else list(VARIANTS)
        return [(n, VARIANTS[n]) for n in sorted(names, key=lambda n: n == "centralized")]
    strategies = args.strategies.split(",")
    jobs = [(f"{v}/{strategy}", [*ORDERINGS_BASE, *ORDERINGS[v], *VARIANTS[strategy]])
            for strategy in strategies if strategy != "centralized" for v in ORDERINGS]
    centralized = [("centralized", [*ORDERINGS_BASE, "fl.centralized=true"])] if "centralized" in strategies else []
    return [*jobs, *centralized]


def _score(run: Path, cfg, n: int, labels, real, extractor, classifier_key: str, device) -> dict:
    """Domain FID of the run's global model, kept in the run dir so that a later invocation over the same runs
    (another --strategies split, a combined table) does not sample again; keyed by everything the score depends on."""
    key = {"rounds": cfg.fl.rounds, "n": n, "sampler": cfg.eval.sampler, "steps": cfg.eval.steps,
           "bf16": cfg.eval.bf16, "seed": 0, "domain_classifier": classifier_key}
    cache = run / "fl_gap_score.json"
    if cache.exists() and (kept := json.loads(cache.read_text())).get("key") == key:
        return kept["score"]
    model = load_run_model(run, device=str(device))
    x = sample(model.model, cfg.diffusion, labels, model.image_shape, seed=0, sampler=cfg.eval.sampler,
               steps=cfg.eval.steps, bf16=cfg.eval.bf16)
    score = {"fid_domain_test": fid(real, extractor.features_and_logits(x)[0]), "weights": model.weights}
    cache.write_text(json.dumps({"key": key, "score": score}))
    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=["gap", "orderings"], default="gap")
    ap.add_argument("--preset", default="fmnist-quick")
    ap.add_argument("--n", type=int, default=2000, help="generated images per variant")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default=None, help="gap: comma-separated variant names")
    ap.add_argument("--strategies", default="fedavg,scaffold,centralized",
                    help="orderings: the strategies to run each variation for; centralized: the baseline once")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every variant")
    ap.add_argument("--centralized-rounds", type=int, default=None, help="gap: epochs of the centralized twin")
    ap.add_argument("--runs", type=Path, default=None, help="default: bench/results/<grid>")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/fl_<grid>.json")
    args = ap.parse_args()
    runs = args.runs or Path(f"bench/results/{args.grid}")
    out_json = args.out or Path(f"bench/results/fl_{args.grid}.json")
    device = resolve_device(args.device)
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    base = config_mod.load(args.preset, overrides=args.overrides)
    ds = load_reference(base.data)
    extractor, info = domain_extractor(ds, device=device, epochs=base.eval.classifier_epochs)
    real, _ = real_features(extractor, info["cache_key"], "test", ds.test.images)
    labels = labels_like(ds.test.labels, args.n, ds.num_classes)
    rows, fed_compute, train_size = [], None, None
    for name, variant in _jobs(args):
        overrides = [*args.overrides, *variant, f"train.device={device}"]
        if name == "centralized" and args.grid == "gap":  # whole epochs over all the data, ~ the FedAvg compute
            epochs = args.centralized_rounds or max(1, round(fed_compute / train_size))
            overrides += [f"fl.rounds={epochs}", "fl.local_epochs=1"]
        cfg = config_mod.load(args.preset, overrides=overrides)
        out = runs / name
        t0 = time.perf_counter()
        train(cfg, out, quiet)
        records = RunDir(out).read_metrics()
        compute = cumulative_compute(records, cfg)
        row = {"variant": name, "overrides": overrides, "run": str(out), "train_s": round(time.perf_counter() - t0, 1),
               "rounds": cfg.fl.rounds, "image_passes": compute[cfg.fl.rounds],
               "global_test_loss": [r for r in records if r.get("event") == "round"][-1].get("global_test_loss")}
        if fed_compute is None and name != "centralized":
            fed_compute, train_size = row["image_passes"], sum(records[0]["client_sizes"])
        row.update(_score(out, cfg, args.n, labels, real, extractor, info["cache_key"], device))
        rows.append(row)
        print(f"{name:<18} FID {row['fid_domain_test']:7.2f}  test loss {row['global_test_loss']:.4f}  "
              f"passes {row['image_passes']:>10,.0f}  train {row['train_s']:6.1f}s", flush=True)
    cen = next((r for r in rows if r["variant"] == "centralized"), None)
    print(f"\n{args.preset} {' '.join(args.overrides)}; {base.eval.sampler} {base.eval.steps} steps, n={args.n}")
    print(f"{'variant':<18} {'FID (domain)':>12} {'/ centralized':>13} {'test loss':>10} {'image passes':>13}")
    for r in rows:
        ratio = f"{r['fid_domain_test'] / cen['fid_domain_test']:.2f}x" if cen else "-"
        print(f"{r['variant']:<18} {r['fid_domain_test']:>12.2f} {ratio:>13} {r['global_test_loss']:>10.4f} "
              f"{r['image_passes']:>13,.0f}")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"grid": args.grid, "preset": args.preset, "overrides": args.overrides, "device": device_name(device),
            "n": args.n, "sampler": base.eval.sampler, "steps": base.eval.steps, "bf16": base.eval.bf16,
            "domain_classifier_real_test_accuracy": info["real_test_accuracy"],
            "note": "domain FID against the real test set (EvalCNN features), not Inception FID"}
    out_json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
