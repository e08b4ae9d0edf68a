"""Per-round wall time of the same work in-process, on Flower's simulation engine and in a Flower deployment.

    .venv/bin/python bench/runtime_overhead.py [--workloads tiny,fmnist-quick] [--rounds 3]
        [--runtimes local,flower-sim,flower] [--out bench/results/runtime_overhead.json]

Workloads are presets (FedDM or PGA; for PGA the table adds generator steps per second). Each (workload, runtime)
trains a fresh run of the preset with `fl.rounds` set to --rounds and one CPU thread per
client (so the three runtimes compute bit-identical weights), into bench/results/runtimes/. The deployment is a
SuperLink and one SuperNode per silo on 127.0.0.1 with TLS and SuperNode authentication, started with fedgen's
own commands and stopped by PID. Reported per run: the median per-round wall time (fit + the silos' loss
evaluation + aggregation, from metrics.jsonl), the time outside rounds (start-up, node discovery, the final sample
grid), the tensor
bytes moved per round, and the ratio to in-process. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import device_name

from fedgen.federation.rundir import RunDir
from fedgen.runtimes.flower.deploy.local import LocalDeployment

BIN = Path(sys.executable).parent


def _train(runtime: str, preset: str, rounds: int, out: Path, flags: list[str]) -> float:
    sets = [f"fl.rounds={rounds}", "train.cpu_threads=1"]
    cmd = [str(BIN / "fedgen"), "train", "--preset", preset, "--runtime", runtime, "--out", str(out), *flags,
           *[a for s in sets for a in ("--set", s)]]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def _deployed(preset: str, rounds: int, out: Path, clients: int) -> float:
    with tempfile.TemporaryDirectory(prefix="fedgen-bench-") as tmp, LocalDeployment(Path(tmp), 18500) as dep:
        certs = Path(tmp) / "certs"
        subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(certs), "--nodes", str(clients)],
                       check=True, capture_output=True)
        dep.start_superlink(certs)
        for silo in range(clients):
            dep.start_supernode(certs, silo, certs / f"node-{silo + 1}")
        return _train("flower", preset, rounds, out, ["--superlink", dep.superlink, "--certs", str(certs)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="tiny,fmnist-quick")
    ap.add_argument("--runtimes", default="local,flower-sim,flower")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/runtime_overhead.json"))
    args = ap.parse_args()
    from fedgen import config as config_mod

    rows = []
    for preset in args.workloads.split(","):
        clients = config_mod.load(preset).fl.clients
        for runtime in args.runtimes.split(","):
            out = Path("bench/results/runtimes") / f"{preset}-{runtime}"
            shutil.rmtree(out, ignore_errors=True)
            if runtime == "flower":
                wall = _deployed(preset, args.rounds, out, clients)
            else:
                wall = _train(runtime, preset, args.rounds, out, [])
            records = RunDir(out).read_metrics()
            rounds = [r for r in records if r["event"] == "round"]
            per_round = statistics.median(r["time_s"] for r in rounds)
            rows.append({"workload": preset, "runtime": runtime, "rounds": len(rounds), "wall_s": round(wall, 1),
                         "median_round_s": per_round,
                         "outside_rounds_s": round(wall - sum(r["time_s"] for r in rounds), 1),
                         "bytes_per_round": statistics.median(r["bytes_down"] + r["bytes_up"]
                                                              + r.get("bytes_eval_down", 0) for r in rounds)})
            if "steps" in rounds[0]:  # PGA: generator steps per second
                rows[-1]["generator_steps_per_s"] = round(rounds[0]["steps"] / per_round, 2)
            print(f"{preset:<13} {runtime:<10} median round {per_round:7.2f}s  wall {wall:7.1f}s", flush=True)
    for row in rows:
        base = next(r for r in rows if r["workload"] == row["workload"] and r["runtime"] == "local")
        row["round_ratio_vs_local"] = round(row["median_round_s"] / base["median_round_s"], 2)
    print(f"\n{'workload':<13} {'runtime':<10} {'round s':>8} {'x local':>8} {'other s':>10} {'MB/round':>9}")
    for r in rows:
        print(f"{r['workload']:<13} {r['runtime']:<10} {r['median_round_s']:>8.2f} {r['round_ratio_vs_local']:>8.2f} "
              f"{r['outside_rounds_s']:>10.1f} {r['bytes_per_round'] / 1e6:>9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(torch.device("cpu")), "rounds": args.rounds, "note": "one CPU thread per client"}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
