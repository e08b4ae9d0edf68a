"""Dataset readers against small files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fedgen.data.sources import (
    DATASETS,
    DatasetError,
    ImageDataset,
    _resize,
    load_dataset,
    resolve_path,
)

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------ writers


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008<ndim>, big-endian dims, data."""
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_dataset(root: Path, n_train: int = 12, n_test: int = 5, size: int = 6, gz: bool = False,
                     seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / name, arr, gz=gz)
    return arrays


def make_cifar(root: Path, per_batch: int = 3, meta: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """cifar-10-batches-py with 5 train batches and a test batch of rows R-plane, G-plane, B-plane."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with (root / fname).open("wb") as fh:
            pickle.dump({b"batch_label": fname.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, fh)
        out[fname] = data
        out[fname + "_labels"] = np.array(labels)
    if meta:
        names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        with (root / "batches.meta").open("wb") as fh:
            pickle.dump({b"label_names": names, b"num_vis": 3072}, fh)
    return out


def write_png(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


# --------------------------------------------------------------------------------------- MNIST-like


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_exact_pixels_and_labels(tmp_path, gz):
    arrays = make_idx_dataset(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert isinstance(ds, ImageDataset)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64
    assert ds.train.images.shape == (12, 6, 6, 1) and ds.test.images.shape == (5, 6, 6, 1)
    np.testing.assert_array_equal(ds.train.images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train.labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test.images[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test.labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.num_classes == 10 and ds.image_shape == (1, 6, 6)
    assert ds.train.images.flags.writeable


def test_fashion_mnist_class_names_and_env_path(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "fashion-mnist", gz=True)
    monkeypatch.setenv("FEDGEN_DATA", str(tmp_path))
    assert resolve_path("fashion-mnist", None) == tmp_path / "fashion-mnist"
    ds = load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist"
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10


def test_resolve_path_precedence(tmp_path, monkeypatch):
    assert resolve_path("fashion-mnist", None) == FMNIST_SYSTEM
    with pytest.raises(DatasetError, match="FEDGEN_DATA"):
        resolve_path("mnist", None)
    monkeypatch.setenv("FEDGEN_DATA", str(tmp_path))
    assert resolve_path("cifar10", None) == tmp_path / "cifar10"
    assert resolve_path("cifar10", "/elsewhere") == Path("/elsewhere")
    with pytest.raises(DatasetError, match="no path"):
        resolve_path("digits", None)


def test_mixed_plain_and_gz_files(tmp_path):
    arrays = make_idx_dataset(tmp_path, gz=True)
    # a plain file next to its .gz wins
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    ds = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(ds.test.labels, np.zeros(5))
    np.testing.assert_array_equal(ds.train.labels, arrays["train-labels-idx1-ubyte"])


def test_idx_truncated_names_file_and_byte_counts(tmp_path):
    make_idx_dataset(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(DatasetError) as exc:
        load_dataset("mnist", tmp_path)
    msg = str(exc.value)
    assert str(f) in msg and str(12 * 36) in msg and str(12 * 36 - 7) in msg


def test_idx_truncated_gz(tmp_path):
    make_idx_dataset(tmp_path, gz=True)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)


def test_idx_not_gzip(tmp_path):
    make_idx_dataset(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz.*gzip"):
        load_dataset("mnist", tmp_path)


def test_idx_wrong_magic(tmp_path):
    make_idx_dataset(tmp_path)
    # labels written where images are expected: magic 0x00000801, not 0x00000803
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(12, np.uint8))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.*0x00000801.*0x00000803"):
        load_dataset("mnist", tmp_path)


def test_idx_count_mismatch(tmp_path):
    make_idx_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(DatasetError, match="12 images.*11 labels"):
        load_dataset("mnist", tmp_path)


def test_idx_label_out_of_range(tmp_path):
    make_idx_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(DatasetError, match="labels must be in"):
        load_dataset("mnist", tmp_path)


def test_missing_file_in_folder(tmp_path):
    make_idx_dataset(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\[\.gz\] not found"):
        load_dataset("mnist", tmp_path)


# ------------------------------------------------------------------------------------ missing data


def test_missing_fashion_mnist_says_apt_get(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGEN_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "empty")


@pytest.mark.parametrize("name, hint", [
    ("mnist", "train-images-idx3-ubyte"),
    ("cifar10", "cifar-10-batches-py"),
    ("svhn", "train_32x32.mat"),
    ("image-folder", "class sub-folders"),
])
def test_missing_dataset_says_how_to_get_it(tmp_path, name, hint):
    with pytest.raises(DatasetError, match="FEDGEN_DATA") as exc:  # no path, no env
        load_dataset(name)
    assert hint in str(exc.value)
    with pytest.raises(DatasetError) as exc:
        load_dataset(name, tmp_path / "nope")
    assert hint in str(exc.value) and str(tmp_path / "nope") in str(exc.value)


def test_unknown_dataset_lists_available():
    with pytest.raises(DatasetError) as exc:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(exc.value)


def test_bad_options(tmp_path):
    with pytest.raises(DatasetError, match="channels"):
        load_dataset("digits", channels=2)
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(DatasetError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)


# ----------------------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("parent", [False, True])
def test_cifar10_layout_and_pixels(tmp_path, parent):
    folder = tmp_path / "cifar-10-batches-py"
    raw = make_cifar(folder)
    ds = load_dataset("cifar10", tmp_path if parent else folder)
    assert ds.train.images.shape == (15, 32, 32, 3) and ds.test.images.shape == (3, 32, 32, 3)
    assert ds.classes[:2] == ["plane", "car"] and ds.image_shape == (3, 32, 32)
    row = raw["data_batch_2"][1]  # train index 3 + 1
    img = ds.train.images[4]
    np.testing.assert_array_equal(img[..., 0].ravel(), row[:1024])  # red plane
    np.testing.assert_array_equal(img[..., 1].ravel(), row[1024:2048])
    np.testing.assert_array_equal(img[..., 2].ravel(), row[2048:])
    assert img[0, 1, 2] == row[2048 + 1]  # (y=0, x=1, blue)
    assert img[1, 0, 0] == row[32]  # (y=1, x=0, red)
    labels = np.concatenate([raw[f"data_batch_{i}_labels"] for i in range(1, 6)])
    np.testing.assert_array_equal(ds.train.labels, labels)
    np.testing.assert_array_equal(ds.test.labels, raw["test_batch_labels"])
    np.testing.assert_array_equal(ds.test.images.transpose(0, 3, 1, 2).reshape(3, -1), raw["test_batch"])


def test_cifar10_without_meta_uses_default_names(tmp_path):
    make_cifar(tmp_path, meta=False)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10


def test_cifar10_corrupt_batch(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_wrong_row_length(tmp_path):
    make_cifar(tmp_path)
    with (tmp_path / "test_batch").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DatasetError, match=r"test_batch.*3072"):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------------------------- SVHN


def test_svhn_layout_and_label_10_is_zero(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    x_test = rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)
    y_train = np.array([[10], [1], [9], [10]], np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x_train, "y": y_train})
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x_test, "y": np.array([[3], [10]], np.uint8)})
    ds = load_dataset("svhn", tmp_path)
    assert ds.train.images.shape == (4, 32, 32, 3) and ds.test.images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(ds.train.labels, [0, 1, 9, 0])
    np.testing.assert_array_equal(ds.test.labels, [3, 0])
    np.testing.assert_array_equal(ds.train.images[2], x_train[:, :, :, 2])
    np.testing.assert_array_equal(ds.test.images[1], x_test[..., 1])
    assert ds.classes == [str(i) for i in range(10)]


def test_svhn_count_mismatch(tmp_path):
    x = np.zeros((32, 32, 3, 3), np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.ones((3, 1), np.uint8)})
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.ones((2, 1), np.uint8)})
    with pytest.raises(DatasetError, match=r"test_32x32\.mat.*3 images but 2 labels"):
        load_dataset("svhn", tmp_path)


# ------------------------------------------------------------------------------------- image folder


def test_image_folder_rgb_split_and_resize(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("cat", "dog"):
        for i in range(5):
            write_png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "RGB")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset("image-folder", tmp_path, image_size=8, test_fraction=0.4, seed=3)
    assert ds.classes == ["cat", "dog"]
    assert ds.train.images.shape == (6, 8, 8, 3) and ds.test.images.shape == (4, 8, 8, 3)
    assert np.bincount(ds.train.labels).tolist() == [3, 3] and np.bincount(ds.test.labels).tolist() == [2, 2]
    again = load_dataset("image-folder", tmp_path, image_size=8, test_fraction=0.4, seed=3)
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    # each image equals PIL's own bilinear resize of one of the files of its class
    files = {cls: sorted((tmp_path / cls).glob("*.png")) for cls in ds.classes}
    expected = {cls: [np.asarray(Image.open(f).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
                      for f in fs] for cls, fs in files.items()}
    for img, label in zip(ds.train.images, ds.train.labels, strict=True):
        assert any(np.array_equal(img, e) for e in expected[ds.classes[label]])


def test_image_folder_default_size_is_64(tmp_path):
    for cls in ("a", "b"):
        for i in range(2):
            write_png(tmp_path / cls / f"{i}.PNG", np.full((5, 5), 7 * i, np.uint8), "L")
    ds = load_dataset("image-folder", tmp_path, test_fraction=0.5)
    assert ds.image_shape == (1, 64, 64)


def test_image_folder_grayscale_exact_and_train_test_dirs(tmp_path):
    imgs = {}
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("one", "two"):
            for i in range(n):
                a = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16 + 3 * i + len(cls) + (split == "test")
                imgs[(split, cls, i)] = a
                write_png(tmp_path / split / cls / f"{i:02d}.png", a, "L")
    ds = load_dataset("image-folder", tmp_path, image_size=4)
    assert ds.classes == ["one", "two"] and ds.image_shape == (1, 4, 4)
    assert ds.train.images.shape == (6, 4, 4, 1) and ds.test.images.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.test.labels, [0, 1])
    np.testing.assert_array_equal(ds.train.images[1, ..., 0], imgs[("train", "one", 1)])
    np.testing.assert_array_equal(ds.test.images[1, ..., 0], imgs[("test", "two", 0)])
    rgb = load_dataset("image-folder", tmp_path, image_size=4, channels=3)
    assert rgb.image_shape == (3, 4, 4)
    np.testing.assert_array_equal(rgb.train.images, np.repeat(ds.train.images, 3, axis=3))


def test_image_folder_mixed_modes_become_rgb_or_gray(tmp_path):
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    for split in ("train", "test"):
        write_png(tmp_path / split / "g" / "0.png", np.full((4, 4), 100, np.uint8), "L")
        write_png(tmp_path / split / "r" / "0.png", red, "RGB")
    ds = load_dataset("image-folder", tmp_path, image_size=4)
    assert ds.image_shape == (3, 4, 4)
    np.testing.assert_array_equal(ds.train.images[0], np.full((4, 4, 3), 100))
    np.testing.assert_array_equal(ds.train.images[1], red)
    gray = load_dataset("image-folder", tmp_path, image_size=4, channels=1)
    expected_l = np.asarray(Image.fromarray(red, "RGB").convert("L"))
    np.testing.assert_array_equal(gray.train.images[1, ..., 0], expected_l)


def test_image_folder_test_class_not_in_train(tmp_path):
    write_png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8), "L")
    write_png(tmp_path / "test" / "b" / "0.png", np.zeros((4, 4), np.uint8), "L")
    with pytest.raises(DatasetError, match="'b' is not among the training classes"):
        load_dataset("image-folder", tmp_path)


def test_image_folder_corrupt_image_names_file(tmp_path):
    for cls in ("a", "b"):
        for i in range(2):
            write_png(tmp_path / cls / f"{i}.png", np.zeros((4, 4), np.uint8), "L")
    bad = tmp_path / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_dataset("image-folder", tmp_path, test_fraction=0.5)
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_dataset("image-folder", tmp_path, test_fraction=0.5, channels=3)


def test_image_folder_truncated_png_names_file(tmp_path):
    rng = np.random.default_rng(5)
    for cls in ("a", "b"):
        for i in range(2):
            write_png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
    f = tmp_path / "a" / "1.png"
    f.write_bytes(f.read_bytes()[:500])  # cut inside the pixel data
    with pytest.raises(DatasetError, match=r"1\.png"):
        load_dataset("image-folder", tmp_path, test_fraction=0.5, channels=1)


def test_image_folder_empty(tmp_path):
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset("image-folder", tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset("image-folder", tmp_path)


def test_image_folder_too_few_for_split(tmp_path):
    write_png(tmp_path / "a" / "0.png", np.zeros((4, 4), np.uint8), "L")
    write_png(tmp_path / "b" / "0.png", np.zeros((4, 4), np.uint8), "L")
    with pytest.raises(DatasetError, match="stratified split"):
        load_dataset("image-folder", tmp_path)


# ------------------------------------------------------------------------------------------- digits


def test_digits_scaled_stratified_and_seeded():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", test_fraction=0.25, seed=5)
    assert ds.image_shape == (1, 8, 8) and ds.classes == [str(i) for i in range(10)]
    n = len(ds.train.labels) + len(ds.test.labels)
    assert n == 1797 and len(ds.test.labels) == 450
    assert ds.train.images.min() == 0 and ds.train.images.max() == 255
    # every value is round(v * 255 / 16) of an integer v in 0..16
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(ds.train.images).tolist()) <= allowed
    # stratified: each class's test share is within one image of 25%
    total = np.bincount(load_digits().target, minlength=10)
    assert np.all(np.abs(np.bincount(ds.test.labels, minlength=10) - 0.25 * total) <= 1)
    same = load_dataset("digits", test_fraction=0.25, seed=5)
    np.testing.assert_array_equal(same.test.images, ds.test.images)
    np.testing.assert_array_equal(same.test.labels, ds.test.labels)
    other = load_dataset("digits", test_fraction=0.25, seed=6)
    assert not np.array_equal(other.test.images, ds.test.images)


def test_digits_pixels_match_sklearn():
    from sklearn.datasets import load_digits

    d = load_digits()
    ds = load_dataset("digits", test_fraction=0.2, seed=0)
    scaled = {np.rint(im * 255 / 16).astype(np.uint8).tobytes(): int(t)
              for im, t in zip(d.images, d.target, strict=True)}
    for img, label in zip(ds.test.images[:50], ds.test.labels[:50], strict=True):
        assert scaled[img[..., 0].tobytes()] == label


# ------------------------------------------------------------------------------ resize and channels


def test_resize_matches_pil_per_image():
    rng = np.random.default_rng(4)
    for c, mode in ((1, "L"), (3, "RGB")):
        x = rng.integers(0, 256, (40, 28, 28, c), dtype=np.uint8)
        x[:10] = np.where(rng.random((10, 28, 28, c)) < 0.5, 0, 255)
        for size in (7, 14, 27, 32, 64):
            got = _resize(x, size, chunk=16)
            pil = [Image.fromarray(im[..., 0] if c == 1 else im, mode) for im in x]
            ref = np.stack([np.asarray(p.resize((size, size), Image.Resampling.BILINEAR)) for p in pil])
            ref = ref.reshape(len(x), size, size, c)
            np.testing.assert_array_equal(got, ref, err_msg=f"c={c} size={size}")
    rect = rng.integers(0, 256, (3, 10, 6, 1), dtype=np.uint8)
    ref = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((8, 8), Image.Resampling.BILINEAR))
                    for im in rect])[..., None]
    np.testing.assert_array_equal(_resize(rect, 8), ref)


def test_load_with_image_size_and_channels(tmp_path):
    arrays = make_idx_dataset(tmp_path, size=28)
    ds = load_dataset("mnist", tmp_path, image_size=32, channels=3)
    assert ds.image_shape == (3, 32, 32) and ds.train.images.dtype == np.uint8
    first = Image.fromarray(arrays["train-images-idx3-ubyte"][0]).resize((32, 32), Image.Resampling.BILINEAR)
    for ch in range(3):
        np.testing.assert_array_equal(ds.train.images[0, ..., ch], np.asarray(first))
    same = load_dataset("mnist", tmp_path, image_size=28)
    np.testing.assert_array_equal(same.train.images[..., 0], arrays["train-images-idx3-ubyte"])


def test_rgb_to_gray_uses_pil_l(tmp_path):
    raw = make_cifar(tmp_path, per_batch=2)
    ds = load_dataset("cifar10", tmp_path, channels=1, image_size=16)
    assert ds.image_shape == (1, 16, 16)
    rgb = raw["test_batch"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    expected = Image.fromarray(rgb, "RGB").convert("L").resize((16, 16), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(ds.test.images[0, ..., 0], np.asarray(expected))


# ------------------------------------------------------------------------------ real Fashion-MNIST


@pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10


def test_image_folder_16bit_gray_is_rescaled(tmp_path):
    a16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(a16).save(tmp_path / split / "a" / "0.png")  # a 16-bit grey PNG: mode I;16
        write_png(tmp_path / split / "b" / "0.png", np.full((4, 4), 9, np.uint8), "L")
    ds = load_dataset("image-folder", tmp_path, image_size=4)
    assert ds.image_shape == (1, 4, 4)
    np.testing.assert_array_equal(ds.train.images[0, ..., 0], np.arange(16).reshape(4, 4) * 17)
