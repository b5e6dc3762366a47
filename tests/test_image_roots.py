"""torchvision's MNIST and CIFAR loaders on data roots the tests write in their on-disk formats, and the
offline CIFAR stand-in."""

import pytest
import torch
from data_roots import write_cifar_root, write_mnist_root

from fragile.data.image_roots import NORMALISATION, digits_as_cifar, load_image_set
from fragile.errors import InvalidArgumentError


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_roots_are_read_pixel_for_pixel(tmp_path, name):
    arrays = write_cifar_root(tmp_path, name, n_train=23, n_test=7)
    for split, train in (("train", True), ("test", False)):
        raw = load_image_set(name, tmp_path, train=train, normalise=False, verify_checksums=False, dtype=torch.float64)
        assert raw.x.shape == (len(arrays[f"{split}_labels"]), 3, 32, 32)
        assert torch.equal(raw.x, torch.as_tensor(arrays[f"{split}_images"], dtype=torch.float64) / 255)
        assert raw.y.tolist() == arrays[f"{split}_labels"].tolist()
    normed = load_image_set(name, tmp_path, train=True, verify_checksums=False, dtype=torch.float64)
    mean, std = NORMALISATION[name]
    c, i, j = 2, 5, 17  # one pixel of the blue channel, by hand
    expected = (arrays["train_images"][0, c, i, j] / 255 - mean[c]) / std[c]
    assert float(normed.x[0, c, i, j]) == pytest.approx(expected)


def test_unofficial_cifar_files_are_refused_unless_checksums_are_off(tmp_path):
    write_cifar_root(tmp_path, "cifar10", n_train=10, n_test=5)
    with pytest.raises(InvalidArgumentError, match="data_root=.* holds no torchvision cifar10"):
        load_image_set("cifar10", tmp_path, train=True)


def test_mnist_root_is_read_and_normalised(tmp_path):
    arrays = write_mnist_root(tmp_path, n_train=30, n_test=12)
    test = load_image_set("mnist", tmp_path, train=False, dtype=torch.float64)
    assert test.x.shape == (12, 1, 28, 28) and test.y.tolist() == arrays["t10k_labels"].tolist()
    raw = torch.as_tensor(arrays["t10k_images"], dtype=torch.float64).unsqueeze(1) / 255
    assert torch.allclose(test.x, (raw - 0.1307) / 0.3081)


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("svhn", {}, "name='svhn' is not allowed"),
        ("mnist", {"data_root": "/nonexistent/root"}, "data_root='/nonexistent/root' holds no torchvision mnist"),
    ],
)
def test_bad_input_is_named(tmp_path, name, bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        load_image_set(name, bad.get("data_root", tmp_path), train=True)


def test_digits_stand_in_for_cifar_keep_the_digits():
    stand_in = digits_as_cifar(normalise=False, dtype=torch.float64)
    from fragile.data.datasets import load_mnist_digits

    digits = load_mnist_digits(torch.float64)
    assert stand_in.x.shape == (5000, 3, 32, 32) and torch.equal(stand_in.y, digits.y)
    assert torch.equal(stand_in.x[:, 1, 2:30, 2:30], digits.x[:, 0]) and torch.equal(stand_in.x[:, 0], stand_in.x[:, 2])
    assert float(stand_in.x[:, :, :2].abs().max()) == 0.0  # the padding is background
    normed = digits_as_cifar(dtype=torch.float64).x
    assert float(normed.mean()) == pytest.approx(0.0, abs=1e-9) and float(normed.std()) == pytest.approx(1.0)
    assert "not CIFAR-10" in digits_as_cifar().source
