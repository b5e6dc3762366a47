"""Recompute stored jobs from scratch and compare them with the store: the store as a regression test of the
numerics (``fragile verify``).

A job's recomputed result is compared with its stored one value by value: *identical* when every number and every
array is the same bits, *close* when they differ only within a relative tolerance, else *different*, with the first
place they differ. What passes depends on the arithmetic (:mod:`fragile.run.arithmetic`) the store recorded for the
job: under the same one, only *identical* (every job runs on one torch thread, so the same code gives the same bits);
under another (another CPU model or torch, a GPU), *close* too. A job that fails means the numerics moved without
:data:`~fragile.run.store.NUMERICS_VERSION` being raised, or (under other arithmetic) that its computation amplifies
rounding past the tolerance, as long float32 training can.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from fragile.errors import check_int, check_positive
from fragile.run.arithmetic import machine_arithmetic
from fragile.run.store import ResultStore
from fragile.run.sweep import Job, job_device

DEFAULT_RTOL = 1e-6
"""How far a recomputed number may move, relative to the largest magnitude of its array (or to itself, for a single
number), and still be *close*."""


def is_timing(name: str) -> bool:
    """Whether a result's field or key named ``name`` holds a wall time (``seconds``, ``train_seconds``…): measured,
    not computed, so never compared."""
    return name == "seconds" or name.endswith(("_seconds", "_s"))


class Agreement(StrEnum):
    IDENTICAL = "identical"
    CLOSE = "close"
    DIFFERENT = "different"


@dataclass(frozen=True)
class Verified:
    """One stored job recomputed.

    Attributes:
        name: the job.
        agreement: identical, close (within ``rtol``) or different.
        where: the first place the results differ beyond bits (``result['spearman']``), or "".
        max_relative: the largest relative difference of any number (0 when identical).
        seconds: how long the recomputation took.
        stored_arithmetic: the arithmetic the store recorded for the job (None: not recorded).
        arithmetic: the arithmetic it was recomputed on.
    """

    name: str
    agreement: Agreement
    where: str
    max_relative: float
    seconds: float
    stored_arithmetic: str | None
    arithmetic: str

    @property
    def same_arithmetic(self) -> bool:
        return self.stored_arithmetic == self.arithmetic

    @property
    def passed(self) -> bool:
        """Identical, or close when the job was stored under other arithmetic."""
        allowed = (Agreement.IDENTICAL,) if self.same_arithmetic else (Agreement.IDENTICAL, Agreement.CLOSE)
        return self.agreement in allowed


def compare(stored: Any, recomputed: Any, rtol: float = DEFAULT_RTOL) -> tuple[Agreement, str, float]:
    """How ``recomputed`` agrees with ``stored``: the :class:`Agreement`, the first place they differ (``""`` when
    identical) and the largest relative difference of any number (``inf`` where the structure, a type, a shape or
    a non-numeric value differs). Wall times (:func:`is_timing`) are left out. Cost: one pass over both."""
    check_positive("rtol", rtol)
    structural: list[str] = []
    moved: list[tuple[str, float]] = []

    def arrays(path: str, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape or a.dtype != b.dtype:
            structural.append(f"{path} (shape or dtype: {a.shape} {a.dtype} against {b.shape} {b.dtype})")
        elif a.dtype.kind not in "fc":
            if not np.array_equal(a, b):
                structural.append(path)
        elif not np.array_equal(a, b, equal_nan=True):
            both_nan = np.isnan(a) & np.isnan(b)
            if (np.isnan(a) != np.isnan(b)).any():
                structural.append(f"{path} (NaN in one only)")
                return
            # Relative to the array's largest magnitude: an entry that is round-off away from zero is not "moved".
            diff, scale = np.abs(a - b)[~both_nan], float(np.max(np.maximum(np.abs(a), np.abs(b))[~both_nan]))
            moved.append((path, float(np.max(diff)) / (scale if scale > 0 else 1.0)))

    def walk(path: str, a: Any, b: Any) -> None:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
        b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b
        if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            structural.append(f"{path} (type {type(a).__name__} against {type(b).__name__})")
        elif dataclasses.is_dataclass(a):
            for f in dataclasses.fields(a):
                if not is_timing(f.name):
                    walk(f"{path}.{f.name}", getattr(a, f.name), getattr(b, f.name))
        elif isinstance(a, dict):
            if set(a) != set(b):
                structural.append(f"{path} (keys)")
            else:
                for k in a:
                    if not (isinstance(k, str) and is_timing(k)):
                        walk(f"{path}[{k!r}]", a[k], b[k])
        elif isinstance(a, (list, tuple)):
            if len(a) != len(b):
                structural.append(f"{path} (length)")
            else:
                for n, (x, y) in enumerate(zip(a, b)):
                    walk(f"{path}[{n}]", x, y)
        elif isinstance(a, np.ndarray):
            arrays(path, a, b)
        elif isinstance(a, float) or isinstance(b, float):  # an int against a float compares as numbers
            arrays(path, np.asarray(a, dtype=float), np.asarray(b, dtype=float))
        elif a != b:
            structural.append(path)

    walk("result", stored, recomputed)
    if structural:
        return Agreement.DIFFERENT, structural[0], math.inf
    if not moved:
        return Agreement.IDENTICAL, "", 0.0
    worst = max(r for _, r in moved)
    beyond = [p for p, r in moved if r > rtol]
    return (Agreement.DIFFERENT, beyond[0], worst) if beyond else (Agreement.CLOSE, moved[0][0], worst)


def verify(
    jobs: Sequence[Job], store: ResultStore, *, sample: int | None = None, seed: int = 0, rtol: float = DEFAULT_RTOL
) -> list[Verified]:
    """Recompute the stored ones of ``jobs`` (all, or ``sample`` of them drawn with ``seed``) from scratch, on one
    torch thread as the sweep runs them, and compare each with the store (:attr:`Verified.passed` says whether it
    passes under its arithmetic). Jobs the store does not hold are skipped.

    Cost: each sampled job's full computation.
    """
    if sample is not None:
        check_int("sample", sample, minimum=1)
    stored = [j for j in jobs if store.holds(j.name, j.config)]
    if sample is not None and sample < len(stored):
        picked = np.random.default_rng(seed).choice(len(stored), size=sample, replace=False)
        stored = [stored[i] for i in sorted(picked)]
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in stored:
            start = time.perf_counter()
            recomputed = job.fn(**job.config, **(job.runtime or {}))
            agreement, where, worst = compare(store.load(job.name, job.config), recomputed, rtol)
            took = store.compute(job.name, job.config)
            out.append(
                Verified(
                    job.name,
                    agreement,
                    where,
                    worst,
                    time.perf_counter() - start,
                    took.arithmetic if took is not None else None,
                    machine_arithmetic(job_device(job)),
                )
            )
    finally:
        torch.set_num_threads(threads)
    return out
