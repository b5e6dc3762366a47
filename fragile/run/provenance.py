"""What produced a result: parameters, profile, data, package versions, git commit, code digest, device, duration."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fragile.atomic import atomic_write_json
from fragile.errors import InvalidArgumentError
from fragile.run.code import module_code_digest
from fragile.run.devices import resolve_device

PACKAGES = ("fragile", "torch", "numpy", "scipy", "scikit-learn", "mlxtend", "papermill", "matplotlib", "jupyter-book")
# What decides the code that ran, relative to the checkout's top: a change elsewhere (executed chapters,
# results) does not make a run dirty.
CODE_PATHS = ("fragile", "notebooks", "book/params", "benchmarks", "pyproject.toml", "constraints.txt")
MAX_DIRTY_FILES = 20


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape the numbers (``"not installed"`` when absent)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git(args: list[str], cwd: str | Path | None) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, check=True).stdout


def git_commit(cwd: str | Path | None = None) -> dict[str, Any]:
    """The checkout's commit and whether its code differs from it (``unknown`` outside git).

    ``dirty`` looks only at tracked files under :data:`CODE_PATHS`: executing the book rewrites
    tracked outputs (``book/sections``, ``results``), which say nothing about the code that ran.
    ``dirty_files`` names the first :data:`MAX_DIRTY_FILES` of them, ``dirty_count`` counts them all.
    Costs two ``git`` calls.
    """
    try:
        top, sha = _git(["rev-parse", "--show-toplevel", "HEAD"], cwd).splitlines()
        diff = ["-c", "core.quotepath=off", "diff", "--name-only", "--no-renames", "HEAD", "--", *CODE_PATHS]
        changed = _git(diff, top).splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None, "dirty_files": [], "dirty_count": None}
    return {"commit": sha, "dirty": bool(changed), "dirty_files": changed[:MAX_DIRTY_FILES], "dirty_count": len(changed)}


def _canonical_device(value: Any) -> str:
    if isinstance(value, str):
        try:
            return str(torch.device(value))
        except RuntimeError:
            pass  # refused below, with the value named
    raise InvalidArgumentError(f"values holds {value!r}, which is not a torch device name such as 'cpu' or 'cuda:0'")


def devices_used(values: Iterable[str]) -> str:
    """The devices that jobs report having computed on, merged for provenance: the distinct names in
    torch's spelling (``cpu``, ``cuda``, ``cuda:1``), sorted and joined by ``", "``. A result taken from
    the cache reports the device that computed it.

    Raises:
        InvalidArgumentError: ``values`` is empty or holds something that is not a torch device name.
    """
    names = {_canonical_device(value) for value in values}
    if not names:
        raise InvalidArgumentError("values is empty; give the device of at least one job")
    return ", ".join(sorted(names))


def recorded_device(device: str) -> str:
    """The device to write down for ``device``: ``auto`` becomes what it resolves to in this process
    (:func:`~fragile.run.devices.resolve_device`); a device name or a :func:`devices_used` list is kept."""
    return str(resolve_device(device)) if device == "auto" else device


def _describe_device(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else 0
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda})"
        return f"{device} (not visible in this process)"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def device_description(device: str = "cpu") -> str:
    """A human description of where the computation ran, for a device name or a :func:`devices_used` list."""
    return "; ".join(_describe_device(d) for d in device.split(", "))


def collect(
    parameters: dict[str, Any], *, profile: str, dataset: str, device: str, code_module: str, started: float, finished: float
) -> dict[str, Any]:
    """Everything a reader needs to know about how a section's numbers were produced.

    Args:
        device: where the work ran: a device name (``auto`` is resolved here, see :func:`recorded_device`)
            or the :func:`devices_used` of the section's jobs.
        code_module: the section's module (``fragile.chapters.iris``); its
            :func:`~fragile.run.code.module_code_digest` is recorded beside the git commit.
    """
    device = recorded_device(device)
    return {
        "parameters": parameters,
        "profile": profile,
        "dataset": dataset,
        "device": device,
        "device_description": device_description(device),
        "packages": package_versions(),
        "git": git_commit(Path(__file__).resolve().parent),
        "code": {"module": code_module, "digest": module_code_digest(code_module)},
        "started": _dt.datetime.fromtimestamp(started, _dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 1),
    }


def write_summary(results_dir: str | Path, section: str, profile: str, summary: dict[str, Any]) -> Path:
    """Atomically write ``<results_dir>/<section>/<profile>/summary.json``; returns its path."""
    path = Path(results_dir) / section / profile / "summary.json"
    atomic_write_json(path, summary)
    return path
