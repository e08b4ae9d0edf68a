"""fedgen's Flower ServerApp: the shared round loop (federation/loop.py) with a silo pool built on Flower's Grid.

Node ids are Flower's (random 64-bit integers); silos are fedgen's (0..N-1). The pool learns which silo each
node holds by a `describe` query, the first time it sees the node, so a node that dies and comes back (or is
replaced) is picked up at the next round. Every message has a TTL and every exchange a timeout; a silo whose
node is offline, fails, or does not answer in time is a `Failure`, and the loop decides whether the round can
complete without it (`fl.min_clients`).
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import ExitCode
from rich.console import Console

from fedgen import config as config_mod
from fedgen.algorithms.coordinators import make_algorithm
from fedgen.config import Config
from fedgen.core.errors import FedgenError, UsageError
from fedgen.core.progress import task
from fedgen.core.records import Failure, Reply, Request
from fedgen.data.partition import Partition
from fedgen.data.prepare import load_reference
from fedgen.data.silos import SiloData
from fedgen.data.sources import DatasetError
from fedgen.federation import loop
from fedgen.federation.rundir import RunDir
from fedgen.federation.silos import Federation, SiloInfo, partition_from_counts
from fedgen.runtimes.flower.codec import decode_reply, request_message

POLL_S = {"flower": 0.05, "flower-sim": 0.01}  # between pulls of replies: over HTTPS, or in this process's memory
MAP_SHOWN = 12  # silo -> node pairs named at the start
SILENT_RETRY_S = 60.0  # Flower marks a dead node offline after at most 2 missed 30 s heartbeats


class SimulationStopped(FedgenError):
    """The simulation engine was stopped (Ctrl-C, SIGTERM): the ServerApp thread leaves at its next poll."""


class FlowerPool:
    def __init__(self, grid: Grid, run: dict, ttl: float, console: Console, expected: dict,
                 stop: threading.Event | None = None, poll_s: float = POLL_S["flower"]):
        self.grid = grid
        self.stop = stop
        self.poll_s = poll_s
        self.run = run
        self.ttl = ttl
        self.console = console
        self.expected = expected  # classes and image shape every silo must have (once known)
        self.node_of: dict[int, int] = {}  # silo -> node id
        self.silent_until: dict[int, float] = {}  # node -> when to ask it again after it did not answer
        self.exchanges = 0

    # -- one exchange of messages: push, then pull until every reply is in or the timeout passes
    def _exchange(self, pairs: list[tuple[int, Request]], timeout: float, progress=None,
                  label: str = "") -> dict[int, Reply | Failure]:
        """Node id -> its reply (or Failure), for (node id, request) pairs."""
        self.exchanges += 1
        messages = [request_message(req, self.run, node, self.ttl, str(self.exchanges)) for node, req in pairs]
        ids = list(self.grid.push_messages(messages))
        node_of_message = {mid: node for mid, (node, _) in zip(ids, pairs, strict=True)}
        pending, out = set(ids), {}
        deadline = time.monotonic() + timeout
        with task(progress, label, len(ids)) as advance:
            while pending and time.monotonic() < deadline:
                if self.stop is not None and self.stop.is_set():
                    raise SimulationStopped("the simulation was stopped while the round waited for its silos")
                for message in self.grid.pull_messages(list(pending)):
                    mid = message.metadata.reply_to_message_id
                    if mid not in pending:
                        continue
                    pending.discard(mid)
                    out[node_of_message[mid]] = self._decode(node_of_message[mid], message)
                    if advance is not None:
                        advance()
                if pending:
                    # a pull checks every pending id: with hundreds pending (a simulation's start), poll less often
                    time.sleep(max(self.poll_s, 1e-4 * len(pending)))
        for mid in pending:
            node = node_of_message[mid]
            out[node] = Failure(-1, f"no reply from node {node} within {timeout:g}s (runtime.round_timeout_s)")
        return out

    @staticmethod
    def _decode(node: int, message: Message) -> Reply | Failure:
        if message.has_error():
            return Failure(-1, f"node {node}: Flower error {message.error.code}: {message.error.reason.strip()[:300]}")
        return decode_reply(message)

    # -- which node holds which silo
    def discover(self, timeout: float) -> dict[int, Reply | Failure]:
        """Describe every online node not yet mapped to a silo; forget nodes that went offline."""
        online = set(self.grid.get_node_ids())
        for silo, node in list(self.node_of.items()):
            if node not in online:
                del self.node_of[silo]
        now = time.monotonic()
        new = sorted(node for node in online - set(self.node_of.values()) if self.silent_until.get(node, 0) <= now)
        if not new:
            return {}
        replies = self._exchange([(node, Request(-1, "describe", config=self.expected)) for node in new], timeout)
        for node, reply in replies.items():
            if isinstance(reply, Failure):  # dead but not yet marked offline (Flower: up to 60 s): ask later
                self.silent_until[node] = time.monotonic() + SILENT_RETRY_S
            if isinstance(reply, Reply) and "error" not in reply.config:
                holder = self.node_of.get(reply.silo)
                if holder is not None and holder != node:
                    raise FedgenError(f"nodes {holder} and {node} both hold silo {reply.silo} (partition-id): "
                                      "give every SuperNode its own")
                self.node_of[reply.silo] = node
                if self.expected.get("classes") is None:
                    self.expected = {"classes": reply.config["classes"], "image_shape": reply.config["image_shape"]}
        return replies

    def send(self, requests: list[Request], timeout: float, progress=None) -> dict[int, Reply | Failure]:
        rejoined = self.discover(timeout)
        for node, reply in rejoined.items():
            if isinstance(reply, Reply) and "error" not in reply.config:
                self.console.print(f"node {node} (silo {reply.silo}) joined", highlight=False)
        out: dict[int, Reply | Failure] = {}
        pairs = []
        for req in requests:
            node = self.node_of.get(req.silo)
            if node is None:
                out[req.silo] = Failure(req.silo, f"no SuperNode online for silo {req.silo}")
            else:
                pairs.append((node, req))
        kind = requests[0].kind if requests else ""
        label = f"{kind}: replies" if kind == "fit" else ""
        replies = self._exchange(pairs, timeout, progress if kind == "fit" else None, label) if pairs else {}
        for node, req in pairs:
            reply = replies[node]
            if isinstance(reply, Reply) and "error" in reply.config:  # the silo's own error, reported in its reply
                reply = Failure(req.silo, str(reply.config["error"]), bool(reply.config.get("fatal")))
            out[req.silo] = Failure(req.silo, f"silo {req.silo} (node {node}): {reply.reason}", reply.fatal) \
                if isinstance(reply, Failure) else reply
        return out


def _bound_retries(grid: Grid, seconds: float) -> None:
    """Flower 1.41's Grid retries a SuperLink that does not answer forever (`flwr.supercore.retry`:
    max_time=None), so a ServerApp whose SuperLink died would hang, holding the run directory, until killed.
    Bound it: the grid call then raises, the round loop stops with the last checkpoint intact and the run
    directory is free for the rerun. (A private attribute; Flower's own exit handler sets its max_tries.)"""
    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is not None and hasattr(invoker, "max_time"):
        invoker.max_time = seconds


# sha256 of inspect.getsource(HttpGrid.pull_messages) in flwr 1.41.0 (runtimes/flower/pins.py), which pulls a
# reply's content through the module's `pull_objects`
PULL_MESSAGES_SOURCE = "67a5266a5a2ed51557437a15ef4c8844f46576bc5bb6b0753d2a2f6230a3aa83"
REPLY_PULL_FIRST_S, REPLY_PULL_CAP_S = 0.02, 0.5


def _pull_replies_promptly() -> None:
    """A reply is listed before its content has reached the SuperLink; Flower's grid asks again after 1, 2, 4 s.
    In this (ServerApp) process ask after 20 ms, doubling up to 0.5 s (runtimes/flower/prompt_pulls.py), where
    the installed Flower is the pinned one."""
    from flwr.superlink.grid import http_grid

    from fedgen.runtimes.flower.pins import mismatch
    from fedgen.runtimes.flower.prompt_pulls import retry_promptly

    pinned = {"http_grid.HttpGrid.pull_messages": PULL_MESSAGES_SOURCE}
    if mismatch(pinned, {"http_grid.HttpGrid.pull_messages": http_grid.HttpGrid.pull_messages}, "") is None:
        retry_promptly(http_grid, "pull_objects", REPLY_PULL_FIRST_S, REPLY_PULL_CAP_S)


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < n and time.monotonic() < deadline:
        time.sleep(0.2)


def _ids(silos: list[int]) -> str:
    return ", ".join(str(s) for s in silos)


def _too_few(answered: list[int], n: int, waited: float, silent: int) -> str:
    """The error of a new run with fewer SuperNodes than silos: how many answered, which silos they hold, what the
    run needs."""
    k = len(answered)
    if k == 0:
        said = f"no SuperNode answered within {waited:g}s (runtime.wait_for_nodes_s)"
    else:
        said = (f"{k} SuperNode{'s' if k > 1 else ''} answered (silo{'s' if k > 1 else ''} {_ids(answered)}) "
                f"within {waited:g}s (runtime.wait_for_nodes_s)")
    if silent:
        said += f", {silent} more online did not answer"
    missing = [s for s in range(n) if s not in answered]
    return (f"{said}, the run has fl.clients={n}: start one SuperNode per silo, --partition-id 0..{n - 1} (missing: "
            f"silo{'s' if len(missing) > 1 else ''} {_ids(missing)})")


@contextmanager
def flower_federation(grid: Grid, cfg: Config, run_dir: RunDir, device: torch.device, console: Console, where: str,
                      stop: threading.Event | None = None):
    """Discover the silos behind the SuperNodes and check their data against the run; the coordinator's own copy
    of the dataset (if it has one) gives the expected classes and image shape, the test loss and evaluation."""
    if cfg.fl.centralized:
        raise UsageError("the centralized baseline trains on the union of the data in one process: use the "
                         "in-process runtime (--runtime local)")
    try:
        reference = load_reference(cfg.data)
    except DatasetError:
        reference = None
        console.print("the coordinating side has no copy of the dataset: no test loss, no evaluation")
    expected = {"classes": reference.classes, "image_shape": list(reference.image_shape)} if reference else {}
    # the run's id keys every silo's persistent state: it never changes, whatever the run's config allows to change
    run = {"config": config_mod.to_dict(cfg), "id": run_dir.run_id(),
           "silo_state": str((run_dir.path / "silos").resolve()) if where == "flower-sim" else None}
    ttl = cfg.runtime.message_ttl_s or cfg.runtime.round_timeout_s
    _bound_retries(grid, cfg.runtime.link_timeout_s)
    if where == "flower":
        _pull_replies_promptly()
    pool = FlowerPool(grid, run, ttl, console, expected, stop, POLL_S[where])
    n = cfg.fl.clients
    console.print(f"waiting for {n} SuperNodes (up to {cfg.runtime.wait_for_nodes_s:g}s)")
    t0 = time.monotonic()
    _wait_for_nodes(grid, n, cfg.runtime.wait_for_nodes_s)
    replies = pool.discover(cfg.runtime.round_timeout_s)
    refused = [f"the SuperNode of silo {r.silo} (node {node}) refused the run: {r.config['error']}"
               for node, r in sorted(replies.items(), key=lambda item: item[1].silo)
               if isinstance(r, Reply) and "error" in r.config]
    if refused:  # a silo whose data does not fit the run, a partition-id outside it: the run cannot start
        raise FedgenError("; ".join(refused))
    for node, r in replies.items():
        if isinstance(r, Failure):
            console.print(f"[yellow]node {node} did not answer:[/] {r.reason}", highlight=False)
    silos = {r.silo: SiloInfo(r.silo, int(r.config["size"]), list(r.config["counts"]))
             for r in replies.values() if isinstance(r, Reply)}
    extra = sorted(set(silos) - set(range(n)))
    if extra:  # the SuperNode refuses such a run itself (client_app); this is the coordinator's own check
        raise FedgenError(f"SuperNodes hold silos {_ids(extra)} (their --partition-id), outside the run's silos "
                          f"0..{n - 1} (fl.clients={n}): start one SuperNode per silo, --partition-id 0..{n - 1}")
    missing = [s for s in range(n) if s not in silos]
    if missing and run_dir.partition_path.exists():  # resuming: the run already knows their sizes
        known = Partition.load(run_dir.partition_path)
        for s in missing:
            silos[s] = SiloInfo(s, int(known.counts[s].sum()), known.counts[s].tolist())
        console.print(f"[yellow]silos {missing} have no SuperNode online;[/] they count as missing in the rounds "
                      "that select them until their node (re)joins", highlight=False)
    elif missing:
        raise FedgenError(_too_few(sorted(silos), n, cfg.runtime.wait_for_nodes_s,
                                   sum(isinstance(r, Failure) for r in replies.values())))
    shown = [f"silo {s} -> node {node}" for s, node in sorted(pool.node_of.items())]
    if len(shown) > MAP_SHOWN:  # a simulation of hundreds of virtual nodes: the first few, and how many more
        shown = [*shown[:MAP_SHOWN], f"... ({len(shown) - MAP_SHOWN} more)"]
    console.print(f"{n} silos, {len(pool.node_of)} on SuperNodes ({time.monotonic() - t0:.1f}s): " + ", ".join(shown),
                  highlight=False)
    silos = [silos[s] for s in range(n)]
    test = SiloData.of(reference.test.images, reference.test.labels) if reference is not None else None
    yield Federation(pool, silos, list(pool.expected["classes"]), tuple(pool.expected["image_shape"]),
                     partition_from_counts(cfg, silos), test, reference, where)


class _FedgenErrorOnly(logging.Filter):
    """Flower's logger, once a deployed ServerApp has said its fedgen error in one line: Flower would follow it
    with the exception's traceback ("ServerApp raised an exception") and its exit code's help ("Exit Code: 201
    ... An unhandled exception occurred in the ServerApp"); both are dropped, for that error only (a bug keeps its
    traceback). Flower still records the run as failed, with the message as its status details."""

    def __init__(self, error: FedgenError):
        super().__init__()
        self.error = error
        self.reported = False  # Flower logged the error (dropped): its exit code's help comes next

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.error:
            self.reported = True
            return False
        if self.reported and str(record.msg).startswith(f"Exit Code: {ExitCode.SERVERAPP_EXCEPTION}"):
            self.reported = False
            return False
        return True


def report_fedgen_error(error: FedgenError) -> None:
    """A deployed run's fedgen error: one line, `error: <message>` (further lines indented), in the run's log, as
    the CLI prints it; Flower's own report of the exception is quieted (`_FedgenErrorOnly`)."""
    print("error: " + str(error).replace("\n", "\n  "), flush=True)
    logging.getLogger("flwr").addFilter(_FedgenErrorOnly(error))


def make_server_app(cfg: Config | None = None, out: Path | None = None, console: Console | None = None,
                    where: str = "flower", stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp training `cfg` into `out` (simulation passes them in); without them it reads the run config
    (`config-b64`: the resolved fedgen config as base64 JSON, `out-dir`) that `fedgen train --runtime flower`
    submits. There, a fedgen error ends the run failed with its message, said in one line (`report_fedgen_error`);
    in simulation it reaches the caller, as in-process."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, run_out = cfg, out
        try:
            if run_cfg is None:
                run_cfg = config_mod.validate(json.loads(base64.b64decode(str(context.run_config["config-b64"]))))
                run_out = Path(str(context.run_config["out-dir"]))
            # a log, not a terminal: a line stays one line (an error, a round), as the CLI prints it outside a terminal
            con = console or Console(file=sys.stdout, width=120, soft_wrap=True, force_terminal=False)
            loop.train(run_cfg, run_out, con,
                       lambda c, run_dir, device, con_: flower_federation(grid, c, run_dir, device, con_, where,
                                                                          stop),
                       make_algorithm)
        except FedgenError as exc:
            if cfg is None:  # deployed: Flower's exit handler records the run failed with the message
                report_fedgen_error(exc)
            raise

    return app


app = make_server_app()
