"""The in-process runtime: every silo's worker lives in this process and runs one after another (the default,
and the fastest on one machine). The round loop is runtime/loop.py's, shared with the Flower runtimes."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console

from fedgen.config import Config
from fedgen.data.partition import Partition
from fedgen.errors import FedgenError
from fedgen.fl.experiment import Experiment
from fedgen.fl.protocol import Failure, Reply, Request
from fedgen.fl.rundir import RunDir
from fedgen.fl.worker import FedDMWorker, SiloStateError, SiloStateStore
from fedgen.report.progress import task
from fedgen.runtime import loop
from fedgen.runtime.federation import Federation, SiloInfo
from fedgen.runtime.loop import TrainingAborted

__all__ = ["InProcessPool", "TrainingAborted", "in_process_federation", "train"]


class InProcessPool:
    """Calls the silo workers directly, one after another. A worker's own error (bad data, a non-finite loss) is a
    Failure of that silo; anything else is a bug and propagates."""

    def __init__(self, workers: dict[int, FedDMWorker]):
        self.workers = workers

    def send(self, requests: list[Request], timeout: float, progress=None) -> dict[int, Reply | Failure]:
        replies: dict[int, Reply | Failure] = {}
        fits = [q for q in requests if q.kind == "fit"]
        with task(progress if fits else None, f"round {int(fits[0].config['round']) + 1}: clients" if fits else "",
                  len(requests)) as client_done:
            for request in requests:
                worker = self.workers[request.silo]
                steps = worker.local_steps() if request.kind == "fit" else 0
                with task(progress if request.kind == "fit" else None, f"client {request.silo}: steps",
                          steps) as step_done:
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
    exp = Experiment.build(cfg, device, partition)

    def store(silo: int) -> SiloStateStore | None:
        return SiloStateStore(RunDir(run_dir).silo_state(silo)) if run_dir else None

    if cfg.algorithm == "pga":
        from fedgen.gan.party import PGAParty

        workers = {c.client_id: PGAParty(cfg, c.client_id, c.data, exp.dataset.classes, device, store(c.client_id))
                   for c in exp.clients}
    else:
        workers = {c.client_id: FedDMWorker(cfg, c.client_id, c.data, exp.dataset.classes, exp.model, exp.scheduler,
                                            device, store(c.client_id)) for c in exp.clients}
    silos = [SiloInfo(c.client_id, len(c.data), exp.partition.counts[c.client_id].tolist()) for c in exp.clients]
    yield Federation(InProcessPool(workers), silos, exp.dataset.classes, exp.dataset.image_shape, exp.partition,
                     exp.test, exp.reference, "in-process")


def train(cfg: Config, out: Path, console: Console | None = None) -> RunDir:
    """Train (or resume, or extend) the FedDM run of `cfg` in directory `out`, every silo in this process."""
    return loop.train(cfg, out, console or Console(),
                      lambda cfg_, run, device, console_: in_process_federation(cfg_, device, console_, run.path))
