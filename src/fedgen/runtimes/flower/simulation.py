"""`flower-sim`: the run's silos as virtual SuperNodes on Flower's simulation engine (Ray), in this process.

Each virtual node gets `partition-id` = its silo and takes its share of the configured dataset, exactly as an
in-process silo does; the ServerApp runs the shared round loop in this process. Ray's processes are gone when
`run_simulation` returns (on success and on error; checked in the tests).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.simulation import run_simulation
from rich.console import Console

from fedgen.config import Config
from fedgen.federation.rundir import RunDir
from fedgen.runtimes.flower.client_app import app as client_app
from fedgen.runtimes.flower.server_app import make_server_app


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
    flwr_logger.addFilter(quiet)
    try:
        run_simulation(server_app=make_server_app(cfg, Path(out), console, "flower-sim"), client_app=client_app,
                       num_supernodes=cfg.fl.clients, backend_config=backend, verbose_logging=False)
    finally:
        flwr_logger.removeFilter(quiet)
    return RunDir(out)
