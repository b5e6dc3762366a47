"""The committed result store: finished jobs kept in the repository, so that a fresh clone renders the book from
them instead of recomputing CPU-hours, and a later run adds only what is missing.

An entry has the parts of a cache entry (:mod:`fragile.run.cache`: ``config.json``, the result as
``payload.json`` + ``payload.npz``, never a pickle, and one SHA-256 over all of them), under
``<root>/<job name>/<key>/``; beside the result, its payload records what computing it cost
(:class:`JobCompute`), which the chapters add up into the compute they state at their top.

An entry is keyed by the job's configuration and :data:`NUMERICS_VERSION`, not by the code
digest the cache uses: a refactor that moves no number keeps every stored job, and a change that moves numbers
raises the version, which retires every entry at once. ``fragile verify`` is what catches a change that moved
numbers without raising it.

Unlike the cache, the store is tracked content: an entry that fails its checks is not silently discarded but
refused with :class:`StoreError`, naming the job and how to restore it. The store stays under
:data:`BUDGET_BYTES`; a save that would pass it is refused and leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragile.errors import FragileError
from fragile.run.cache import CacheCorruptError, ResultCache

log = logging.getLogger(__name__)

NUMERICS_VERSION = 2
"""Raised by hand whenever a change to the library moves a stored number (then the affected jobs are recomputed).
2: the exact Hessian of chain models by :mod:`fragile.core.blocked_hessian` (moves exact influences by round-off)."""
NUMERICS_KEY = "numerics"
BUDGET_BYTES = 100 * 2**20
"""The most the store may hold on disk: it is committed, and every clone carries it."""


class StoreError(FragileError):
    """A store entry that cannot be used (damaged, or saved under another configuration), or a save past the
    budget; the message names the job."""


@dataclass(frozen=True)
class JobCompute:
    """What computing a stored job took and where.

    Attributes:
        cpu_seconds: the CPU time of the process that ran it (:func:`time.process_time`: on a CPU, what the job
            cost, whatever else the machine was doing; every job runs on one torch thread).
        wall_seconds: its wall-clock time (on CUDA, what the job cost; on a shared CPU, more than it cost).
        device: ``cpu`` or ``cuda``.
        arithmetic: :func:`~fragile.run.arithmetic.machine_arithmetic` of the machine that ran it, which decides
            whether a recomputation should give the same bits.

    Times and arithmetic are None for a job published from a cache entry, which records neither.
    """

    cpu_seconds: float | None
    wall_seconds: float | None
    device: str
    arithmetic: str | None

    @property
    def seconds(self) -> float | None:
        """What the job cost on its device: CPU seconds on a CPU, wall seconds on a GPU."""
        return self.wall_seconds if self.device == "cuda" else self.cpu_seconds


@dataclass(frozen=True, order=True)
class StoredJob:
    """One entry of the store: the job's name and the key of its configuration."""

    name: str
    key: str


class ResultStore:
    """A directory of finished jobs keyed by ``(name, config, NUMERICS_VERSION)``.

    Args:
        root: the store's directory (the book's is ``results/store``); created on first save.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._entries = ResultCache(self.root)

    @staticmethod
    def keyed(config: dict[str, Any]) -> dict[str, Any]:
        """``config`` plus :data:`NUMERICS_KEY`: what an entry is keyed by and its ``config.json`` records.

        Raises:
            StoreError: ``config`` already holds :data:`NUMERICS_KEY`.
        """
        if NUMERICS_KEY in config:
            raise StoreError(f"a job config may not hold {NUMERICS_KEY!r}: the store adds the numerics version itself")
        return {**config, NUMERICS_KEY: NUMERICS_VERSION}

    def path(self, name: str, config: dict[str, Any]) -> Path:
        return self._entries.path(name, self.keyed(config))

    def load(self, name: str, config: dict[str, Any]) -> Any | None:
        """The stored result of job ``name`` with ``config``, or None when the store does not hold it.

        Raises:
            StoreError: the entry is damaged (a part missing or altered) or was saved under another configuration;
                it is left in place, since the store is tracked: restore it from git or delete it to recompute.
        """
        entry = self._load(name, config)
        return None if entry is None else entry["result"]

    def compute(self, name: str, config: dict[str, Any]) -> JobCompute | None:
        """What computing the stored job took, or None when the store does not hold it (damage raises as in
        :meth:`load`)."""
        entry = self._load(name, config)
        return None if entry is None else JobCompute(**entry["compute"])

    def _load(self, name: str, config: dict[str, Any]) -> dict[str, Any] | None:
        try:
            entry = self._entries.load(name, self.keyed(config))
        except CacheCorruptError as exc:
            raise StoreError(
                f"stored job {name!r} cannot be used ({exc}); restore it with `git checkout -- {self.path(name, config)}` "
                "or delete that folder to recompute the job"
            ) from None
        if entry is not None and not (isinstance(entry, dict) and set(entry) == {"result", "compute"}):
            raise StoreError(
                f"stored job {name!r} is not a store entry (a result and its compute record); delete "
                f"{self.path(name, config)} to recompute the job"
            )
        return entry

    def save(self, name: str, config: dict[str, Any], payload: Any, compute: JobCompute) -> None:
        """Publish job ``name``'s result and what computing it took, atomically; an entry already there stays
        (the same job gives the same numbers).

        Raises:
            StoreError: the store would pass :data:`BUDGET_BYTES` with this entry (the entry is removed again).
        """
        path = self.path(name, config)
        existed = path.is_dir()
        self._entries.save(name, self.keyed(config), {"result": payload, "compute": dataclasses.asdict(compute)})
        if existed:
            return
        size = self.size()
        if size > BUDGET_BYTES:
            shutil.rmtree(path, ignore_errors=True)
            raise StoreError(
                f"storing job {name!r} would bring {self.root} to {size / 2**20:.1f} MiB, past its budget of "
                f"{BUDGET_BYTES / 2**20:.0f} MiB; store fewer or smaller results (e.g. leave out per-point arrays)"
            )
        log.info("stored %s", path)

    def entries(self) -> list[StoredJob]:
        """Every entry of the store (whatever its numerics version), sorted by name."""
        if not self.root.is_dir():
            return []
        found = (p.parent for p in self.root.rglob("config.json"))
        return sorted(StoredJob(str(p.parent.relative_to(self.root)), p.name) for p in found)

    def size(self) -> int:
        """Bytes on disk of every file in the store."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.is_dir() else 0

    def holds(self, name: str, config: dict[str, Any]) -> bool:
        """Whether the store has an entry for this job at this numerics version (without loading it)."""
        return self.path(name, config).is_dir()
