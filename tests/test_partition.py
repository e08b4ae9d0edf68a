import numpy as np
import pytest

from fedgen.data.partition import Partition, PartitionError, format_table, partition_labels, plot_heatmap

LABELS = np.repeat(np.arange(10), 300)


def test_dirichlet_is_seeded_and_covers_everything_once():
    p = partition_labels(LABELS, 10, beta=0.5, seed=3)
    all_idx = np.concatenate(p.client_indices)
    assert sorted(all_idx.tolist()) == list(range(len(LABELS)))
    assert p.counts.sum() == len(LABELS) and (p.counts.sum(0) == 300).all()
    assert (p.sizes >= 10).all()
    q = partition_labels(LABELS, 10, beta=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(p.client_indices, q.client_indices, strict=True))
    r = partition_labels(LABELS, 10, beta=0.5, seed=4)
    assert not np.array_equal(p.counts, r.counts)


def test_smaller_beta_is_more_skewed():
    def skew(beta):
        counts = partition_labels(LABELS, 10, beta=beta, seed=0).counts
        shares = counts / counts.sum(1, keepdims=True)
        return shares.max(1).mean()  # mean share of a client's dominant class

    assert skew(0.1) > skew(0.5) > skew(5.0)
    assert skew(5.0) < 0.35


def test_iid_is_balanced_and_seeded():
    p = partition_labels(LABELS, 7, method="iid", seed=0)
    assert p.beta is None and p.sizes.max() - p.sizes.min() <= 1
    assert sorted(np.concatenate(p.client_indices).tolist()) == list(range(len(LABELS)))
    # shuffled: every client sees most classes
    assert ((p.counts > 0).sum(1) >= 9).all()


def test_json_round_trip_and_table(tmp_path):
    p = partition_labels(LABELS, 4, beta=1.0, seed=0)
    p.save(tmp_path / "partition.json")
    q = Partition.load(tmp_path / "partition.json")
    assert np.array_equal(q.counts, p.counts) and q.beta == 1.0
    table = format_table(p, [f"c{i}" for i in range(10)])
    assert table.splitlines()[0].split() == ["client"] + [f"c{i}" for i in range(10)] + ["total"]
    assert table.splitlines()[1].split()[-1] == str(p.sizes[0])
    plot_heatmap(p, [f"c{i}" for i in range(10)], tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 10, "beta": 0.0}, "beta must be > 0"),
        ({"num_clients": 10, "beta": -1.0}, "beta must be > 0"),
        ({"num_clients": 5000}, "more clients than samples"),
        ({"num_clients": 0}, "must be >= 1"),
        ({"num_clients": 3, "method": "shards"}, "unknown partition method"),
    ],
)
def test_impossible_requests(kwargs, message):
    with pytest.raises(PartitionError, match=message):
        partition_labels(LABELS, **kwargs)


def test_no_client_is_left_empty_and_no_warning_leaks(recwarn):
    """More clients than half the samples: the old minimum of len // (2N) = 0 let Dirichlet leave clients empty.
    Now every client must get at least one sample, or the split is refused with a clear message."""
    labels = np.repeat(np.arange(10), 30)
    with pytest.raises(PartitionError, match="160 Dirichlet.*at least 1 samples each"):
        partition_labels(labels, 160, beta=0.5, seed=0)
    part = partition_labels(labels, 40, beta=5.0, seed=0)
    assert part.sizes.min() >= 3 and part.sizes.sum() == 300  # min(10, 300 // 80)
    assert not [w for w in recwarn if "flwr_datasets" in str(w.filename)]  # redraw warnings stay quiet
