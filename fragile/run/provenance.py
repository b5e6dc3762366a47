"""What produced a result: parameters, profile, data, package versions, git commit, device, duration."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from fragile.atomic import atomic_write_json

PACKAGES = ("fragile", "torch", "numpy", "scipy", "scikit-learn", "mlxtend", "papermill", "matplotlib", "jupyter-book")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape the numbers (``"not installed"`` when absent)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(cwd: str | Path | None = None) -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (``unknown`` outside git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=cwd, check=True
        ).stdout.strip()
        return {"commit": sha, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def device_description(device: str = "cpu") -> str:
    """A human description of where the computation ran."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def collect(parameters: dict[str, Any], *, profile: str, dataset: str, device: str, started: float, finished: float) -> dict[str, Any]:
    """Everything a reader needs to know about how a section's numbers were produced."""
    return {
        "parameters": parameters,
        "profile": profile,
        "dataset": dataset,
        "device": device_description(device),
        "packages": package_versions(),
        "git": git_commit(Path(__file__).resolve().parent),
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 1),
    }


def write_summary(results_dir: str | Path, section: str, profile: str, summary: dict[str, Any]) -> Path:
    """Atomically write ``<results_dir>/<section>/<profile>/summary.json``; returns its path."""
    path = Path(results_dir) / section / profile / "summary.json"
    atomic_write_json(path, summary)
    return path
