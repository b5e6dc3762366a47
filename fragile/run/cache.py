"""On-disk cache of expensive results (trained models, Hessians, retraining results), keyed by config.

Each entry lives in ``<root>/<name>/<hash of config>/`` with ``config.json``, the result as
``payload.json`` + ``payload.npz`` (:mod:`fragile.run.payload`: JSON and raw arrays, never a pickle, so loading
an entry runs no code whoever wrote it) and the SHA-256 of all three. An entry is published by renaming a
finished temporary folder, so an interrupted run leaves no partial entry and the next run recomputes only what did
not finish; two processes publishing one entry at once leave one of them. On load the digest and the saved config
are checked: an entry with a missing, damaged or mismatched part is refused (:class:`CacheCorruptError`), never
silently reused, and a sweep discards and recomputes it. While an entry is computed its lock is held, so a second
run of the same jobs waits for the first instead of computing them twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, a second run computes the entry again
    fcntl = None  # type: ignore[assignment]

from fragile.atomic import _clean
from fragile.errors import FragileError
from fragile.run.payload import PayloadError, decode, encode

log = logging.getLogger(__name__)


class CacheCorruptError(FragileError):
    """A cache entry that cannot be trusted: a part missing or unreadable, or not matching the digest saved with it
    (truncated or altered). It is never loaded; the sweep discards it and recomputes the job."""


class CacheMismatchError(CacheCorruptError):
    """A cache entry's saved config differs from the config it was looked up with (its folder is named by the
    config's digest, so only an edit or a digest collision gets here); treated as corrupt."""


ENTRY_FILES = ("config.json", "payload.json", "payload.npz")
"""The parts of an entry its digest covers, in the order they are hashed."""
DIGEST_FILE = "entry.sha256"


def _entry_digest(entry: Path) -> str:
    """SHA-256 over every part of the entry (:data:`ENTRY_FILES`), each prefixed by its name and length, so that no
    part can be edited, emptied or swapped with another without the digest changing."""
    h = hashlib.sha256()
    for name in ENTRY_FILES:
        data = (entry / name).read_bytes()
        h.update(f"{name}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def config_key(config: dict[str, Any]) -> str:
    """A stable 16-hex-digit digest of a JSON-serialisable config."""
    text = json.dumps(_clean(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultCache:
    """A directory of results keyed by ``(name, config)``.

    The digest beside an entry detects damage (a truncated write, a disk error, an edit), not an attacker: whoever
    can write the entry can rewrite its digest too. What makes a shared cache safe to load is the format: JSON and
    raw arrays rebuilt only as this package's registered record types (:mod:`fragile.run.payload`), so no entry,
    however crafted, runs code on load; the worst it can do is hold wrong numbers, which is why a cache is shared
    only with people whose numbers one would accept.

    Args:
        root: cache directory (created on first write).
        enabled: when False, nothing is read or written and every call computes.
    """

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def path(self, name: str, config: dict[str, Any]) -> Path:
        return self.root / name / config_key(config)

    def load(self, name: str, config: dict[str, Any]) -> Any | None:
        """The cached payload, or None when absent.

        Raises:
            CacheCorruptError: a part of the entry is missing or unreadable, its digest differs from the one saved
                beside it, or its payload does not decode; :class:`CacheMismatchError` (a kind of it) when the
                saved config differs from ``config``. None of these is ever loaded.
        """
        if not self.enabled:
            return None
        entry = self.path(name, config)
        if not entry.is_dir():
            return None
        try:
            saved_digest = (entry / DIGEST_FILE).read_text().strip()
            if saved_digest != _entry_digest(entry):
                raise CacheCorruptError(f"cache entry {entry} is corrupt (digest mismatch); it will not be loaded")
            saved = json.loads((entry / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise CacheCorruptError(
                f"cache entry {entry} is corrupt ({type(exc).__name__}: {exc}); it will not be loaded"
            ) from None
        if saved != json.loads(json.dumps(_clean(config), sort_keys=True)):
            raise CacheMismatchError(f"cache entry {entry} was saved with a different config; it will not be loaded")
        log.info("cache hit: %s", entry)
        try:
            return decode((entry / "payload.json").read_text(), (entry / "payload.npz").read_bytes())
        except (PayloadError, ValueError, OSError) as exc:
            raise CacheCorruptError(f"cache entry {entry} is corrupt ({exc}); it will not be loaded") from None

    def load_or_discard(self, name: str, config: dict[str, Any]) -> Any | None:
        """:meth:`load`, with an entry that cannot be trusted logged, removed and reported as absent (None), so
        that the caller recomputes it."""
        try:
            return self.load(name, config)
        except CacheCorruptError as exc:
            log.warning("%s; recomputing", exc)
            self.discard(name, config)
            return None

    def discard(self, name: str, config: dict[str, Any]) -> None:
        """Remove an entry (e.g. a corrupt one) so that it is recomputed."""
        shutil.rmtree(self.path(name, config), ignore_errors=True)

    @contextmanager
    def computing(self, name: str, config: dict[str, Any]) -> Iterator[None]:
        """Hold the entry's lock while its result is computed: a second process computing the same entry (another
        run of the same section on this cache) waits here, and then finds the first one's result instead of
        computing it again. An advisory ``flock`` on a file beside the entry, released by the kernel if the holder
        dies; a no-op when the cache is disabled or the platform has no ``fcntl``."""
        if not self.enabled or fcntl is None:
            yield
            return
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".{config_key(config)}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s is being computed by another process; waiting for it", self.path(name, config))
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def save(self, name: str, config: dict[str, Any], payload: Any) -> None:
        """Publish ``payload`` atomically (write a temporary folder, then rename it into place). When another
        writer published the same entry first, its entry stays and this one is dropped: both computed the same."""
        if not self.enabled:
            return
        entry = self.path(name, config)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        try:
            (tmp / "config.json").write_text(json.dumps(_clean(config), sort_keys=True, indent=2))
            text, arrays = encode(payload)
            (tmp / "payload.json").write_text(text)
            (tmp / "payload.npz").write_bytes(arrays)
            (tmp / DIGEST_FILE).write_text(_entry_digest(tmp))
            try:
                os.rename(tmp, entry)  # atomic; fails when the entry exists (a folder is never replaced)
            except OSError:
                if not entry.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_compute(self, name: str, config: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """Load ``(name, config)`` or compute, save and return it, under the entry's lock (:meth:`computing`). An
        entry that cannot be trusted is logged, discarded and recomputed."""
        hit = self.load_or_discard(name, config)
        if hit is not None:
            return hit
        with self.computing(name, config):
            hit = self.load_or_discard(name, config)  # computed by another process while this one waited
            if hit is not None:
                return hit
            payload = compute()
            self.save(name, config, payload)
        return payload
