"""The data of a federated run, seen from where it is held: the silos' shares of a dataset (their tensors), the
client split, and the real splits a coordinator that holds the dataset scores against."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from fedgen.config import Config
from fedgen.core.errors import UsageError
from fedgen.data.partition import Partition, partition_labels
from fedgen.data.prepare import load_for_config, load_reference
from fedgen.data.sources import ImageDataset, load_dataset
from fedgen.data.transforms import to_tensor


@dataclass
class SiloData:
    """One silo's images and labels (or the coordinator's test split) as tensors."""

    images: torch.Tensor  # float32 (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def of(cls, images: np.ndarray, labels: np.ndarray) -> SiloData:
        """From a split's uint8 (N, H, W, C) images and integer labels."""
        return cls(to_tensor(images), torch.from_numpy(labels))


def make_partition(cfg: Config, labels: np.ndarray, num_classes: int) -> Partition:
    """The client split; the centralized baseline is one silo holding everything."""
    if cfg.fl.centralized:
        idx = np.arange(len(labels))
        counts = np.bincount(labels, minlength=num_classes)[None]
        return Partition("centralized", None, cfg.train.seed, [idx], counts)
    return partition_labels(labels, cfg.fl.clients, method=cfg.data.partition, beta=cfg.data.beta,
                            seed=cfg.train.seed, num_classes=num_classes)


@dataclass
class FederatedData:
    """Every silo's share of the configured dataset, in one process (the in-process runtime, the audits)."""

    cfg: Config
    dataset: ImageDataset
    partition: Partition
    silos: list[SiloData]  # silo i's data at index i
    test: SiloData

    @classmethod
    def build(cls, cfg: Config, partition: Partition | None = None) -> FederatedData:
        dataset = load_for_config(cfg.data, cfg.train.seed)
        if partition is None:
            partition = make_partition(cfg, dataset.train.labels, dataset.num_classes)
        images = to_tensor(dataset.train.images)
        labels = torch.from_numpy(dataset.train.labels)
        silos = [SiloData(images[torch.from_numpy(idx)], labels[torch.from_numpy(idx)])
                 for idx in partition.client_indices]
        return cls(cfg, dataset, partition, silos, SiloData.of(dataset.test.images, dataset.test.labels))

    @cached_property
    def reference(self) -> ImageDataset:
        """The full real splits (not the training subset) that metrics compare against: the loaded dataset itself
        unless `max_train_samples` took a subset of it."""
        return self.dataset if self.cfg.data.max_train_samples is None else load_reference(self.cfg.data)


_SPLITS: OrderedDict[str, tuple[ImageDataset, Partition]] = OrderedDict()
SPLITS_KEPT = 2  # a process serves one run at a time; two let a resumed or neighbouring run keep its own


def shared_split(cfg: Config) -> tuple[ImageDataset, Partition]:
    """The run's dataset and client split, computed once per process and kept read-only: every silo served by this
    process (a simulation actor serves many, one message at a time) slices its share from it instead of loading
    the dataset and redrawing the split of all N silos per message. Keyed by everything the two depend on: the
    data section, the seed, N and whether the run is centralized."""
    key = json.dumps({"data": cfg.data.model_dump(mode="json"), "seed": cfg.train.seed, "clients": cfg.fl.clients,
                      "centralized": cfg.fl.centralized}, sort_keys=True)
    if key not in _SPLITS:
        dataset = load_for_config(cfg.data, cfg.train.seed)
        partition = make_partition(cfg, dataset.train.labels, dataset.num_classes)
        for array in (dataset.train.images, dataset.train.labels, *partition.client_indices):
            array.flags.writeable = False  # shared by every silo of the process: nobody may change it
        _SPLITS[key] = (dataset, partition)
        while len(_SPLITS) > SPLITS_KEPT:
            _SPLITS.popitem(last=False)
    _SPLITS.move_to_end(key)
    return _SPLITS[key]


def silo_data(cfg: Config, silo: int, data_path: str | None = None) -> tuple[SiloData, list[str]]:
    """What one silo holds, loaded where the silo runs: its own directory (`data_path`, read as `data.dataset`
    at the run's image size and channels; its training split), or, for tests and demos, its share of a dataset
    every node can read (the run's partition, recomputed from the config exactly as in-process)."""
    if data_path:
        d = cfg.data
        ds = load_dataset(d.dataset, data_path, image_size=d.image_size, channels=d.channels,
                          test_fraction=d.test_fraction, seed=d.split_seed)
        return SiloData.of(ds.train.images, ds.train.labels), ds.classes
    dataset, partition = shared_split(cfg)
    if not 0 <= silo < len(partition.client_indices):
        raise UsageError(f"silo {silo} does not exist: the run has {len(partition.client_indices)} silos "
                         f"(fl.clients), numbered from 0")
    idx = partition.client_indices[silo]  # convert this silo's share only, not the whole dataset
    return SiloData.of(dataset.train.images[idx], dataset.train.labels[idx]), dataset.classes
