"""Per-round wall time of the same work in-process, on Flower's simulation engine and in a Flower deployment.

    .venv/bin/python bench/runtime_overhead.py [--workloads tiny,fmnist-quick] [--rounds 3]
        [--runtimes local,flower-sim,flower] [--out bench/results/runtime_overhead.json]
    .venv/bin/python bench/runtime_overhead.py --workloads smoke --runtimes local,flower-sim \
        --clients 10,100,1000 --per-round 10 --rounds 3      # the N sweep: many virtual clients, K of them a round

With --clients, each workload runs once per N with `fl.clients=N`, `fl.clients_per_round=K` (--per-round) and an
IID split, and the table adds the start-up (launch to the first round) and the peak memory of the run's processes
(fedgen and everything it started, Ray's included: the sum of their resident sets, sampled every 0.2 s).

Workloads are presets (FedDM or PGA; for PGA the table adds generator steps per second). Each (workload, runtime)
trains a fresh run of the preset with `fl.rounds` set to --rounds and one CPU thread per
client (so the three runtimes compute bit-identical weights), into bench/results/runtimes/. The deployment is a
SuperLink and one SuperNode per silo on 127.0.0.1 with TLS and SuperNode authentication, started with fedgen's
own commands and stopped by PID: `flower` with fedgen's fast path (the default), `flower-stock` with Flower's
stock SuperNodes (`--no-fast`). Reported per run: the median per-round wall time (fit + the silos' loss
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
from datetime import UTC, datetime
from pathlib import Path

import torch
from common import device_name

from fedgen.federation.rundir import RunDir
from fedgen.runtimes.flower.deploy.local import LocalDeployment

BIN = Path(sys.executable).parent


def _rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its live descendants (Linux /proc)."""
    from fedgen.runtimes.flower.simulation import descendants

    total = 0
    for p in {pid} | descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def _train(runtime: str, preset: str, rounds: int, out: Path, flags: list[str],
           extra_sets: tuple[str, ...] = ()) -> tuple[float, int]:
    """Wall seconds of `fedgen train`, and the peak memory of its processes."""
    sets = [f"fl.rounds={rounds}", "train.cpu_threads=1", *extra_sets]
    cmd = [str(BIN / "fedgen"), "train", "--preset", preset, "--runtime", runtime, "--out", str(out), *flags,
           *[a for s in sets for a in ("--set", s)]]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _rss_bytes(proc.pid))
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read()[-4000:]}")
    return seconds, peak


def _deployed(preset: str, rounds: int, out: Path, clients: int, sets: tuple[str, ...], fast: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="fedgen-bench-") as tmp, LocalDeployment(Path(tmp), 18500) as dep:
        certs = Path(tmp) / "certs"
        subprocess.run([str(BIN / "fedgen"), "flower", "certs", "--out", str(certs), "--nodes", str(clients)],
                       check=True, capture_output=True)
        dep.start_superlink(certs)
        for silo in range(clients):
            dep.start_supernode(certs, silo, certs / f"node-{silo + 1}", *([] if fast else ["--no-fast"]))
        return _train("flower", preset, rounds, out, ["--superlink", dep.superlink, "--certs", str(certs)],
                      sets)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="tiny,fmnist-quick")
    ap.add_argument("--runtimes", default="local,flower-sim,flower",
                    help="of local, flower-sim, flower (a deployment with fedgen's fast path) and flower-stock (a "
                    "deployment of Flower's stock SuperNodes: `fedgen flower supernode --no-fast`)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default=None, help="the N sweep: comma-separated fl.clients values")
    ap.add_argument("--per-round", type=int, default=10, help="the N sweep: fl.clients_per_round (K)")
    ap.add_argument("--set", action="append", default=[], help="an extra override for every run (the N sweep)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/runtime_overhead.json"))
    args = ap.parse_args()
    from fedgen import config as config_mod

    rows = []
    sweep = [int(n) for n in args.clients.split(",")] if args.clients else [None]
    for preset in args.workloads.split(","):
        for n in sweep:
            clients = n or config_mod.load(preset).fl.clients
            sets = tuple(args.set) if n is None else (f"fl.clients={n}", f"fl.clients_per_round="
                                                      f"{min(args.per_round, n)}", "data.partition=iid", *args.set)
            for runtime in args.runtimes.split(","):
                rows.append(_measure(preset, runtime, args.rounds, clients, sets))
    for row in rows:
        base = next(r for r in rows if r["workload"] == row["workload"] and r["runtime"] == "local"
                    and r["clients"] == row["clients"])
        row["round_ratio_vs_local"] = round(row["median_round_s"] / base["median_round_s"], 2)
    print(f"\n{'workload':<13} {'N':>5} {'runtime':<10} {'round s':>8} {'x local':>8} {'start s':>8} {'other s':>8} "
          f"{'MB/round':>9} {'peak MB':>8}")
    for r in rows:
        print(f"{r['workload']:<13} {r['clients']:>5} {r['runtime']:<10} {r['median_round_s']:>8.2f} "
              f"{r['round_ratio_vs_local']:>8.2f} {r['startup_s']:>8.1f} {r['outside_rounds_s']:>8.1f} "
              f"{r['bytes_per_round'] / 1e6:>9.2f} {r['peak_memory_bytes'] / 2**20:>8.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(torch.device("cpu")), "rounds": args.rounds, "note": "one CPU thread per client",
            "clients_per_round": args.per_round if args.clients else None}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


def _measure(preset: str, runtime: str, rounds: int, clients: int, sets: tuple[str, ...]) -> dict:
    name = f"{preset}-{runtime}" + (f"-n{clients}" if sets else "")
    out = Path("bench/results/runtimes") / name
    shutil.rmtree(out, ignore_errors=True)
    launched = datetime.now(UTC)
    if runtime in ("flower", "flower-stock"):  # processes not below this one: peak memory not measured
        wall, peak = _deployed(preset, rounds, out, clients, sets, fast=runtime == "flower"), 0
    else:
        wall, peak = _train(runtime, preset, rounds, out, [], sets)
    records = RunDir(out).read_metrics()
    rounds_done = [r for r in records if r["event"] == "round"]
    start = next(r for r in records if r["event"] == "start")
    per_round = statistics.median(r["time_s"] for r in rounds_done)
    row = {"workload": preset, "runtime": runtime, "clients": clients, "overrides": list(sets),
           "rounds": len(rounds_done), "wall_s": round(wall, 1), "median_round_s": per_round,
           "round_times_s": [r["time_s"] for r in rounds_done],
           "startup_s": round((datetime.fromisoformat(start["time"]) - launched).total_seconds(), 1),
           "outside_rounds_s": round(wall - sum(r["time_s"] for r in rounds_done), 1),
           "peak_memory_bytes": peak,
           "bytes_per_round": statistics.median(r["bytes_down"] + r["bytes_up"] + r.get("bytes_eval_down", 0)
                                                for r in rounds_done)}
    if "steps" in rounds_done[0]:  # PGA: generator steps per second
        row["generator_steps_per_s"] = round(rounds_done[0]["steps"] / per_round, 2)
    print(f"{preset:<13} N={clients:<5} {runtime:<10} median round {per_round:7.2f}s  start-up "
          f"{row['startup_s']:6.1f}s  wall {wall:7.1f}s  peak {peak / 2**20:6.0f} MB", flush=True)
    return row


if __name__ == "__main__":
    main()
