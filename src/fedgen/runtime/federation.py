"""What the round loop knows about the silos, whatever runtime they are reached through."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedgen.config import Config
from fedgen.data.partition import Partition
from fedgen.data.sources import ImageDataset
from fedgen.fl.client import ClientData
from fedgen.fl.protocol import ClientPool


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

    pool: ClientPool
    silos: list[SiloInfo]
    classes: list[str]
    image_shape: tuple[int, int, int]
    partition: Partition
    test: ClientData | None
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
