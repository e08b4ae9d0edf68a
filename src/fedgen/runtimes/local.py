"""The in-process runtime: every silo's worker lives in this process and runs one after another (the default,
and the fastest on one machine). The round loop is federation/loop.py's, shared with the Flower runtimes."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console

from fedgen.algorithms.coordinators import make_algorithm
from fedgen.algorithms.silos import make_workers
from fedgen.config import Config
from fedgen.core.errors import FedgenError, SiloStateError
from fedgen.core.progress import task
from fedgen.core.records import Failure, Reply, Request, Worker
from fedgen.data.partition import Partition
from fedgen.data.silos import FederatedData
from fedgen.federation import loop
from fedgen.federation.loop import TrainingAborted
from fedgen.federation.rundir import RunDir
from fedgen.federation.silo_state import SiloStateStore
from fedgen.federation.silos import Federation, SiloInfo

__all__ = ["InProcessPool", "TrainingAborted", "in_process_federation", "train"]


class InProcessPool:
    """Calls the silo workers directly, one after another. A worker's own error (bad data, a non-finite loss) is a
    Failure of that silo; anything else is a bug and propagates."""

    def __init__(self, workers: dict[int, Worker]):
        self.workers = workers

    def send(self, requests: list[Request], timeout: float, progress=None) -> dict[int, Reply | Failure]:
        replies: dict[int, Reply | Failure] = {}
        fits = [q for q in requests if q.kind == "fit"]
        with task(progress if fits else None, f"round {int(fits[0].config['round']) + 1}: clients" if fits else "",
                  len(requests)) as client_done:
            for request in requests:
                worker = self.workers[request.silo]
                with task(progress if request.kind == "fit" else None, f"client {request.silo}: steps",
                          worker.steps(request)) as step_done:
                    worker.on_step = step_done
                    try:
                        replies[request.silo] = worker.handle(request)
                    except FedgenError as exc:
                        replies[request.silo] = Failure(request.silo, str(exc), isinstance(exc, SiloStateError))
                    finally:
                        worker.on_step = None
                if client_done is not None:
                    client_done()
        return replies


@contextmanager
def in_process_federation(cfg: Config, device: torch.device, console: Console, run_dir: Path | None = None):
    partition = Partition.load(run_dir / "partition.json") if run_dir and (run_dir / "partition.json").exists() \
        else None
    data = FederatedData.build(cfg, partition)

    def store(silo: int) -> SiloStateStore | None:
        return SiloStateStore(RunDir(run_dir).silo_state(silo)) if run_dir else None

    workers = make_workers(cfg, dict(enumerate(data.silos)), data.dataset.classes, device, store)
    silos = [SiloInfo(s, len(d), data.partition.counts[s].tolist()) for s, d in enumerate(data.silos)]
    yield Federation(InProcessPool(workers), silos, data.dataset.classes, data.dataset.image_shape, data.partition,
                     data.test, data.reference, "in-process")


def train(cfg: Config, out: Path, console: Console | None = None) -> RunDir:
    """Train (or resume, or extend) the run of `cfg` in directory `out`, every silo in this process."""
    return loop.train(cfg, out, console or Console(),
                      lambda cfg_, run, device, console_: in_process_federation(cfg_, device, console_, run.path),
                      make_algorithm)
