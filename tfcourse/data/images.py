"""Real images that need no download, for the Vision Transformer (chapter 11).

* :func:`digits`: scikit-learn's 1,797 handwritten digits (8x8 pixels, grey, 10 classes), which ship inside the
  scikit-learn wheel, split into a stratified training and test set.
* :func:`read_idx`, :func:`fashion_mnist_available`, :func:`load_fashion_mnist`: Fashion-MNIST (Xiao, Rasul and
  Vollgraf 2017; 60,000 + 10,000 grey 28x28 images of clothing, 10 classes) from Debian's package
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``, Expat licence), which puts the four
  gzipped IDX files of the original release in ``/usr/share/datasets/fashion-mnist``. Nothing is downloaded: where
  the package is not installed, :func:`fashion_mnist_available` is ``False``.

Images are ``float32`` tensors ``(n, 1, H, W)`` with values in ``[0, 1]``; labels are ``int64`` ``(n,)``.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["ImageSplit", "digits", "read_idx", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES",
           "fashion_mnist_available", "load_fashion_mnist"]

#: Where Debian's ``dataset-fashion-mnist`` installs the data.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The four files of the original release, by split: (images, labels).
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
#: The class names, by label.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


class ImageSplit(NamedTuple):
    """A training and a test set: images ``(n, 1, H, W)`` float32 in ``[0, 1]``, labels ``(n,)`` int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def digits(test_size: float = 0.2, seed: int = 0) -> ImageSplit:
    """scikit-learn's handwritten digits, split into a training and a test set with the same class proportions.

    The 1,797 images are 8x8 blocks of counts 0..16 (each pixel counts the ink of a 4x4 block of a 32x32 bitmap
    of the UCI "Optical Recognition of Handwritten Digits" data, written by 43 people); they are divided by 16.
    ``test_size=0.2`` gives 1,437 training and 360 test images.

    Args:
        test_size: the share of the test set, in ``(0, 1)``.
        seed: the seed of the (stratified) shuffle.

    Raises:
        ValueError: for ``test_size`` outside ``(0, 1)`` or a negative ``seed``.
    """
    if isinstance(test_size, bool) or not isinstance(test_size, float) or not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a float in (0, 1), got {test_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(data.target, dtype=torch.long)
    train, test = train_test_split(np.arange(len(labels)), test_size=test_size, random_state=seed,
                                   stratify=data.target)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return ImageSplit(images[train], labels[train], images[test], labels[test])


def read_idx(path: str | Path) -> np.ndarray:
    """An array from a file in the IDX format of MNIST and Fashion-MNIST (gzipped if the name ends in ``.gz``).

    The format: two zero bytes, a type code (``0x08``: unsigned bytes, the only one these data sets use), the
    number of dimensions ``k``, ``k`` big-endian int32 sizes, then the data in C order. Image files are
    ``(n, rows, cols)`` (a 16-byte header), label files ``(n,)`` (8 bytes).

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: for a header that is not IDX with unsigned bytes, or data of the wrong length.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path.name}: not an IDX file of unsigned bytes (header {raw[:4]!r})")
    k = raw[3]
    header = 4 + 4 * k
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(k))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path.name}: the header promises shape {shape}, the file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_available(root: str | Path = FASHION_MNIST_DIR) -> bool:
    """Whether the four Fashion-MNIST files are in ``root`` (Debian's ``dataset-fashion-mnist`` installed)."""
    root = Path(root)
    return all((root / name).is_file() for files in FASHION_MNIST_FILES.values() for name in files)


def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's training (60,000) or test (10,000) images ``(n, 1, 28, 28)`` float32 in ``[0, 1]`` and labels
    ``(n,)`` int64, read from ``root``.

    Raises:
        ValueError: for a ``split`` other than ``"train"`` or ``"test"``, or files that do not match.
        FileNotFoundError: if the files are not there; the message says how to install them.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    root = Path(root)
    images_file, labels_file = (root / name for name in FASHION_MNIST_FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        raise FileNotFoundError(f"Fashion-MNIST is not in {root}: on Debian or Ubuntu, `apt-get install "
                                "dataset-fashion-mnist` puts it there (nothing is downloaded at run time)")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{split}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]   # (n, 1, 28, 28)
    return x, torch.from_numpy(labels.astype(np.int64))
