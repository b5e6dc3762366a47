"""Write small data roots in torchvision's on-disk formats, so the real loaders run without downloads."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_mnist_root(root: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/MNIST/raw/`` with the four uncompressed IDX files torchvision's ``MNIST`` reads.

    Images are seeded random bytes and labels cycle through 0-9 in a seeded order; returns the arrays.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
        out[f"{prefix}_images"], out[f"{prefix}_labels"] = images, labels
    return out
