import numpy as np
import pytest
import torch

from fedgen.data.transforms import random_hflip, to_tensor, to_uint8


def all_values_batch() -> np.ndarray:
    """Every uint8 value, arranged as (2, 8, 16, 2) images."""
    return np.arange(512, dtype=np.int64).astype(np.uint8).reshape(2, 8, 16, 2)


def test_to_tensor_layout_dtype_range():
    x = all_values_batch()
    t = to_tensor(x)
    assert t.dtype == torch.float32 and t.shape == (2, 2, 8, 16)
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert to_tensor(np.zeros((1, 2, 2, 1), np.uint8)).eq(-1.0).all()
    assert to_tensor(np.full((1, 2, 2, 3), 255, np.uint8)).eq(1.0).all()
    # channel c of pixel (y, x) lands at [n, c, y, x]
    assert t[1, 1, 3, 5].item() == pytest.approx(float(x[1, 3, 5, 1]) / 127.5 - 1)
    torch.testing.assert_close(t, torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1)


def test_round_trip_is_exact():
    x = all_values_batch()
    back = to_uint8(to_tensor(x))
    assert back.dtype == np.uint8 and back.shape == x.shape
    np.testing.assert_array_equal(back, x)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, 2 / 255 - 1 + 0.001]).view(1, 1, 1, 6)
    np.testing.assert_array_equal(to_uint8(x)[0, 0, :, 0], [0, 0, 128, 255, 255, 1])
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_to_tensor_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((1, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(torch.zeros(1, 4, 4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="N, H, W, C"):
        to_tensor(np.zeros((4, 4, 1), np.uint8))


def test_hflip_deterministic_and_about_half():
    x = torch.randn(1000, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    a = random_hflip(x, torch.Generator().manual_seed(42))
    b = random_hflip(x, torch.Generator().manual_seed(42))
    c = random_hflip(x, torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    kept = (a == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)  # each image is either untouched or exactly mirrored
    # Binomial(1000, 0.5): sd = 15.8, so +-80 is a 5-sigma bound
    assert 420 <= int(flipped.sum()) <= 580
    assert x.shape == a.shape


def test_hflip_does_not_modify_input():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    copy = x.clone()
    out = random_hflip(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, copy)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))


def test_to_tensor_read_only_input_no_warning(recwarn):
    x = np.frombuffer(bytes(range(16)), dtype=np.uint8).reshape(1, 4, 4, 1)
    assert not x.flags.writeable
    t = to_tensor(x)
    assert t.shape == (1, 1, 4, 4) and t[0, 0, 0, 1].item() == pytest.approx(1 / 127.5 - 1)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
