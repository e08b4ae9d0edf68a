"""`flower-sim`: the run's silos as virtual SuperNodes on Flower's simulation engine (Ray), in this process.

Each virtual node gets `partition-id` = its silo and takes its share of the configured dataset, exactly as an
in-process silo does; the ServerApp runs the shared round loop in a thread of this process, Flower's engine in
the main thread. Messages reach the virtual nodes through `sim_delivery` (one pass per tick over the messages in
flight, not one per virtual node).

Stopping: Ctrl-C or SIGTERM sets `stop`; the ServerApp thread leaves at its next poll, Flower's engine then
finishes the messages in hand, terminates its actors and shuts Ray down, and the interruption reaches the caller
as KeyboardInterrupt (`_signals_stop`; fedgen starts Ray itself first, so that Ray's own SIGTERM handler does not
end the process on the spot). Whatever Ray started that is still alive afterwards (an actor Ray's own shutdown
missed) is ended by `_processes_end_with_this_one`: this process is made the subreaper of its descendants for
the simulation, so an orphaned Ray process stays its descendant and is found and stopped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.simulation import run_simulation
from rich.console import Console

from fedgen.config import Config
from fedgen.federation.rundir import RunDir
from fedgen.runtimes.flower.client_app import app as client_app
from fedgen.runtimes.flower.server_app import SimulationStopped, make_server_app
from fedgen.runtimes.flower.sim_delivery import patched_delivery

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


class _NotTheDeprecation(logging.Filter):
    """Flower 1.41 logs that `run_simulation` is deprecated in favour of `flwr run`; fedgen calls it on purpose
    (the ServerApp must run in this process, with this console), so the notice is not the user's to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()


def train_simulation(cfg: Config, out: Path, console: Console) -> RunDir:
    cpus = cfg.runtime.sim_cpus or os.cpu_count() or 1
    # log_to_driver False: the virtual silos' own output (Ray's coloured "(ClientAppActor pid=...)" lines) stays
    # out of fedgen's; a silo's failure reaches the round loop as its reply, with the reason
    backend = {"client_resources": {"num_cpus": cfg.runtime.sim_cpus_per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                             "log_to_driver": False}}
    flwr_logger, quiet = logging.getLogger("flwr"), _NotTheDeprecation()
    stop = threading.Event()  # set when the engine returns or is interrupted: the ServerApp thread then leaves
    flwr_logger.addFilter(quiet)
    try:
        with _processes_end_with_this_one(), patched_delivery():
            _start_ray(backend["init_args"])
            with _signals_stop(stop) as signalled:
                try:
                    run_simulation(server_app=make_server_app(cfg, Path(out), console, "flower-sim", stop),
                                   client_app=client_app, num_supernodes=cfg.fl.clients, backend_config=backend,
                                   verbose_logging=False)
                except SimulationStopped:
                    raise KeyboardInterrupt(signalled[0] if signalled else "stopped") from None
                finally:
                    stop.set()
                if signalled:  # the signal came after the last exchange: the run is complete, but was asked to stop
                    raise KeyboardInterrupt(signalled[0])
    finally:
        flwr_logger.removeFilter(quiet)
    return RunDir(out)


def _start_ray(init_args: dict) -> None:
    """Ray, started as Flower's RayBackend would (`init_ray`: this process's sys.path handed to the workers), but
    before the engine, so that `_signals_stop` can take SIGTERM back: Ray's driver installs a native SIGTERM
    handler that prints a stack and ends the process at once, with no cleanup."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)


@contextmanager
def _signals_stop(stop: threading.Event) -> Iterator[list[str]]:
    """The first Ctrl-C or SIGTERM sets `stop`: the ServerApp leaves at its next poll, the engine's workers finish
    the message in hand and stop, the engine terminates its actors and Ray, and `train_simulation` raises
    KeyboardInterrupt (yields the list that then names the signal). Stopping Ray under a message in hand would
    end the process from inside Ray instead ("the core worker has already been shutdown"). A second signal
    raises KeyboardInterrupt at once. Ray's driver installs a native SIGTERM handler that ends the process on the
    spot; fedgen starts Ray first (`_start_ray`) and installs this one after it. An ignored SIGINT (nohup) stays
    ignored."""
    signalled: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield signalled
        return

    def on_signal(signum, frame):
        name = f"stopped by {signal.Signals(signum).name}"
        if signalled:
            raise KeyboardInterrupt(name)
        signalled.append(name)
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, on_signal)
    try:
        yield signalled
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    return fields[0], int(fields[1])


def _children_by_parent(zombies: bool = False) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _state_and_parent(int(entry))) is not None:
            if zombies or stat[0] != "Z":  # a zombie has ended; it only waits to be reaped
                children.setdefault(stat[1], []).append(int(entry))
    return children


def descendants(pid: int) -> set[int]:
    """The live processes below `pid` (Linux /proc; empty elsewhere)."""
    if not os.path.isdir("/proc"):
        return set()
    children, found, todo = _children_by_parent(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _set_subreaper(on: bool) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


@contextmanager
def _processes_end_with_this_one(grace_s: float = 5.0) -> Iterator[None]:
    """Every process started below this one inside the block is gone when it ends: Ray is shut down if it is still
    up, then any remaining new descendant gets SIGTERM and, after `grace_s`, SIGKILL."""
    me = os.getpid()
    before = descendants(me)
    reaper = _set_subreaper(True)  # an orphan (an actor whose raylet died first) becomes ours, not init's
    try:
        yield
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            _stop(descendants(me) - before, grace_s)
            for pid in set(_children_by_parent(zombies=True).get(me, [])) - before:  # ended orphans Ray left us
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # another part of this process reaped it
                    pass
            if reaper:
                _set_subreaper(False)


def _stop(pids: set[int], grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 1.0)
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:  # ours (as subreaper): reaped
                        pids.discard(pid)
                except ChildProcessError:  # not our child: gone once /proc no longer lists it alive
                    if not _alive(pid):
                        pids.discard(pid)
            time.sleep(0.05)
        if not pids:
            return


def _alive(pid: int) -> bool:
    stat = _state_and_parent(pid)
    return stat is not None and stat[0] != "Z"
