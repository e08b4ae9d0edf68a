"""Everything a FedDM run is made of, built from a config: data, client split, model, clients, server."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from fedgen.config import Config
from fedgen.data.partition import Partition, partition_labels
from fedgen.data.prepare import load_for_config, load_reference
from fedgen.data.sources import ImageDataset
from fedgen.data.transforms import to_tensor
from fedgen.diffusion.schedule import ddpm_scheduler
from fedgen.errors import UsageError
from fedgen.fl.client import ClientData, DiffusionClient
from fedgen.models.unet import build_unet
from fedgen.seeding import derive_seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"train.device={name!r} but no CUDA device is available")
    return device


def make_partition(cfg: Config, labels: np.ndarray, num_classes: int) -> Partition:
    """The client split; the centralized baseline is one client holding everything."""
    if cfg.fl.centralized:
        idx = np.arange(len(labels))
        counts = np.bincount(labels, minlength=num_classes)[None]
        return Partition("centralized", None, cfg.train.seed, [idx], counts)
    return partition_labels(labels, cfg.fl.clients, method=cfg.data.partition, beta=cfg.data.beta,
                            seed=cfg.train.seed, num_classes=num_classes)


def new_model(cfg: Config, image_shape: tuple[int, int, int], num_classes: int,
              device: torch.device) -> UNet2DModel:
    """The U-Net, initialised from the run seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))
        extra = 1 if cfg.train.label_dropout > 0 else 0  # the null label of classifier-free guidance
        return build_unet(cfg.model, image_shape, num_classes + extra).to(device)


@dataclass
class Experiment:
    cfg: Config
    device: torch.device
    dataset: ImageDataset
    partition: Partition
    model: UNet2DModel | None  # the diffusion work buffer shared by in-process silos (None for PGA)
    scheduler: DDPMScheduler
    clients: list[DiffusionClient]
    test: ClientData

    @classmethod
    def build(cls, cfg: Config, device: torch.device, partition: Partition | None = None) -> Experiment:
        dataset = load_for_config(cfg.data, cfg.train.seed)
        if partition is None:
            partition = make_partition(cfg, dataset.train.labels, dataset.num_classes)
        images = to_tensor(dataset.train.images)
        labels = torch.from_numpy(dataset.train.labels)
        model = new_model(cfg, dataset.image_shape, dataset.num_classes, device) if cfg.algorithm == "feddm" else None
        scheduler = ddpm_scheduler(cfg.diffusion)
        clients = [
            DiffusionClient(cid, ClientData(images[torch.from_numpy(idx)], labels[torch.from_numpy(idx)]),
                            model, scheduler, device)
            for cid, idx in enumerate(partition.client_indices)
        ]
        test = ClientData(to_tensor(dataset.test.images), torch.from_numpy(dataset.test.labels))
        return cls(cfg, device, dataset, partition, model, scheduler, clients, test)

    @cached_property
    def reference(self) -> ImageDataset:
        """The full real splits (not the training subset) that metrics compare against: the loaded dataset itself
        unless `max_train_samples` took a subset of it."""
        return self.dataset if self.cfg.data.max_train_samples is None else load_reference(self.cfg.data)


def silo_data(cfg: Config, silo: int, data_path: str | None = None) -> tuple[ClientData, list[str]]:
    """What one silo holds, loaded where the silo runs: its own directory (`data_path`, read as `data.dataset`
    at the run's image size and channels; its training split), or, for tests and demos, its share of a dataset
    every node can read (the run's partition, recomputed from the config exactly as in-process)."""
    from fedgen.data.sources import load_dataset

    if data_path:
        d = cfg.data
        ds = load_dataset(d.dataset, data_path, image_size=d.image_size, channels=d.channels,
                          test_fraction=d.test_fraction, seed=d.split_seed)
        return ClientData(to_tensor(ds.train.images), torch.from_numpy(ds.train.labels)), ds.classes
    dataset = load_for_config(cfg.data, cfg.train.seed)
    partition = make_partition(cfg, dataset.train.labels, dataset.num_classes)
    if not 0 <= silo < len(partition.client_indices):
        raise UsageError(f"silo {silo} does not exist: the run has {len(partition.client_indices)} silos "
                         f"(fl.clients), numbered from 0")
    idx = torch.from_numpy(partition.client_indices[silo])
    return ClientData(to_tensor(dataset.train.images)[idx], torch.from_numpy(dataset.train.labels)[idx]), \
        dataset.classes
