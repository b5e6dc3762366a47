"""What every chapter shares: its declaration (:class:`Chapter`: name, number, part, config, jobs, results),
the common config fields (:class:`ChapterConfig`), strict config from the parameters cell, the "how this page
was made" banner at the top, and the provenance summary at the end."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from fragile.book.claims import DataLabel, DataUsed
from fragile.config import PROFILES, at_least, check_settings, from_dict, one_of, setting, to_dict
from fragile.errors import check_choice
from fragile.run.devices import DEVICE_CHOICES, check_device_name
from fragile.run.provenance import collect, write_summary
from fragile.run.sweep import check_scheduler

T = TypeVar("T")


def _scheduler(name: str, value: str) -> None:
    check_scheduler(value)


@dataclass(frozen=True)
class ChapterConfig:
    """The fields every chapter's config has: where it runs, how it caches, where it writes, each with its help text
    and check. Each chapter's config inherits these (and their checks) and adds the values its numbers depend on,
    declared with :func:`~fragile.config.setting` so that :func:`~fragile.config.check_settings` checks them and
    ``fragile params`` lists them."""

    # The device names a chapter accepts; a chapter whose models are tiny keeps to the CPU.
    DEVICES: ClassVar[tuple[str, ...]] = ("cpu",)

    seed: int = setting(0, "first model seed; seeds are seed … seed + n_seeds − 1", at_least(0))
    profile: str = setting("default", "the parameter profile this run belongs to", one_of(PROFILES))
    device: str = setting("cpu", "where to compute: the chapter's DEVICES (cpu; cuda, cuda:N or auto where allowed)")
    use_cache: bool = setting(True, "reuse finished jobs from cache_dir")
    results_dir: str = setting("results", "where summary.json goes")
    cache_dir: str = setting(".cache", "the result cache")
    store_dir: str = setting(
        "results/store",
        "the committed result store, looked up before the cache (finished jobs of the published edition); '' for none",
    )
    publish: bool = setting(False, "also save every finished job to store_dir (the published edition's runs)")
    scheduler: str = setting(
        "local",
        (
            "where the jobs run: in-process, local (a Dask LocalCluster) or a Dask scheduler address such as "
            "tcp://host:8786; does not change any number"
        ),
        _scheduler,
    )
    n_workers: int = setting(0, "worker processes of a local cluster; 0 means one per CPU core", at_least(0, 1024))
    n_seeds: int = setting(
        1, "models per configuration, for the spread over seeds (the paper reports single runs)", at_least(1, 1000)
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.DEVICES == DEVICE_CHOICES:
            check_device_name(self.device)
        else:
            check_choice("device", self.device, self.DEVICES)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n_seeds))


# The fields every chapter's config has, and so every notebook's parameters cell declares.
COMMON_FIELDS = tuple(f.name for f in dataclasses.fields(ChapterConfig))
# Where and how a chapter computes, not what: they change no number and do not make the book stale.
EXECUTION_PARAMETERS = ("scheduler", "n_workers")
# Fields that change no number of a job: where it runs and how it is cached (``device`` moves numbers by
# round-off only; the CPU is the reference). The seeds are not here: each job carries its own.
NOT_IN_JOB_KEY = tuple(name for name in COMMON_FIELDS if name not in ("seed", "n_seeds"))


@dataclass(frozen=True)
class Chapter:
    """A chapter of the book, declared once by its module; the runner, the table of contents, the tests, the
    glue keys and the results path all read it.

    Attributes:
        name: the short name the CLI takes (``iris``) and the module's name under :mod:`fragile.chapters`.
        number: its place in the book: the notebook is ``notebooks/<NN>_<name>.ipynb``, whose first heading is the
            chapter's title.
        part: the caption of the book part it belongs to.
        config: its config class; the notebook's ``parameters`` cell declares exactly its fields.
        glue_prefix: the prefix of every number it glues for other pages (``{glue:text}`sections/…::<prefix>_…```).
        jobs: every sweep job a config expands into, as a list (what ``fragile verify`` recomputes).
        run: the chapter's study: runs those jobs and collects their results (``(results…, report)``).
        prepare: what must exist before any job runs (data written to disk), or None; ``run`` calls it itself.
    """

    name: str
    number: int
    part: str
    config: type[ChapterConfig]
    glue_prefix: str
    jobs: Callable[..., Any]
    run: Callable[..., Any]
    prepare: Callable[..., None] | None = None

    @property
    def notebook(self) -> str:
        """The notebook's stem: ``01_iris``; also the executed chapter's and the results folder's name."""
        return f"{self.number:02d}_{self.name}"

    def results_path(self, cfg: ChapterConfig) -> str:
        """Where a run of ``cfg`` writes its summary and figures: ``<results_dir>/<notebook>/<profile>``."""
        return f"{cfg.results_dir}/{self.notebook}/{cfg.profile}"


PAPER_PART = "The paper, section by section"
BEYOND_PART = "Beyond the paper"


def config_from_namespace(cls: type[T], namespace: dict[str, Any]) -> T:
    """Build a section's config from the notebook's globals, taking exactly the config's fields.

    Papermill injects parameters as globals; a name injected that the config does not know is caught
    by the runner before execution, and every value is type- and range-checked here, on the first
    lines of the notebook, before any work.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    return from_dict(cls, {k: namespace[k] for k in names if k in namespace})


PROFILE_NOTES = {
    "smoke": "**Smoke profile**: sized for the tests; its numbers and verdicts are not meant to be read.",
    "default": (
        "**Quick profile**: these verdicts are the `default` profile's, sized so that a laptop recomputes the whole "
        "book in about 20 minutes on two cores; at that size many of them can only read *inconclusive*. The "
        "`published` profile is sized to decide them."
    ),
    "published": (
        "**Published edition**: sized so that each claim's interval can decide it within what two CPU cores afford "
        "in a few hours; what needs a GPU or the real data set stays in the `paper` profile and says so."
    ),
    "paper": "**Paper profile**: the paper's protocol as far as it is known.",
}
"""What the banner says each profile's verdicts are worth."""


def banner_markdown(
    *,
    profile: str,
    data: str,
    device: str,
    section: str,
    notes: str = "",
    stand_in: bool = False,
    labels: Sequence[DataUsed] = (),
    compute: str = "",
) -> str:
    """The admonition at the top of every chapter: profile, data and its label, device, what computing it took
    (``compute``: :meth:`~fragile.chapters.protocol.ChapterCompute.markdown`), rerun command.

    ``labels`` are the data sets the chapter's claims are computed on (:class:`~fragile.book.claims.DataUsed`): the
    banner shows each one's label (real, reduced or stand-in); without them, ``stand_in`` says which of real data or
    a stand-in it is."""
    if labels:
        stand_in = any(u.label is DataLabel.STAND_IN for u in labels)
        kind = "; ".join(f"**{u.label}**{u.text()[len(u.label) :]} data" for u in labels) + ";"
    else:
        kind = ("a **stand-in** data set" if stand_in else "**real data**") + ":"
    return (
        ":::{admonition} How this page was computed\n:class: " + ("warning" if stand_in else "note") + "\n"
        f"Executed with the **`{profile}`** parameter profile on {kind} {data}; device: {device}. {notes}\n\n"
        + f"{PROFILE_NOTES[profile]}\n\n"
        + (f"{compute}\n\n" if compute else "")
        + f"Rerun it with other parameters: `fragile run {section} --profile paper` or "
        f"`fragile run {section} -p n_seeds 20` (see *Rerun with your own parameters*).\n:::"
    )


class Timer:
    """Wall time since the chapter started, and which sweeps it ran (those after it started), for provenance."""

    def __init__(self) -> None:
        from fragile.run.sweep import SWEEPS

        self.started = time.time()
        self.first_sweep = len(SWEEPS)


def finish(
    config: Any,
    *,
    section: str,
    dataset: str,
    timer: Timer,
    results: dict[str, Any],
    device: str | None = None,
    compute: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<results_dir>/<section>/<profile>/summary.json`` (atomically) and return its content: ``results``,
    ``sweeps`` (what each sweep the chapter ran did: counts, and each failed job's config and error),
    ``provenance`` and ``compute`` (what the result store records of computing the chapter's jobs:
    :meth:`~fragile.chapters.protocol.ChapterCompute.as_dict`).

    ``device`` is where the work ran, e.g. :func:`~fragile.run.provenance.devices_used` of the devices
    the jobs report; by default ``config.device``, with ``auto`` resolved in this kernel. The code digest
    recorded is that of the module defining ``config``'s class (the chapter's).
    """
    params = to_dict(config)
    prov = collect(
        params,
        profile=config.profile,
        dataset=dataset,
        device=device or config.device,
        code_module=type(config).__module__,
        started=timer.started,
        finished=time.time(),
    )
    from fragile.run.sweep import SWEEPS

    sweeps = SWEEPS[timer.first_sweep :]  # the chapter's sweeps: their failures are part of what it shows
    summary = {"section": section, "results": results, "sweeps": sweeps, "provenance": prov, "compute": compute}
    path = write_summary(config.results_dir, section, config.profile, summary)
    summary["path"] = str(path)
    return summary


def glue_provenance(prefix: str, summary: dict[str, Any]) -> None:
    """Glue ``<prefix>_commit`` (ten characters), ``_duration_s`` and ``_profile`` from a :func:`finish` summary:
    what the book's front page and provenance page quote about a chapter's execution."""
    from myst_nb import glue

    prov = summary["provenance"]
    glue(f"{prefix}_commit", prov["git"]["commit"][:10], display=False)
    glue(f"{prefix}_duration_s", float(prov["duration_s"]), display=False)
    glue(f"{prefix}_profile", prov["profile"], display=False)


def _compute_line(compute: dict[str, Any]) -> str:
    devices = ", ".join(compute["devices"]) or "none recorded"
    return (
        f"- **compute** (the result store's record): {compute['stored']} of {compute['jobs']} jobs stored, "
        f"{compute['seconds'] / 3600:.2f} hours of one thread each on {devices}"
        + (f", {compute['untimed']} without a recorded time" if compute["untimed"] else "")
    )


def provenance_markdown(summary: dict[str, Any]) -> str:
    """A chapter's closing provenance list, from a :func:`finish` summary: profile, data, device, commit (and
    whether the tree had uncommitted changes), packages, start and duration, and where the summary was written."""
    prov = summary["provenance"]
    dirty = " (with uncommitted changes)" if prov["git"]["dirty"] else ""
    return "\n".join(
        [
            (
                f"- **profile**: `{prov['profile']}`; **data**: {prov['dataset']}; "
                f"**device**: {prov['device']} ({prov['device_description']})"
            ),
            f"- **git commit**: `{prov['git']['commit']}`{dirty}",
            "- **packages**: " + ", ".join(f"{k} {v}" for k, v in prov["packages"].items()),
            f"- **started**: {prov['started']}; **duration**: {prov['duration_s']} s",
            *([_compute_line(summary["compute"])] if summary.get("compute") else []),
            f"- **summary**: `{summary['path']}`",
        ]
    )
