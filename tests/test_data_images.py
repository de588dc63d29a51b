"""tfcourse.data.images: the digits split, and the IDX reader and Fashion-MNIST loader on small files written here
(the real Fashion-MNIST is used only where Debian's package is installed)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from tfcourse.data.images import (FASHION_MNIST_FILES, digits, fashion_mnist_available, load_fashion_mnist,
                                  read_idx)


def test_digits_split_sizes_range_and_stratification():
    split = digits()
    assert split.train_images.shape == (1437, 1, 8, 8) and split.test_images.shape == (360, 1, 8, 8)
    assert split.train_images.dtype == torch.float32 and split.train_labels.dtype == torch.long
    assert split.train_images.min() == 0.0 and split.train_images.max() == 1.0
    counts = torch.bincount(split.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # about 36 of each digit: stratified
    again = digits()
    assert torch.equal(again.test_images, split.test_images) and torch.equal(again.train_labels, split.train_labels)
    other = digits(seed=1)
    assert not torch.equal(other.test_labels, split.test_labels)
    everything = torch.cat([split.train_images, split.test_images]).reshape(1797, -1)
    assert len(torch.unique(everything, dim=0)) > 1700  # the two sets are a partition of the (distinct) images


@pytest.mark.parametrize("kwargs", [dict(test_size=0.0), dict(test_size=1), dict(seed=-1)])
def test_digits_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        digits(**kwargs)


def write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_fashion(root, n_train=5, n_test=3):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(root / FASHION_MNIST_FILES[split][0], images)
        write_idx(root / FASHION_MNIST_FILES[split][1], labels)
        arrays[split] = images, labels
    return arrays


def test_read_idx_reads_what_was_written(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b", array[0, 0], gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "b"), array[0, 0])
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="unsigned bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="promises"):
        read_idx(tmp_path / "short")


def test_load_fashion_mnist_from_a_directory(tmp_path):
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    arrays = fake_fashion(tmp_path)
    assert fashion_mnist_available(tmp_path)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split, tmp_path)
        images, labels = arrays[split]
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
        assert torch.allclose(x[:, 0] * 255, torch.tensor(images, dtype=torch.float32))
        assert torch.equal(y, torch.tensor(labels))
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", tmp_path)


@pytest.mark.skipif(not fashion_mnist_available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10
