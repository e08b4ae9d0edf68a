import pytest
import torch

from fedgen.algorithms.feddm.fedavg import fedavg
from fedgen.core.records import state_nbytes
from fedgen.federation.selection import sample_silos


def test_fedavg_weights_by_dataset_size_exactly():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([3.0])}
    out = fedavg([a, b], [100, 300])
    assert out["w"].tolist() == [3.25, 6.5]
    assert out["b"].tolist() == [2.25]
    assert out["w"].dtype == torch.float32


def test_fedavg_includes_buffers_and_keeps_integer_dtype():
    m1, m2 = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    m1.running_mean.fill_(1.0)
    m2.running_mean.fill_(3.0)
    m1.num_batches_tracked.fill_(10)
    m2.num_batches_tracked.fill_(20)
    out = fedavg([m1.state_dict(), m2.state_dict()], [1, 1])
    assert out["running_mean"].tolist() == [2.0, 2.0]
    assert out["num_batches_tracked"].item() == 15 and out["num_batches_tracked"].dtype == torch.int64


def test_fedavg_of_one_is_identity_and_errors():
    s = {"w": torch.randn(5)}
    assert torch.equal(fedavg([s], [7])["w"], s["w"])
    with pytest.raises(ValueError, match="at least one"):
        fedavg([], [])
    with pytest.raises(ValueError, match="different keys"):
        fedavg([s, {"v": torch.zeros(5)}], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        fedavg([s], [0])
    assert state_nbytes({"w": torch.zeros(10), "h": torch.zeros(3, dtype=torch.float16)}) == 46


def test_client_sampling_is_seeded_uniform_without_replacement():
    picks = [sample_silos(30, 10, seed=0, round_idx=r) for r in range(300)]
    assert all(len(set(p)) == 10 and p == sorted(p) and max(p) < 30 for p in picks)
    assert picks == [sample_silos(30, 10, seed=0, round_idx=r) for r in range(300)]
    assert picks[:5] != [sample_silos(30, 10, seed=1, round_idx=r) for r in range(5)]
    counts = torch.bincount(torch.tensor([c for p in picks for c in p]), minlength=30).float()
    # each client is picked with probability 1/3: 100 expected of 300 rounds, sd ~8.2
    assert counts.min() > 70 and counts.max() < 130
    assert sample_silos(10, 10, 0, 5) == list(range(10))
    with pytest.raises(ValueError):
        sample_silos(5, 6, 0, 0)


def test_local_losses_are_checked_in_batches_naming_the_step():
    import pytest
    import torch

    from fedgen.algorithms.feddm.local_update import NonFiniteLossError, _LossLog

    log = _LossLog(2, 0)
    for i in range(70):
        log.add(torch.tensor(float("nan") if i == 66 else 1.0))
    assert log.counted == 64 and log.total == 64.0  # the first 64 were read in one go, all finite
    with pytest.raises(NonFiniteLossError, match=r"client 2, round 1: loss is nan at local step 66 \(checked steps "
                                                 r"64-69\)"):
        log.check()
