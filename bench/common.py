"""What the bench scripts share: a name for the device a number was measured on; `fedgen` in a subprocess, and a
run's TSTR evaluation record."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU's model name and thread count (timings differ a lot between CPUs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def fedgen(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fedgen.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fedgen {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def tstr_fields(ev: dict) -> dict:
    """What a bench row keeps of an evaluate record: TSTR against the real-data CNNs, domain FID and agreement."""
    keys = ("tstr_accuracy", "tstr_generated", "local_real_accuracy_mean", "local_real_accuracy",
            "real_train_real_test_accuracy", "tstr_minus_local_mean", "fid_domain_test", "label_agreement_domain")
    return {k: ev.get(k) for k in keys}


def evaluation(run: Path, weights: str, baselines: bool = True) -> dict:
    """The run's `fedgen evaluate --tstr --n 10000` record with these weights: the last one logged after the
    run's last round (evaluating again gives the same numbers), else a new evaluation. `baselines=False`: without
    the silos' own CNNs (`--no-baselines`; a record that has them is taken too)."""
    def found() -> dict | None:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last_round = max(r["round"] for r in records if r.get("event") == "round")
        return next((r for r in reversed(records) if r.get("event") == "evaluate" and r.get("weights") == weights
                     and r.get("round") == last_round and r.get("generated") == 10000
                     and r.get("tstr_accuracy") is not None
                     and (not baselines or r.get("local_real_accuracy_mean") is not None)), None)

    if found() is None:
        fedgen("evaluate", str(run), "--tstr", "--n", "10000", *(["--raw"] if weights == "raw" else []),
               *([] if baselines else ["--no-baselines"]))
    return found()
