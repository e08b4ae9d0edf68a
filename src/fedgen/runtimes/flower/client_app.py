"""fedgen's Flower ClientApp: a silo's worker behind Flower messages.

A SuperNode names its silo in its node config: `partition-id` (the silo number, 0..N-1) and, where the silo
has its own data, `data-path` (a directory in any format fedgen reads, interpreted as the run's `data.dataset`);
without `data-path` the silo takes its share of a dataset every node can read (tests and demos). Optional
`state-dir` holds the silo's persistent state (`fedgen flower supernode --state`; it must be kept for the life of
every run the silo takes part in). Simulation's virtual nodes get `partition-id` from Flower.

Workers are cached per process (simulation reuses its Ray actors), and so is the dataset and client split that
silos without a `data-path` slice their share from (data/silos.shared_split): a simulation actor serves many
virtual silos without loading the dataset per message. A `describe` needs the silo's data alone, no worker. A
deployed SuperNode starts a new process per message, so it loads its data per message.
"""

from __future__ import annotations

import json
import traceback
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgen import config as config_mod
from fedgen.algorithms.silos import make_workers
from fedgen.config import Config
from fedgen.core.device import resolve_device
from fedgen.core.errors import FedgenError, SiloStateError, UsageError
from fedgen.core.paths import silo_state_home
from fedgen.core.records import Reply, Worker
from fedgen.data.silos import silo_data
from fedgen.federation.silo_state import SiloStateStore
from fedgen.federation.silos import describe_silo
from fedgen.runtimes.flower.codec import decode_request, reply_message

app = ClientApp()


def _state_dir(node_config: dict, run: dict, silo: int) -> Path:
    """Silo `silo`'s state folder for `run`: under the SuperNode's `state-dir` (default: the user's state
    directory, never a cache), keyed by the run's id; on flower-sim, the run directory's `silos/` the server
    names, exactly where an in-process silo keeps it."""
    if node_config.get("state-dir"):
        root = Path(str(node_config["state-dir"])) / str(run["id"])
    elif run.get("silo_state"):
        root = Path(str(run["silo_state"]))
    else:
        root = silo_state_home() / str(run["id"])
    return root / f"silo_{silo:03d}"


@lru_cache(maxsize=4)
def _config(config_json: str) -> Config:
    cfg = config_mod.validate(json.loads(config_json))
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    return cfg


@lru_cache(maxsize=4)
def _worker(config_json: str, silo: int, data_path: str | None, state_dir: str) -> Worker:
    cfg = _config(config_json)
    data, classes = silo_data(cfg, silo, data_path)
    # the next request may run in another process (a SuperNode starts one per message; simulation has several
    # actors): a PGA party writes its discriminator after every step
    workers = make_workers(cfg, {silo: data}, classes, resolve_device(cfg.train.device),
                           lambda _silo: SiloStateStore(Path(state_dir)), across_processes=True)
    return workers[silo]


def _silo(context: Context) -> tuple[int, str | None]:
    nc = context.node_config
    if "partition-id" not in nc:
        raise ValueError("this SuperNode has no partition-id in its node config (its silo number, 0..N-1)")
    return int(nc["partition-id"]), (str(nc["data-path"]) if nc.get("data-path") else None)


def _check_silo(silo: int, run_config: dict) -> None:
    """The SuperNode's partition-id must be one of the run's silos (0..fl.clients-1)."""
    clients = int(run_config["fl"]["clients"])
    if not 0 <= silo < clients:
        raise UsageError(f"--partition-id {silo} is outside the run's silos 0..{clients - 1} (fl.clients={clients}): "
                         f"start this SuperNode with --partition-id 0..{clients - 1}")


def handle(msg: Message, context: Context) -> Message:
    """Decode, run the silo's worker, encode. Any error becomes an error reply naming the silo, and a line in the
    SuperNode's log: fedgen's own errors (the silo's data or state does not fit the run) as one `error:` line,
    anything else (a bug) with its traceback."""
    silo, request = -1, None
    try:
        request, run = decode_request(msg)
        silo, data_path = _silo(context)
        if request.silo < 0:  # discovery: the server does not know this node's silo yet
            request.silo = silo
        elif request.silo != silo:
            raise ValueError(f"request for silo {request.silo} reached the node of silo {silo}")
        _check_silo(silo, run["config"])
        config_json = json.dumps(run["config"], sort_keys=True)
        if request.kind == "describe":  # what the silo holds, from its data alone: no worker, no network built
            data, classes = silo_data(_config(config_json), silo, data_path)
            reply = describe_silo(silo, data, classes, request)
        else:
            worker = _worker(config_json, silo, data_path, str(_state_dir(context.node_config, run, silo)))
            reply = worker.handle(request)
    except FedgenError as exc:  # reported to the server, which names the node
        print(f"error: silo {silo} refused run {_run_id(msg)} ({request.kind if request else 'a request'}): {exc}",
              flush=True)
        reply = Reply(silo, config={"error": str(exc), "fatal": isinstance(exc, SiloStateError)})
    except Exception as exc:  # noqa: BLE001 - reported to the server, which names the node
        traceback.print_exc()
        reply = Reply(silo, config={"error": f"{type(exc).__name__}: {exc}",
                                    "fatal": isinstance(exc, SiloStateError)})
    return reply_message(reply, msg)


def _run_id(msg: Message) -> str:
    try:
        return str(msg.metadata.run_id)
    except AttributeError:
        return "?"


@app.query()
def describe(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.train()
def fit(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.train("pga")
def pga_step(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.query("merf")
def merf_release(msg: Message, context: Context) -> Message:
    return handle(msg, context)
