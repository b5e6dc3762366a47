"""ImageFolder data (ImageNet's layout) read by torchvision, on the offline stand-in the project writes."""

import numpy as np
import pytest
import torch
from PIL import Image

from fragile.data.image_folders import IMAGENET_MEAN, IMAGENET_STD, load_image_folder, write_digit_folders
from fragile.errors import InvalidArgumentError


def test_the_stand_in_is_written_in_imagenets_layout_and_read_back_pixel_for_pixel(tmp_path):
    root = write_digit_folders(tmp_path / "imagenet", n_train_per_class=3, n_val_per_class=2, image_size=32)
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"digit_{d}" for d in range(10)]
    assert len(list((root / "val" / "digit_7").glob("*.png"))) == 2
    raw = load_image_folder(root, "train", image_size=32, normalise=False, dtype=torch.float64)
    assert raw.x.shape == (30, 3, 32, 32) and raw.y.tolist() == sorted(list(range(10)) * 3)
    first = np.asarray(Image.open(root / "train" / "digit_0" / "00000.png").convert("RGB"), dtype=np.float64) / 255
    assert torch.equal(raw.x[0], torch.as_tensor(first).permute(2, 0, 1))
    normed = load_image_folder(root, "val", image_size=16, dtype=torch.float64)
    assert normed.x.shape == (20, 3, 16, 16)
    lowest = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))  # a black pixel, by hand
    assert float(normed.x.min()) == pytest.approx(lowest)
    again = write_digit_folders(tmp_path / "again", n_train_per_class=3, n_val_per_class=2, image_size=32)
    assert torch.equal(load_image_folder(again, "train", image_size=32).x, load_image_folder(root, "train", image_size=32).x)


def test_train_and_val_are_disjoint(tmp_path):
    root = write_digit_folders(tmp_path, n_train_per_class=5, n_val_per_class=5, image_size=28)
    train = load_image_folder(root, "train", image_size=28, normalise=False).x.flatten(1)
    val = load_image_folder(root, "val", image_size=28, normalise=False).x.flatten(1)
    assert not any(bool((train == row).all(dim=1).any()) for row in val)


def test_missing_or_empty_folders_are_named(tmp_path):
    with pytest.raises(InvalidArgumentError, match="has no 'val' folder"):
        load_image_folder(tmp_path, "val", image_size=32)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(InvalidArgumentError, match="is not an ImageFolder"):
        load_image_folder(tmp_path, "train", image_size=32)
    with pytest.raises(InvalidArgumentError, match="image_size=4 is not allowed"):
        load_image_folder(tmp_path, "train", image_size=4)
