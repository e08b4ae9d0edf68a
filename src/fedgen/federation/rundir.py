"""A run is a directory (docs/DESIGN.md §4): its id, config, partition, metrics, checkpoints, samples, silo
models.

The run's id (`run.json`) is made once, when the run is created, and never changes: silos key their persistent
state (privacy accounts, noise secrets, control variates, discriminators) by it, so every change `fedgen train`
allows on an existing run (more rounds, `runtime.*`) keeps that state. One process trains a run directory at a
time: `RunDir.lock()` holds an exclusive lock (`.lock`, naming the holder's PID and host) for the whole of
training; a lock left by a process that died is released by the operating system with it.

Checkpoints are committed atomically: a round is written to `checkpoints/round_NNNN.tmp/` and renamed
to `round_NNNN/` only when complete, so killing the process at any moment leaves the last complete
round intact. Client models trained in a round ride in that round's directory and are moved to
`clients/` only after the rename (and again on load, should the move have been interrupted).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedgen import config as config_mod
from fedgen.config import Config
from fedgen.core.errors import FedgenError
from fedgen.core.records import State
from fedgen.data.partition import Partition


def now_utc() -> str:
    """The wall clock as metrics.jsonl records it: UTC, ISO 8601, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RunDirError(FedgenError, RuntimeError):
    """The run directory cannot be used for this config."""


@dataclass
class Checkpoint:
    round: int  # rounds completed
    global_state: State
    optimizer_state: dict | None
    extra: dict
    ema: tuple[State, int] | None = None  # the EMA of the global weights (a full state) and its update count


def _load_ema(path: Path, device) -> tuple[State, int] | None:
    if not path.exists():
        return None
    with safe_open(path, framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, int((f.metadata() or {})["updates"])


def _contiguous(state: State) -> State:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


class RunLockedError(RunDirError):
    """Another process is training this run directory."""


def dedupe_rounds(records: list[dict]) -> list[dict]:
    """`records` with one `round` record per round: where a round was recorded twice (two writers, or a record
    from before this check existed), the later record, at its place. Counting a round twice would inflate the
    rounds, the compute and (through the ledger) could mix two releases."""
    last = {int(r["round"]): i for i, r in enumerate(records) if r.get("event") == "round"}
    return [r for i, r in enumerate(records) if r.get("event") != "round" or last[int(r["round"])] == i]


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._new_id: str | None = None

    # layout
    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def partition_path(self) -> Path:
        return self.path / "partition.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def clients(self) -> Path:
        return self.path / "clients"

    def silo_state(self, silo: int) -> Path:
        """Where an in-process (or flower-sim) silo keeps its persistent state (federation/silo_state.py)."""
        return self.path / "silos" / f"silo_{silo:03d}"

    def silo_model_path(self, silo: int) -> Path:
        return self.clients / f"client_{silo:03d}.safetensors"

    def exists(self) -> bool:
        return self.config_path.exists()

    # identity
    @property
    def id_path(self) -> Path:
        return self.path / "run.json"

    def run_id(self) -> str:
        """The run's id: read from `run.json`, or (a run not yet created) made now and written with the config."""
        if self.id_path.exists():
            return str(json.loads(self.id_path.read_text())["run_id"])
        if self._new_id is None:
            self._new_id = uuid.uuid4().hex
        return self._new_id

    # one writer
    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for the whole of training; refuse, naming the holder, while another process
        holds it. The directory is created for the lock and removed again if nothing else was written."""
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                raise RunLockedError(f"{self.path} is being trained by {holder}; one process trains a run at a "
                                     "time: wait for it to finish, or stop it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()} (since "
                          f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC)\n".encode(), 0)
            try:
                yield self
            finally:
                os.ftruncate(fd, 0)
                if created and {p.name for p in self.path.iterdir()} <= {".lock"}:
                    shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(fd)  # releases the lock

    # config
    def check(self, cfg: Config) -> bool:
        """True if this directory already holds a run of `cfg`; refuses a run of another config."""
        if not self.exists():
            return False
        old = config_mod.read(self.config_path)
        changes = config_mod.diff(old, cfg)
        refused = {k: v for k, v in changes.items() if k not in config_mod.RESUMABLE_CHANGES}
        if refused:
            listing = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise RunDirError(
                f"{self.path} holds a run with a different config; refusing to mix them. Changed:\n{listing}\n"
                f"Only {', '.join(config_mod.RESUMABLE_CHANGES)} may change on an existing run "
                "(use a new --out directory)."
            )
        return True

    def wait_unlocked(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for no process to hold the run directory; True once none does."""
        path = self.path / ".lock"
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
            finally:
                os.close(fd)
            time.sleep(0.2)

    def write_config(self, cfg: Config) -> None:
        for d in (self.path, self.checkpoints, self.samples, self.clients):
            d.mkdir(parents=True, exist_ok=True)
        if not self.id_path.exists():
            tmp = self.id_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"run_id": self.run_id(), "created": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"}))
            tmp.replace(self.id_path)
        config_mod.save(cfg, self.config_path)

    def config(self) -> Config:
        if not self.exists():
            raise RunDirError(f"{self.path} is not a fedgen run directory (no config.toml)")
        return config_mod.read(self.config_path)

    def partition(self):
        """The client split this run trains on (partition.json) and its class names (from the start record)."""
        if not self.partition_path.exists():
            raise RunDirError(f"{self.path} has no partition.json (not a fedgen run directory, or never started)")
        part = Partition.load(self.partition_path)
        start = next((r for r in self.read_metrics() if r.get("event") == "start"), {})
        return part, start.get("classes") or [str(k) for k in range(part.counts.shape[1])]

    def check_rounds(self, cfg: Config) -> None:
        """Refuse an fl.rounds below the rounds already committed (it would rewrite history, not train)."""
        done = self.committed_rounds()
        if done and cfg.fl.rounds < done[-1]:
            raise RunDirError(
                f"fl.rounds={cfg.fl.rounds} is below the {done[-1]} rounds {self.path} has completed; a run can be "
                "extended, not shortened (use a new --out directory)"
            )

    # metrics
    def log(self, record: dict) -> None:
        """Append one record, stamped with the wall-clock `time` it was written (UTC, ISO 8601, milliseconds:
        "2026-12-05T23:10:00.123Z"). The stamp is the only field that differs between two runs of one config; the
        training itself never reads it."""
        stamped = record if "time" in record else {**record, "time": now_utc()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(stamped) + "\n")

    def read_metrics(self) -> list[dict]:
        """The run's records, one `round` record per round (`dedupe_rounds`)."""
        return dedupe_rounds(self._raw_metrics())

    def _raw_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def duplicate_rounds(self) -> list[int]:
        """Rounds recorded more than once in metrics.jsonl (read as one: the later record)."""
        seen: dict[int, int] = {}
        for r in self._raw_metrics():
            if r.get("event") == "round":
                seen[int(r["round"])] = seen.get(int(r["round"]), 0) + 1
        return sorted(k for k, n in seen.items() if n > 1)

    def round_records(self) -> list[dict]:
        return [r for r in self.read_metrics() if r.get("event") == "round"]

    def truncate_metrics(self, completed_rounds: int) -> None:
        """Drop round records past the last checkpoint (written by a run killed before it committed)."""
        records = [r for r in self.read_metrics() if r.get("round", 0) <= completed_rounds]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.metrics_path)

    # checkpoints
    def _round_dir(self, r: int) -> Path:
        return self.checkpoints / f"round_{r:04d}"

    def committed_rounds(self) -> list[int]:
        if not self.checkpoints.exists():
            return []
        return sorted(
            int(p.name.split("_")[1]) for p in self.checkpoints.glob("round_*")
            if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").exists()
        )

    def save_checkpoint(self, ckpt: Checkpoint, silo_models: dict[int, State], keep: int) -> None:
        final = self._round_dir(ckpt.round)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "clients").mkdir(parents=True)
        save_file(_contiguous(ckpt.global_state), tmp / "global.safetensors")
        for cid, state in silo_models.items():  # each client's model records the round it was trained in
            save_file(_contiguous(state), tmp / "clients" / f"client_{cid:03d}.safetensors",
                      metadata={"trained_round": str(ckpt.round)})
        if ckpt.optimizer_state is not None:
            torch.save(ckpt.optimizer_state, tmp / "optimizer.pt")
        if ckpt.ema is not None:
            save_file(_contiguous(ckpt.ema[0]), tmp / "ema.safetensors", metadata={"updates": str(ckpt.ema[1])})
        (tmp / "state.json").write_text(json.dumps({"round": ckpt.round, **ckpt.extra}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # the commit point
        self._publish_clients(final)
        for r in self.committed_rounds()[:-keep]:
            shutil.rmtree(self._round_dir(r), ignore_errors=True)

    def _publish_clients(self, round_dir: Path) -> None:
        self.clients.mkdir(exist_ok=True)
        for f in sorted((round_dir / "clients").glob("*.safetensors")):
            f.replace(self.clients / f.name)

    def load_checkpoint(self, device: torch.device | str = "cpu") -> Checkpoint | None:
        """The last committed round, or None. Cleans up half-written rounds."""
        for tmp in self.checkpoints.glob("round_*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        rounds = self.committed_rounds()
        if not rounds:
            return None
        d = self._round_dir(rounds[-1])
        self._publish_clients(d)
        state = json.loads((d / "state.json").read_text())
        opt_path = d / "optimizer.pt"
        return Checkpoint(
            round=state.pop("round"),
            global_state=load_file(d / "global.safetensors", device=str(device)),
            optimizer_state=torch.load(opt_path, map_location=device) if opt_path.exists() else None,
            extra=state,
            ema=_load_ema(d / "ema.safetensors", device),
        )

    def load_silo_model(self, silo: int, device: torch.device | str = "cpu") -> tuple[State, int]:
        """Silo `silo`'s latest local model and the round it was trained in (with K of N clients per round, often
        earlier than the run's last round)."""
        path = self.silo_model_path(silo)
        if not path.exists():
            have = sorted(int(p.stem.split("_")[1]) for p in self.clients.glob("client_*.safetensors"))
            raise RunDirError(
                f"no local model for client {silo} in {self.path} (clients with a model: {have or 'none'})"
            )
        with safe_open(path, framework="pt", device=str(device)) as f:
            trained_round = int((f.metadata() or {}).get("trained_round", -1))
            return {k: f.get_tensor(k) for k in f.keys()}, trained_round
