"""Keep freed memory in the process instead of handing it back to the OS after every large tensor.

glibc's malloc serves large blocks with ``mmap`` and returns them with ``munmap`` (and trims the heap) as
soon as they are freed, so a loop that allocates and frees the same big temporaries — an HVP vmapped over
tangents, a stack of models — pays a page fault for every page, every iteration. Dask's nanny makes this
worse on purpose (it sets ``MALLOC_TRIM_THRESHOLD_=65536`` to fight fragmentation in long-lived workers).
Measured on the small-MNIST CNN's Hessian rows (``benchmarks/exact_hessian.py``): about 1.4× faster on one
core, and the kernel time that made two workers slow each other down is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_state: dict[str, bool] = {}


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes`` for this process (idempotent).

    Blocks below the threshold are then reused from the heap instead of being mapped and unmapped, and the
    heap is not trimmed until that much is free. Costs memory: the process keeps its peak heap. A no-op
    (returning False) where the C library is not glibc.

    Returns:
        True when the thresholds are set (now or by an earlier call).
    """
    if "done" in _state:
        return _state["done"]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            ok = False
    if not ok:
        log.debug("allocator thresholds not set (no glibc mallopt)")
    _state["done"] = ok
    return ok
