"""The privacy measurements as one table: for each run directory that `bench/privacy_runs.sh OUT` trained, its
formal epsilon (or none), training wall time, domain FID and TSTR (from `fedgen evaluate`) and the audit
(`fedgen audit`): membership-inference AUC and TPR at 1% FPR with 95% bootstrap intervals, the DP check, and
near-copies.

    bench/privacy_runs.sh OUT && .venv/bin/python bench/privacy.py OUT [--json docs/bench/privacy_cpu.json]

Reads only the runs' metrics.jsonl and config.toml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import device_name

from fedgen.federation.rundir import RunDir


def summarise(path: Path) -> dict:
    run = RunDir(path)
    cfg = run.config()
    records = run.read_metrics()
    rounds = [r for r in records if r.get("event") == "round"]
    evaluation = next((r for r in reversed(records) if r.get("event") == "evaluate"), {})
    audit = next((r for r in reversed(records) if r.get("event") == "audit"), {})
    privacy = rounds[-1]["privacy"] if rounds else None
    out = {
        "run": path.name, "algorithm": cfg.algorithm, "rounds": len(rounds), "privacy_mode": cfg.privacy.mode,
        "cpu_threads": cfg.train.cpu_threads, "device": next((r["device"] for r in records if r.get("event") ==
                                                               "start"), None),
        "epsilon": privacy["epsilon"] if isinstance(privacy, dict) else None,
        "delta": privacy["delta"] if isinstance(privacy, dict) else None,
        "accountant": privacy["accountant"] if isinstance(privacy, dict) else "no formal guarantee",
        "train_time_s": round(sum(r["train_time_s"] for r in rounds), 1),
        "fid_domain_test": evaluation.get("fid_domain_test"), "fid_generated": evaluation.get("generated"),
        "tstr_accuracy": evaluation.get("tstr_accuracy"), "tstr_generated": evaluation.get("tstr_generated"),
    }
    for key in ("mia_loss_auc", "mia_loss_auc_ci", "mia_loss_tpr_at_1pct_fpr", "mia_loss_tpr_at_1pct_fpr_ci",
                "mia_loss_timestep", "mia_loss_targets", "mia_loss_respects_dp_bound",
                "mia_loss_epsilon_lower_bound_95", "mia_distance_auc", "mia_distance_auc_ci",
                "mia_distance_tpr_at_1pct_fpr", "mia_distance_respects_dp_bound",
                "mia_distance_epsilon_lower_bound_95", "memorisation_near_copies", "memorisation_ratio_median",
                "generated", "non_member_source"):
        out[key] = audit.get(key)
    return out


def _fmt(value, digits=3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{v:.{digits}f}" for v in value) + "]"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder bench/privacy_runs.sh wrote")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [summarise(p) for p in sorted(args.out.iterdir()) if (p / "config.toml").exists()]
    cols = ["run", "epsilon", "train_time_s", "fid_domain_test", "tstr_accuracy", "mia_loss_auc", "mia_loss_auc_ci",
            "mia_loss_tpr_at_1pct_fpr", "mia_distance_auc", "mia_distance_auc_ci", "memorisation_near_copies",
            "mia_loss_respects_dp_bound", "mia_loss_epsilon_lower_bound_95"]
    machine = device_name(torch.device("cpu")).rsplit(",", 1)[0]
    print(f"machine: {machine}; threads per run: {sorted({str(r['cpu_threads']) for r in rows})}")
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(_fmt(row[c]) for c in cols))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "runs": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
