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


def write_cifar_root(root: Path, name: str, n_train: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py/`` (five training batches, ``test_batch``, ``batches.meta``) or
    ``root/cifar-100-python/`` (``train``, ``test``, ``meta``) as the pickles torchvision's CIFAR classes read.

    Images are seeded random bytes in CIFAR's row layout (3,072 bytes: the red plane, then green, then blue);
    returns the images as (N, 3, 32, 32) and the labels.
    """
    import pickle

    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = Path(root) / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        out[f"{split}_images"], out[f"{split}_labels"] = images, np.array(labels)
        if name == "cifar10" and split == "train":
            parts = np.array_split(np.arange(n), 5)
            files = [(f"data_batch_{i + 1}", p) for i, p in enumerate(parts)]
        else:
            files = [("test_batch" if name == "cifar10" else split, np.arange(n))]
        for filename, idx in files:
            entry = {"data": images[idx].reshape(len(idx), 3072), label_key: [labels[i] for i in idx]}
            (folder / filename).write_bytes(pickle.dumps(entry))
    meta_name, meta_key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"class {c}" for c in range(classes)]}))
    return out
