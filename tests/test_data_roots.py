"""The real-data loaders on data roots written by the tests in torchvision's on-disk format."""

import numpy as np
import pytest
import torch
from data_roots import write_mnist_root

from fragile.data.datasets import load_small_mnist, resolve_data_root
from fragile.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    return root, write_mnist_root(root, n_train=60_000, n_test=10_000)


def test_small_mnist_is_koh_and_liangs_split(mnist_root):
    root, arrays = mnist_root
    small = load_small_mnist(root)
    # Koh & Liang's load_small_mnist, step by step with NumPy's global legacy generator, as they wrote it.
    np.random.seed(0)  # noqa: NPY002 - the legacy global generator is what Koh & Liang used
    rest_images, rest_labels = arrays["train_images"][5000:], arrays["train_labels"][5000:]
    perm = np.arange(len(rest_labels))
    np.random.shuffle(perm)  # noqa: NPY002 - as above
    perm = perm[: int(len(rest_labels) / 10)]
    assert len(small.train) == 5500 and len(small.test) == 10_000
    assert torch.equal(small.train.x[:, 0], torch.as_tensor(rest_images[perm], dtype=torch.float64) / 255)
    assert torch.equal(small.train.y, torch.as_tensor(rest_labels[perm], dtype=torch.long))
    assert torch.equal(small.test.y, torch.as_tensor(arrays["t10k_labels"], dtype=torch.long))
    assert small.train.x.shape == (5500, 1, 28, 28) and float(small.train.x.max()) <= 1.0
    # The split depends only on sizes and seed: its fingerprint is fixed for the real 60,000-image set.
    assert small.indices_checksum == load_small_mnist(root).indices_checksum == "6847b45a30991dcd"
    assert load_small_mnist(root, seed=1).indices_checksum != small.indices_checksum


def test_missing_root_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(InvalidArgumentError, match="data_root=.*holds no torchvision MNIST"):
        load_small_mnist(tmp_path)
    monkeypatch.setenv("FRAGILE_DATA", str(tmp_path / "d"))
    assert resolve_data_root(None) == tmp_path / "d" and resolve_data_root("x") == tmp_path.__class__("x")
    monkeypatch.delenv("FRAGILE_DATA")
    assert resolve_data_root(None) is None and resolve_data_root("") is None


def test_class_balanced_split_of_the_offline_digits():
    from fragile.data.datasets import load_mnist_digits, split_by_class

    digits = load_mnist_digits(dtype=torch.float32)
    train, test = split_by_class(digits, 40, 10, seed=3)
    assert torch.equal(torch.bincount(train.y), torch.full((10,), 40)) and torch.equal(
        torch.bincount(test.y), torch.full((10,), 10)
    )
    # No image is in both sets, and each set's images are really digits of its labels (rows of the source).
    rows = {r.numpy().tobytes(): int(label) for r, label in zip(digits.x, digits.y)}
    tr = {r.numpy().tobytes() for r in train.x}
    te = {r.numpy().tobytes() for r in test.x}
    assert len(tr) == 400 and len(te) == 100 and not tr & te
    assert all(rows[r.numpy().tobytes()] == int(label) for r, label in zip(train.x, train.y))
    again = split_by_class(digits, 40, 10, seed=3)[0]
    assert torch.equal(again.x, train.x) and not torch.equal(split_by_class(digits, 40, 10, seed=4)[0].x, train.x)
    with pytest.raises(InvalidArgumentError, match="n_train_per_class \\+ n_test_per_class = 501 is not allowed"):
        split_by_class(digits, 500, 1)
