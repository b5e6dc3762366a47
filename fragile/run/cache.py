"""On-disk cache of expensive results (trained models, Hessians, retraining results), keyed by config.

Each entry lives in ``<root>/<name>/<hash of config>/`` with ``config.json``, the result as
``payload.json`` + ``payload.npz`` (:mod:`fragile.run.payload`: JSON and raw arrays, never a pickle, so loading
an entry runs no code whoever wrote it) and the SHA-256 of both. An entry is published by renaming a finished
temporary folder, so an interrupted run leaves no partial entry and the next run recomputes only what did not
finish. On load the saved config is compared with the requested one, and a mismatch is refused
(:class:`CacheMismatchError`), never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fragile.atomic import _clean
from fragile.errors import FragileError
from fragile.run.payload import PayloadError, decode, encode

log = logging.getLogger(__name__)


class CacheMismatchError(FragileError):
    """A cache entry's saved config differs from the config it was looked up with."""


class CacheCorruptError(FragileError):
    """A cache entry's payload does not match the digest saved with it (truncated or altered)."""


def _payload_digest(entry: Path) -> str:
    """SHA-256 over the payload's two files, in a fixed order."""
    h = hashlib.sha256()
    for name in ("payload.json", "payload.npz"):
        with open(entry / name, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def config_key(config: dict[str, Any]) -> str:
    """A stable 16-hex-digit digest of a JSON-serialisable config."""
    text = json.dumps(_clean(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultCache:
    """A directory of results keyed by ``(name, config)``.

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

        Raises :class:`CacheMismatchError` when the saved config differs and :class:`CacheCorruptError`
        when the payload's SHA-256 differs from the one saved beside it; neither is ever loaded.
        """
        if not self.enabled:
            return None
        entry = self.path(name, config)
        if not (entry / "payload.json").is_file():
            return None
        saved = json.loads((entry / "config.json").read_text())
        if saved != json.loads(json.dumps(_clean(config), sort_keys=True)):
            raise CacheMismatchError(
                f"cache entry {entry} was saved with a different config; delete it or run with use_cache=False"
            )
        saved_digest = entry / "payload.sha256"
        if not saved_digest.is_file() or saved_digest.read_text().strip() != _payload_digest(entry):
            raise CacheCorruptError(f"cache entry {entry} is corrupt (payload digest mismatch); it will not be loaded")
        log.info("cache hit: %s", entry)
        try:
            return decode((entry / "payload.json").read_text(), (entry / "payload.npz").read_bytes())
        except (PayloadError, ValueError, OSError) as exc:
            raise CacheCorruptError(f"cache entry {entry} is corrupt ({exc}); it will not be loaded") from None

    def discard(self, name: str, config: dict[str, Any]) -> None:
        """Remove an entry (e.g. a corrupt one) so that it is recomputed."""
        shutil.rmtree(self.path(name, config), ignore_errors=True)

    def save(self, name: str, config: dict[str, Any], payload: Any) -> None:
        """Publish ``payload`` atomically (write a temporary folder, then rename it into place)."""
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
            (tmp / "payload.sha256").write_text(_payload_digest(tmp))
            if entry.exists():  # a concurrent writer got there first; both computed the same thing
                shutil.rmtree(tmp)
                return
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_compute(self, name: str, config: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """Load ``(name, config)`` or compute, save and return it. A corrupt entry is logged, discarded
        and recomputed."""
        try:
            hit = self.load(name, config)
        except CacheCorruptError as exc:
            log.warning("%s", exc)
            self.discard(name, config)
            hit = None
        if hit is not None:
            return hit
        payload = compute()
        self.save(name, config, payload)
        return payload
