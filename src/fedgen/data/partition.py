"""Split a labelled training set across clients: Dirichlet(beta) over labels or IID (flwr-datasets)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedgen.core.errors import FedgenError


class PartitionError(FedgenError, ValueError):
    """An impossible partition request."""


@dataclass(frozen=True)
class Partition:
    method: str
    beta: float | None
    seed: int
    client_indices: list[np.ndarray]  # indices into the training split, one array per client
    counts: np.ndarray  # (clients, classes) label counts

    @property
    def sizes(self) -> np.ndarray:
        return self.counts.sum(1)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "beta": self.beta,
            "seed": self.seed,
            "sizes": self.sizes.tolist(),
            "counts": self.counts.tolist(),
            "client_indices": [idx.tolist() for idx in self.client_indices],
        }

    @classmethod
    def from_json(cls, data: dict) -> Partition:
        return cls(
            method=data["method"],
            beta=data["beta"],
            seed=data["seed"],
            client_indices=[np.asarray(i, dtype=np.int64) for i in data["client_indices"]],
            counts=np.asarray(data["counts"], dtype=np.int64),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Partition:
        return cls.from_json(json.loads(path.read_text()))


def _partitioner(method: str, num_clients: int, beta: float, seed: int, min_size: int):
    # flwr-datasets and HuggingFace datasets (seconds to import): only where a split is made
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if method == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=beta,
            min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed,
        )
    if method == "iid":
        return IidPartitioner(num_partitions=num_clients)
    raise PartitionError(f"unknown partition method {method!r}; expected 'dirichlet' or 'iid'")


def partition_labels(
    labels: np.ndarray, num_clients: int, *, method: str = "dirichlet", beta: float = 0.5, seed: int = 0,
    num_classes: int | None = None, min_size: int | None = None,
) -> Partition:
    """Assign every training index to one client.

    Dirichlet: for each class, client shares ~ Dir(beta) (flwr-datasets' DirichletPartitioner, which redraws
    until every client has at least `min_size` samples). IID: a seeded shuffle cut into equal chunks.
    Every client gets at least one sample (`min_size` >= 1): a client with no data has nothing to train on and
    no loss to report; a split that cannot give every client its minimum is refused.
    """
    from datasets import Dataset  # HuggingFace datasets (seconds to import): only where a split is made

    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if num_clients < 1:
        raise PartitionError(f"number of clients must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise PartitionError(
            f"cannot split {len(labels)} training samples across {num_clients} clients (more clients than samples)"
        )
    if method == "dirichlet" and not beta > 0:
        raise PartitionError(f"Dirichlet beta must be > 0, got {beta}")
    if min_size is None:
        min_size = min(10, len(labels) // (num_clients * 2))
    min_size = max(1, min_size)
    order = np.random.default_rng(seed).permutation(len(labels)) if method == "iid" else np.arange(len(labels))
    dataset = Dataset.from_dict({"label": labels[order], "index": order}).with_format("arrow")
    partitioner = _partitioner(method, num_clients, beta, seed, min_size)
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():  # flwr-datasets warns on every redraw; the outcome is what we report
            warnings.simplefilter("ignore", UserWarning)
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                     for i in range(num_clients)]
    except ValueError as exc:  # flwr-datasets gives up after many redraws
        raise PartitionError(
            f"could not split {len(labels)} samples into {num_clients} Dirichlet(beta={beta}) clients with at "
            f"least {min_size} samples each ({exc}); use fewer clients or a larger beta"
        ) from None
    empty = [i for i, p in enumerate(parts) if len(p) < min_size]
    if empty:  # IID chunks of a set smaller than N, or a partitioner that did not hold its minimum
        raise PartitionError(f"clients {empty} would get fewer than {min_size} samples; use fewer clients")
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    return Partition(method, beta if method == "dirichlet" else None, seed, parts, counts)


def format_table(partition: Partition, classes: list[str]) -> str:
    """Client x class count table as plain text."""
    header = ["client"] + [c[:9] for c in classes] + ["total"]
    rows = [[str(i)] + [str(v) for v in row] + [str(row.sum())] for i, row in enumerate(partition.counts)]
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *rows])


def plot_heatmap(partition: Partition, classes: list[str], path: Path, title: str | None = None) -> None:
    """Client x class heatmap of label counts, as the paper's Fig. 3."""
    import matplotlib  # plotting only; the backend is chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = partition.counts
    n_clients, n_classes = counts.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n_classes, 1.0 + 0.45 * n_clients))
    im = ax.imshow(counts, cmap="Greens", aspect="auto")
    if n_clients * n_classes <= 600:
        threshold = counts.max() * 0.6
        for i in range(n_clients):
            for j in range(n_classes):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if counts[i, j] > threshold else "black")
    ax.set_xticks(range(n_classes), [c[:10] for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(n_clients))
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    beta = f"Dirichlet beta={partition.beta:g}" if partition.beta is not None else partition.method.upper()
    ax.set_title(title or f"{beta}, {n_clients} clients, seed {partition.seed}")
    fig.colorbar(im, ax=ax, label="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
