import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_fedgen_data(monkeypatch):
    """Tests never read the user's FEDGEN_DATA."""
    monkeypatch.delenv("FEDGEN_DATA", raising=False)
