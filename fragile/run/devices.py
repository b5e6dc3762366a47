"""Where tensors live: the ``device`` parameter of every chapter (``cpu``, ``cuda``, ``cuda:N`` or ``auto``)."""

from __future__ import annotations

import re

import torch

from fragile.errors import InvalidArgumentError

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")


def check_device_name(device: str) -> str:
    """Raise unless ``device`` is spelled as one of :data:`DEVICE_CHOICES` (whether it exists is checked by
    :func:`resolve_device`, where the work runs)."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        raise InvalidArgumentError(f"device={device!r} is not allowed; choose one of {list(DEVICE_CHOICES)}")
    return device


def resolve_device(device: str) -> torch.device:
    """The torch device a chapter computes on; checked before any work.

    ``auto`` is the first CUDA device when torch sees one, else the CPU. Numbers are bit-reproducible
    on the CPU only (docs/conventions.md#stack); GPU results agree to round-off.

    Raises:
        InvalidArgumentError: an unknown name, or a CUDA device that torch does not see here.
    """
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise InvalidArgumentError(
                f"device={device!r} is not allowed here: torch sees {count} CUDA device(s); use 'cpu' or 'auto'"
            )
    return torch.device(device)
