"""What the round loop knows about the silos, whatever runtime they are reached through, and the answer every
algorithm's silo gives to `describe`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedgen.config import Config
from fedgen.core.errors import SiloDataError
from fedgen.core.records import Reply, Request, SiloPool
from fedgen.data.partition import Partition
from fedgen.data.silos import SiloData
from fedgen.data.sources import ImageDataset


@dataclass
class SiloInfo:
    silo: int
    size: int
    counts: list[int]  # per class


@dataclass
class Federation:
    """The silos of a run (their sizes and label counts, never their data) and how to reach them, plus the data
    the coordinating side may hold itself: the real test split (per-round test loss) and the dataset's reference
    splits (evaluation). Both are None where the coordinator has no copy of the dataset."""

    pool: SiloPool
    silos: list[SiloInfo]
    classes: list[str]
    image_shape: tuple[int, int, int]
    partition: Partition
    test: SiloData | None
    reference: ImageDataset | None
    where: str  # "in-process", "flower-sim", "flower"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sizes(self) -> list[int]:
        return [s.size for s in self.silos]


def partition_from_counts(cfg: Config, silos: list[SiloInfo]) -> Partition:
    """A Partition record (for partition.json) from what the silos report: counts, no indices (the coordinator
    does not know which images a silo holds)."""
    counts = np.asarray([s.counts for s in sorted(silos, key=lambda s: s.silo)], dtype=np.int64)
    method = "centralized" if cfg.fl.centralized else cfg.data.partition
    beta = cfg.data.beta if method == "dirichlet" else None
    return Partition(method, beta, cfg.train.seed, [np.zeros(0, dtype=np.int64) for _ in silos], counts)


def describe_silo(silo: int, data: SiloData, classes: list[str], request: Request) -> Reply:
    """What a silo holds (size, per-class counts, classes, image shape), checked against the run's classes and
    image shape where the request names them (any algorithm's `describe`)."""
    shape = list(data.images.shape[1:])
    want_classes, want_shape = request.config.get("classes"), request.config.get("image_shape")
    if want_classes is not None and list(want_classes) != list(classes):
        raise SiloDataError(f"silo {silo}: its data has classes {classes}, the run has {want_classes}")
    if want_shape is not None and list(want_shape) != shape:
        raise SiloDataError(f"silo {silo}: its images are {shape} (C, H, W), the run's are {list(want_shape)}")
    if len(data) == 0:
        raise SiloDataError(f"silo {silo} holds no images")
    counts = torch.bincount(data.labels, minlength=len(classes)).tolist()
    return Reply(silo, config={"size": len(data), "counts": counts, "classes": list(classes), "image_shape": shape})
