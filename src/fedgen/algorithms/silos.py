"""The silo side of every algorithm behind one door: the workers a runtime builds where the data is (the in-process
pool, a Flower ClientApp), and the network a run trains. It imports no coordinating side: a ClientApp process
(one per message on a deployed SuperNode) loads only what a silo runs."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedgen.algorithms.feddm.silo import FedDMSilo
from fedgen.algorithms.merf.silo import MERFSilo
from fedgen.algorithms.pga.silo import PGASilo
from fedgen.config import Config
from fedgen.core.records import Worker
from fedgen.data.silos import SiloData
from fedgen.diffusion.schedule import ddpm_scheduler
from fedgen.federation.silo_state import SiloStateStore
from fedgen.nn.gan import new_generator
from fedgen.nn.unet import new_unet


def make_workers(cfg: Config, silos: dict[int, SiloData], classes: list[str], device: torch.device,
                 store: Callable[[int], SiloStateStore | None], across_processes: bool = False) -> dict[int, Worker]:
    """The silos' side of `cfg.algorithm`, one worker per silo in `silos`. FedDM's workers in one process share
    one U-Net as their work buffer. `across_processes`: a silo's next request may be handled by another process
    (Flower), so a PGA party writes its discriminator after every step."""
    if cfg.algorithm == "pga":
        return {s: PGASilo(cfg, s, data, classes, device, store(s), persist_each_step=across_processes)
                for s, data in silos.items()}
    if cfg.algorithm == "merf":
        return {s: MERFSilo(cfg, s, data, classes, device, store(s)) for s, data in silos.items()}
    if not silos:
        return {}
    shape = tuple(next(iter(silos.values())).images.shape[1:])
    model, scheduler = new_unet(cfg, shape, len(classes), device), ddpm_scheduler(cfg.diffusion)
    return {s: FedDMSilo(cfg, s, data, classes, model, scheduler, device, store(s)) for s, data in silos.items()}


def new_network(cfg: Config, image_shape: tuple[int, int, int], num_classes: int,
                device: torch.device) -> torch.nn.Module:
    """The network a run of `cfg` trains (the U-Net, or the generator of PGA and DP-MERF), freshly initialised from
    its seed."""
    if cfg.trains_generator:
        return new_generator(cfg, image_shape, num_classes, device)
    return new_unet(cfg, image_shape, num_classes, device)
