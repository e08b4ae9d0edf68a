import pytest
import torch

THREADS = 2
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _two_threads():
    """Every test starts with the same CPU thread count: CPU results depend on it, and a run with
    train.cpu_threads changes it for its duration."""
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _no_fedgen_data(monkeypatch):
    """Tests never read the user's FEDGEN_DATA."""
    monkeypatch.delenv("FEDGEN_DATA", raising=False)
