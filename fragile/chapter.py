"""Helpers every chapter notebook uses: strict config from the parameters cell, the "how this page was
made" banner at the top, and the provenance block at the end."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, TypeVar

from fragile.config import from_dict, to_dict
from fragile.provenance import collect, write_summary

T = TypeVar("T")


def config_from_namespace(cls: type[T], namespace: dict[str, Any]) -> T:
    """Build a section's config from the notebook's globals, taking exactly the config's fields.

    Papermill injects parameters as globals; a name injected that the config does not know is caught
    by the runner before execution, and every value is type- and range-checked here, on the first
    lines of the notebook, before any work.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    return from_dict(cls, {k: namespace[k] for k in names if k in namespace})


def banner_markdown(*, profile: str, data: str, stand_in: bool, device: str, section: str, notes: str = "") -> str:
    """The admonition at the top of every chapter: profile, data (real or stand-in), device, rerun command."""
    kind = "a **stand-in** data set" if stand_in else "**real data**"
    return (
        ":::{admonition} How this page was computed\n:class: " + ("warning" if stand_in else "note") + "\n"
        f"Executed with the **`{profile}`** parameter profile on {kind}: {data}; device: {device}. {notes}\n\n"
        f"Rerun it with other parameters: `fragile run {section} --profile paper` or "
        f"`fragile run {section} -p n_seeds 20` (see *Rerun with your own parameters*).\n:::"
    )


class Timer:
    """Wall time since the chapter started, for provenance."""

    def __init__(self) -> None:
        self.started = time.time()


def finish(config: Any, *, section: str, dataset: str, timer: Timer, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``<results_dir>/<section>/<profile>/summary.json`` (atomically) and return its content."""
    params = to_dict(config)
    prov = collect(params, profile=config.profile, dataset=dataset, device=config.device, started=timer.started, finished=time.time())
    summary = {"section": section, "results": results, "provenance": prov}
    path = write_summary(config.results_dir, section, config.profile, summary)
    summary["path"] = str(path)
    return summary
