"""Run the section notebooks with papermill under a parameter profile, and check the book is current.

A section is a chapter of :mod:`fragile.chapters.registry` and its template ``notebooks/NN_<name>.ipynb`` with
one ``parameters`` cell declaring the chapter config's fields. A profile ``book/params/<profile>.yml`` maps
section names to parameter values; every value is checked against the chapter's config (name, type, range)
before papermill starts. Book runs write
``book/sections/NN_<name>.ipynb`` and the chapters' outputs under ``results/``; ad-hoc runs write under ``runs/``
and are refused any output inside ``book/`` or ``results/``. A notebook is executed in a private temporary folder
and moved into place only when the whole notebook succeeded; a failed one is kept under ``runs/failed/``. Each
executed chapter records the digests of the outputs it wrote, which ``fragile check`` compares with the files.

While a notebook runs, its sweeps append their progress and outcome to an events file (:data:`~fragile.run.sweep.
EVENTS_ENV`): the runner logs a progress line per finished job and returns each sweep's outcome with the notebook
(:class:`SectionRun`), failed jobs included.

Sections run their grids through :mod:`fragile.run.sweep`. When a section's ``scheduler`` is ``local``, the
runner starts one Dask ``LocalCluster`` for the whole call, logs its dashboard address, and hands the
section its address, so every chapter of a book run shares the same workers.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, chdir, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragile.atomic import atomic_write_bytes
from fragile.book.chapter import COMMON_FIELDS, EXECUTION_PARAMETERS, Chapter
from fragile.config import PROFILES, from_dict, load_yaml
from fragile.errors import FragileError, InvalidArgumentError
from fragile.run.code import code_problem, notebook_code
from fragile.run.sweep import SHARED_SCHEDULER_ENV

log = logging.getLogger(__name__)

# Parameters every notebook declares (``cache_dir``, ``store_dir``, ``publish`` and ``n_seeds`` keep their config
# defaults where not declared).
COMMON_PARAMETERS = tuple(name for name in COMMON_FIELDS if name not in ("cache_dir", "store_dir", "publish", "n_seeds"))


class SectionFailedError(FragileError):
    """A section notebook raised while executing; nothing was written to the output path, and the partly executed
    notebook is kept under ``runs/failed/`` for inspection (its path is in the message)."""


@dataclass(frozen=True)
class SectionRun:
    """An executed section: where its notebook went and what each of its sweeps did.

    Attributes:
        path: the executed notebook.
        sweeps: each sweep's outcome (:meth:`~fragile.run.sweep.SweepReport.outcome`: ``done``, ``cached`` and the
            ``failed`` jobs with their config and error line), in the order the chapter ran them.
    """

    path: Path
    sweeps: tuple[dict[str, Any], ...] = ()

    @property
    def failed(self) -> dict[str, dict[str, Any]]:
        """Every failed job of every sweep, by job name."""
        return {name: info for s in self.sweeps for name, info in s["failed"].items()}

    def report(self) -> list[str]:
        """One line per sweep (``sweep: 3 done, 1 cached, 1 failed, 2 from the store``), then one per failed job: its name, its
        error's first line and its parameters."""
        lines = [
            f"sweep: {s['done']} done, {s['cached']} cached, {len(s['failed'])} failed"
            + (f", {s['stored']} from the store" if s.get("stored") else "")
            for s in self.sweeps
        ]
        for name, info in self.failed.items():
            lines.append(f"  failed {name}: {info['error']}")
            lines.append(f"    parameters: {json.dumps(info['config'], sort_keys=True, default=str)}")
        return lines


def project_root(start: str | Path | None = None) -> Path:
    """The checkout holding ``notebooks/`` and ``book/params/``, searched upwards from ``start`` (cwd)."""
    here = Path(start or Path.cwd()).resolve()
    for d in [here, *here.parents]:
        if (d / "notebooks").is_dir() and (d / "book" / "params").is_dir():
            return d
    raise FragileError(f"no fragile project (notebooks/ and book/params/) found at or above {here}")


@dataclass(frozen=True)
class Section:
    """A chapter, its template and the parameters its ``parameters`` cell declares."""

    chapter: Chapter
    path: Path
    parameters: dict[str, dict[str, Any]]

    @property
    def name(self) -> str:
        return self.chapter.notebook

    @property
    def short(self) -> str:
        return self.chapter.name


def sections(root: Path | None = None) -> list[Section]:
    """Every chapter of the registry, in book order, with its template's declared parameters.

    Raises:
        FragileError: a chapter has no template, or a template belongs to no chapter.
    """
    import papermill as pm

    from fragile.chapters.registry import CHAPTERS

    root = root or project_root()
    out = []
    for chapter in CHAPTERS.values():
        path = root / "notebooks" / f"{chapter.notebook}.ipynb"
        if not path.is_file():
            raise FragileError(f"chapter {chapter.name!r} has no template {path.relative_to(root)}")
        out.append(Section(chapter, path, dict(pm.inspect_notebook(str(path)))))
    orphans = sorted({p.stem for p in (root / "notebooks").glob("*.ipynb")} - {s.name for s in out})
    if orphans:
        raise FragileError(f"notebooks {orphans} belong to no chapter of fragile.chapters.registry")
    return out


def find_section(name: str, root: Path | None = None) -> Section:
    """A section by full (``01_iris``) or short (``iris``) name."""
    all_sections = sections(root)
    for s in all_sections:
        if name in (s.name, s.short):
            return s
    raise InvalidArgumentError(f"section={name!r} is not allowed; choose one of {[s.short for s in all_sections]}")


def load_profile(profile: str, root: Path | None = None) -> dict[str, dict[str, Any]]:
    """``book/params/<profile>.yml``: section name → parameter values (duplicate keys rejected)."""
    if profile not in PROFILES:
        raise InvalidArgumentError(f"profile={profile!r} is not allowed; choose one of {list(PROFILES)}")
    root = root or project_root()
    data = load_yaml(root / "book" / "params" / f"{profile}.yml") or {}
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"book/params/{profile}.yml must map section names to parameters")
    names = {s.name for s in sections(root)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidArgumentError(f"book/params/{profile}.yml names unknown section(s) {unknown}; sections: {sorted(names)}")
    return {k: dict(v or {}) for k, v in data.items()}


def resolve_parameters(
    section: Section, profile: str, overrides: dict[str, Any] | None = None, root: Path | None = None
) -> dict[str, Any]:
    """The parameters a run gets: profile values, then overrides, then ``profile`` itself.

    Everything is checked here, before anything executes: names the notebook does not declare are refused, and
    the values must make a valid config of the chapter (types and ranges, each error naming its parameter).
    The notebook checks them again on its first lines, for runs that do not come through here.
    """
    params = dict(load_profile(profile, root).get(section.name, {}))
    params.update(overrides or {})
    params["profile"] = profile
    unknown = sorted(set(params) - set(section.parameters))
    if unknown:
        raise InvalidArgumentError(
            f"unknown parameter(s) {unknown} for section {section.short!r}; declared: {sorted(section.parameters)}"
        )
    from_dict(section.chapter.config, params)
    return params


def template_digest(path: Path) -> str:
    """Digest of a template's cell sources and tags (outputs and execution counts ignored)."""
    nb = json.loads(Path(path).read_text())
    cells = [(c["cell_type"], "".join(c["source"]), sorted(c.get("metadata", {}).get("tags", []))) for c in nb["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()[:16]


def params_digest(params: dict[str, Any]) -> str:
    """Digest of the parameters that decide a section's numbers (execution parameters left out)."""
    numbers = {k: v for k, v in params.items() if k not in EXECUTION_PARAMETERS}
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:16]


def declared_default(section: Section, name: str) -> Any:
    """The value a section's parameters cell gives ``name`` (a Python literal)."""
    return ast.literal_eval(section.parameters[name]["default"])


class Schedulers:
    """Turns a section's ``scheduler`` value into the one it runs on, once per value for a whole block:
    ``local`` becomes the address of a ``LocalCluster`` started on first use and shared by every later
    section; an address is checked on first use (an unreachable one fails here, before any notebook
    starts); both log their dashboard. Clusters started here close with the block."""

    def __init__(self, stack: ExitStack, n_workers: int | None):
        self._stack, self._n_workers, self._seen = stack, n_workers, {}

    def resolve(self, scheduler: str) -> str:
        from fragile.run.sweep import shared_scheduler

        if scheduler == "in-process":
            return scheduler
        if scheduler not in self._seen:
            address, dashboard = self._stack.enter_context(shared_scheduler(scheduler, self._n_workers))
            log.info("Dask scheduler %s; dashboard: %s", address, dashboard)
            self._seen[scheduler] = address
        return self._seen[scheduler]


@contextmanager
def schedulers(n_workers: int | None = None) -> Iterator[Schedulers]:
    """A :class:`Schedulers` whose local cluster (if one was started) closes when the block ends."""
    with ExitStack() as stack:
        yield Schedulers(stack, n_workers)


# What only `fragile book` writes: an ad-hoc run writing here would replace the book's numbers with its own.
BOOK_OUTPUTS = ("book", "results")
AD_HOC_RESULTS = "runs/results"


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_section(
    name: str,
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    *,
    output: str | Path | None = None,
    root: Path | None = None,
    progress: bool = False,
    cluster: Schedulers | None = None,
) -> SectionRun:
    """Execute one section with papermill, ad hoc: never into the book.

    Args:
        name: section name (``iris`` or ``01_iris``).
        profile: parameter profile.
        overrides: parameter values replacing the profile's.
        output: where the executed notebook goes; default ``runs/<section>-<profile>-<time>.ipynb``. It and
            ``results_dir`` (default ``runs/results``) may not lie inside the book's ``book/`` or ``results/``.
        root: the project checkout (default: found from the working directory).
        progress: show papermill's cell progress bar.
        cluster: shares one local Dask cluster between calls; by default a section whose
            ``scheduler`` is ``local`` gets a cluster of its own for this call.

    Returns:
        The executed notebook's path and what each of its sweeps did (failed jobs included: the caller decides).

    Raises:
        InvalidArgumentError: unknown section, profile or parameter name, an output inside the book, or an output
            that cannot be written (all before executing anything).
        SectionFailedError: the notebook raised; its message is the notebook's error line.
    """
    root = root or project_root()
    section = find_section(name, root)
    params = resolve_parameters(section, profile, {"results_dir": AD_HOC_RESULTS, **(overrides or {})}, root)
    output = Path(output) if output is not None else root / "runs" / f"{section.name}-{profile}-{_stamp()}.ipynb"
    for option, path in (("--output", output), ("results_dir", Path(params["results_dir"]))):
        where = (path if path.is_absolute() else root / path).resolve()
        for protected in BOOK_OUTPUTS:
            top = (root / protected).resolve()
            if where == top or top in where.parents:
                raise InvalidArgumentError(
                    f"{option}={str(path)!r} is inside {protected}/, which only `fragile book` writes; an ad-hoc run "
                    "writes under runs/ (the default) or any folder outside the book"
                )
    return _run(section, profile, params, output, root, progress, cluster)


def _run(
    section: Section, profile: str, params: dict[str, Any], output: Path, root: Path, progress: bool, cluster: Schedulers | None
) -> SectionRun:
    _check_writable("--output", output, file=True)
    _check_writable("results_dir", Path(params.get("results_dir", declared_default(section, "results_dir"))), root=root)
    with ExitStack() as stack:
        cluster = cluster or Schedulers(stack, params.get("n_workers") or None)
        env = {}
        if "scheduler" in section.parameters:
            scheduler = params.get("scheduler", declared_default(section, "scheduler"))
            address = cluster.resolve(scheduler)
            if scheduler == "local":
                # The kernel joins the shared cluster through the environment, so the executed notebook's parameters
                # say `local`, as the reader would write them, never this run's ephemeral address.
                env[SHARED_SCHEDULER_ENV] = address
        sweeps = _execute(section, profile, params, env, output, root, progress)
    return SectionRun(output, sweeps)


def _check_writable(option: str, path: Path, *, file: bool = False, root: Path | None = None) -> None:
    """Refuse, before any work, an output that cannot be written: an existing folder where a file goes, or a
    folder that cannot be created or written to (a file is written there and removed)."""
    path = path if path.is_absolute() or root is None else root / path
    if file and path.is_dir():
        raise InvalidArgumentError(f"{option}={str(path)!r} is an existing folder; give the path of a notebook file")
    folder = path.parent if file else path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InvalidArgumentError(f"{option}={str(path)!r} cannot be written ({exc.strerror or exc})") from None


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block (the kernel inherits them), restoring what was there before."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _ProgressRelay:
    """Reads the sweep events a kernel appends to a file and logs each progress line (jobs done of total, elapsed,
    time left) as it comes, from a thread, until stopped; then returns the sweeps' outcomes."""

    def __init__(self, section: Section, path: Path):
        self.section, self.path = section, path
        self._stop = threading.Event()
        self._seen = 0
        self._sweeps: tuple[dict[str, Any], ...] = ()
        self._thread = threading.Thread(target=self._loop, name="fragile-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._relay()

    def _relay(self) -> list[dict[str, Any]]:
        from fragile.run.sweep import read_events

        events = read_events(self.path) if self.path.exists() else []
        for e in events[self._seen :]:
            if e.get("event") == "progress":
                log.info(
                    "%s: %d of %d jobs (%d already finished: stored or cached), %s elapsed, time left %s",
                    self.section.short,
                    e["done"],
                    e["total"],
                    e["cached"],
                    e["elapsed"],
                    e["eta"],
                )
        self._seen = len(events)
        return events

    def stop(self) -> tuple[dict[str, Any], ...]:
        """Stop relaying (a second call only returns the same outcomes) and return each sweep's outcome."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            events = self._relay()
            self._sweeps = tuple({k: v for k, v in e.items() if k != "event"} for e in events if e.get("event") == "sweep")
        return self._sweeps


def _execute(
    section: Section, profile: str, params: dict[str, Any], env: dict[str, str], output: Path, root: Path, progress: bool
) -> tuple[dict[str, Any], ...]:
    import nbformat
    import papermill as pm

    from fragile.run.sweep import EVENTS_ENV

    code = notebook_code(section.path, root)  # read before executing: the code the chapter runs
    # The notebook being executed and the sweep events live in a private temporary folder, never beside the
    # output: a killed run leaves nothing half-written there.
    scratch = Path(tempfile.mkdtemp(prefix="fragile-run-"))
    tmp = scratch / f"{output.stem}.ipynb"
    events = scratch / "events.jsonl"
    relay = _ProgressRelay(section, events)
    try:
        with _environment(TQDM_DISABLE="1", **{EVENTS_ENV: str(events)}, **env):
            pm.execute_notebook(
                str(section.path),
                str(tmp),
                parameters=params,
                cwd=str(root),
                kernel_name="python3",
                progress_bar=progress,
                log_output=False,
                request_save_on_cell_execute=False,
            )
        sweeps = relay.stop()
        nb = nbformat.read(tmp, as_version=4)
        nb.metadata["fragile"] = {
            "section": section.name,
            "profile": profile,
            "parameters": params,
            "template_digest": template_digest(section.path),
            "params_digest": params_digest(params),
            "outputs": output_digests(section, profile, params, root),
            **code,
        }
        atomic_write_bytes(output, nbformat.writes(nb).encode())
        return sweeps
    except pm.PapermillExecutionError as exc:
        kept = root / "runs" / "failed" / f"{section.name}-{profile}-{_stamp()}.ipynb"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp, kept)
        raise SectionFailedError(
            f"section {section.short!r} failed: {exc.ename}: {exc.evalue} (the executed notebook is kept at {kept})"
        ) from None
    finally:
        relay.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def section_outputs(section: Section, profile: str, params: dict[str, Any], root: Path) -> Path:
    """The folder a chapter writes its summary and figures to: ``<results_dir>/<section>/<profile>``."""
    results = Path(params.get("results_dir", declared_default(section, "results_dir")))
    return (results if results.is_absolute() else root / results) / section.name / profile


def output_digests(section: Section, profile: str, params: dict[str, Any], root: Path) -> dict[str, str]:
    """SHA-256 of every file the chapter wrote to :func:`section_outputs`, by path relative to ``root`` where it
    lies inside it: recorded in the executed notebook so that ``fragile check`` sees an output changed since."""
    folder = section_outputs(section, profile, params, root)
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []:
        name = str(path.relative_to(root)) if root in path.parents else str(path)
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def book_section_path(section: Section, root: Path) -> Path:
    return root / "book" / "sections" / f"{section.name}.ipynb"


def run_book_sections(
    profile: str = "default",
    root: Path | None = None,
    only: list[str] | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    publish: bool = False,
) -> list[SectionRun]:
    """Execute every section (or ``only`` these, by full or short name) into ``book/sections/`` with the profile's
    parameters; with ``publish``, each section's jobs that the result store lacks are first computed into it
    (:func:`publish_sections`), so the chapter renders from the store and states what its jobs took.

    ``overrides`` may hold only execution parameters (``scheduler``, ``n_workers``): anything else would
    make the book disagree with its profile. Sections whose scheduler is ``local`` share one cluster of
    ``n_workers`` workers (default: one per CPU).

    Raises:
        InvalidArgumentError: a name in ``only`` that is no section, or a bad override (before anything runs).
    """
    root = root or project_root()
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(EXECUTION_PARAMETERS))
    if bad:
        raise InvalidArgumentError(
            f"book runs take only execution overrides {list(EXECUTION_PARAMETERS)}, not {bad}; "
            "change book/params/<profile>.yml instead"
        )
    every = sections(root)
    unknown = sorted(set(only or ()) - {s.name for s in every} - {s.short for s in every})
    if unknown:
        raise InvalidArgumentError(f"--section {unknown} is not allowed; choose from {[s.short for s in every]}")
    chosen = [s for s in every if not only or s.name in only or s.short in only]
    resolved = {s.name: resolve_parameters(s, profile, overrides, root) for s in chosen}  # all checked before any runs
    out = []
    with schedulers(overrides.get("n_workers") or None) as cluster:
        for section in chosen:
            if publish:
                where = cluster.resolve(from_dict(section.chapter.config, resolved[section.name]).scheduler)
                publish_sections(profile, root, [section.name], scheduler=where, progress=False)
            log.info("running section %s (profile %s)", section.name, profile)
            out.append(_run(section, profile, resolved[section.name], book_section_path(section, root), root, False, cluster))
    return out


def _chosen_sections(
    profile: str, root: Path, only: list[str] | None, store_dir: str | Path | None, **fields: Any
) -> list[tuple[Section, Any, Any]]:
    """(section, config, store) of every section, or of ``only`` these, under ``profile`` (plus config ``fields``);
    ``store_dir`` replaces the chapters' own store.

    Raises:
        InvalidArgumentError: a name in ``only`` that is no section, or a bad profile value.
    """
    from fragile.run.store import ResultStore

    every = sections(root)
    unknown = sorted(set(only or ()) - {s.name for s in every} - {s.short for s in every})
    if unknown:
        raise InvalidArgumentError(f"--section {unknown} is not allowed; choose from {[s.short for s in every]}")
    chosen, stores = [], {}
    for section in (s for s in every if not only or s.name in only or s.short in only):
        cfg = from_dict(section.chapter.config, {**resolve_parameters(section, profile, None, root), **fields})
        where = Path(store_dir or cfg.store_dir)
        where = where if where.is_absolute() else root / where
        chosen.append((section, cfg, stores.setdefault(where, ResultStore(where))))
    return chosen


def publish_sections(
    profile: str = "published",
    root: Path | None = None,
    only: list[str] | None = None,
    *,
    store_dir: str | Path | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    patterns: list[str] | None = None,
) -> list[tuple[str, Any]]:
    """Compute every job of every section (or ``only`` these) under ``profile`` that the store lacks, and save each
    to the store as it lands: a run stopped midway keeps what finished, and the next computes only the rest. No
    notebook is executed; the book renders from the store afterwards (:func:`run_book_sections`). With
    ``patterns``, only the jobs whose names match one of these shell patterns (:func:`fnmatch.fnmatchcase`): a
    long edition computed in the order one chooses, or split between machines.

    Returns (section name, :class:`~fragile.run.sweep.SweepReport`) per section with a job to run, in book order.

    Raises:
        InvalidArgumentError: a name in ``only`` that is no section, a bad profile or scheduler value, or
            ``patterns`` that match no job of the chosen sections (before any job runs).
        AllJobsFailedError: every job of a section failed (the sections before it are stored).
    """
    from fnmatch import fnmatchcase

    from fragile.chapters.protocol import run_jobs

    root = root or project_root()
    fields: dict[str, Any] = {"publish": True, **({"scheduler": scheduler} if scheduler else {})}
    chosen = _chosen_sections(profile, root, only, store_dir, **fields)

    def wanted(name: str) -> bool:
        return not patterns or any(fnmatchcase(name, p) for p in patterns)

    out = []
    with chdir(root):  # the chapters' relative paths (cache, data, store) are the project's
        planned = []
        for section, cfg, store in chosen:
            cfg = dataclasses.replace(cfg, store_dir=str(store.root))
            jobs = [j for j in section.chapter.jobs(cfg) if wanted(j.name)]
            if jobs:
                planned.append((section, cfg, store, jobs))
        if patterns and not planned:
            raise InvalidArgumentError(
                f"--job {patterns} matches no job of {[s.short for s, _, _ in chosen]} under profile {profile!r}; "
                "job names are the store's folders, such as 'iris/d1-w5' or 'small_mnist/seed0-wd0.001'"
            )
        for section, cfg, store, jobs in planned:
            missing = [j for j in jobs if not store.holds(j.name, j.config)]
            log.info("%s: %d of %d jobs stored, %d to compute", section.short, len(jobs) - len(missing), len(jobs), len(missing))
            if missing and section.chapter.prepare is not None:
                section.chapter.prepare(cfg)
            out.append((section.name, run_jobs(cfg, jobs, progress=progress)[1]))
    return out


def prune_store(root: Path | None = None, *, store_dir: str | Path | None = None, dry_run: bool = False) -> list[Any]:
    """Remove the store entries that no job of any section under any profile (:data:`~fragile.config.PROFILES`) is
    keyed by: jobs whose configuration or numerics version has moved on. Returns the entries removed (or, with
    ``dry_run``, that would be), as :class:`~fragile.run.store.StoredJob` values sorted by name. ``store_dir``
    replaces the chapters' own store. Cost: building every profile's job list; nothing is computed.
    """
    import shutil

    root = root or project_root()
    wanted: set[Path] = set()
    stores: dict[Path, Any] = {}
    with chdir(root):  # the chapters' relative paths (data roots in job keys) are the project's
        for profile in PROFILES:
            for section, cfg, store in _chosen_sections(profile, root, None, store_dir):
                stores[store.root.resolve()] = store
                wanted |= {store.path(j.name, j.config).resolve() for j in section.chapter.jobs(cfg)}
    removed = []
    for store in stores.values():
        for entry in store.entries():
            path = (store.root / entry.name / entry.key).resolve()
            if path not in wanted:
                removed.append(entry)
                if not dry_run:
                    shutil.rmtree(path)
                    for parent in path.parents:  # the job's folder, once its last entry is gone
                        if parent == store.root.resolve() or any(parent.iterdir()):
                            break
                        parent.rmdir()
    return sorted(removed)


def verify_sections(
    profile: str = "published",
    root: Path | None = None,
    only: list[str] | None = None,
    *,
    sample: int | None = None,
    within: float | None = None,
    seed: int = 0,
    rtol: float | None = None,
    store_dir: str | Path | None = None,
) -> list[Any]:
    """Recompute the stored jobs of every section (or ``only`` these) under ``profile`` and compare them with the
    store (:func:`fragile.run.verify.verify`): all of them, ``sample`` of them drawn with ``seed`` over every
    section's stored jobs together, or (``within``) jobs drawn in a random order with ``seed`` while the seconds the
    store records for them add up to at most ``within`` (a job too long to fit is passed over; one without a
    recorded time is never drawn). ``store_dir`` replaces the chapters' own. Each chapter's ``prepare`` runs first
    (data it writes to disk).

    Raises:
        InvalidArgumentError: a name in ``only`` that is no section, a bad profile value, or both ``sample`` and
            ``within``.
    """
    import numpy as np

    from fragile.run.verify import DEFAULT_RTOL, verify

    if sample is not None and within is not None:
        raise InvalidArgumentError("sample and within are exclusive: give a number of jobs or a time budget")
    root = root or project_root()
    jobs = []
    for section, cfg, store in _chosen_sections(profile, root, only, store_dir):
        chosen = [j for j in section.chapter.jobs(cfg) if store.holds(j.name, j.config)]
        if chosen and section.chapter.prepare is not None:
            section.chapter.prepare(cfg)
        jobs += [(job, store) for job in chosen]
    order = np.random.default_rng(seed).permutation(len(jobs))
    if sample is not None and sample < len(jobs):
        jobs = [jobs[i] for i in sorted(order[:sample])]
    elif within is not None:
        picked, left = [], within
        for i in order:
            took = jobs[i][1].compute(jobs[i][0].name, jobs[i][0].config).seconds
            if took is not None and took <= left:
                picked.append(i)
                left -= took
        jobs = [jobs[i] for i in sorted(picked)]
    out = []
    for job, store in jobs:
        out += verify([job], store, rtol=DEFAULT_RTOL if rtol is None else rtol)
    return out


# The book's own pages after the chapters: how to rerun, and how the pages were made.
USING_THE_BOOK = ("rerun", "provenance")


def toc_yaml() -> str:
    """``book/_toc.yml`` as the chapter registry says: the chapters by part, in book order, then the book's
    own pages."""
    from fragile.chapters.registry import CHAPTERS

    lines = [
        "# Written by fragile.run.runner.write_toc from fragile.chapters.registry: edit the registry, not this file.",
        "format: jb-book",
        "root: index",
        "parts:",
    ]
    parts: dict[str, list[str]] = {}
    for chapter in CHAPTERS.values():
        parts.setdefault(chapter.part, []).append(f"sections/{chapter.notebook}")
    parts["Using this book"] = list(USING_THE_BOOK)
    for caption, files in parts.items():
        lines += [f"  - caption: {caption}", "    chapters:", *(f"      - file: {f}" for f in files)]
    return "\n".join(lines) + "\n"


def write_toc(root: Path | None = None) -> Path:
    """Write ``book/_toc.yml`` from the registry (atomically, only when it differs); returns its path."""
    root = root or project_root()
    path = root / "book" / "_toc.yml"
    text = toc_yaml()
    if not path.is_file() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
    return path


def build_html(root: Path | None = None, *, strict: bool = True) -> Path:
    """``jupyter-book build book`` (warnings as errors with ``strict``), its table of contents written from the
    chapter registry first; returns the HTML folder."""
    root = root or project_root()
    write_toc(root)
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(root / "book")]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    if subprocess.run(cmd, cwd=root).returncode != 0:
        raise FragileError("jupyter-book build failed (warnings are errors); see its output above")
    return root / "book" / "_build" / "html"


def stale_sections(root: Path | None = None) -> list[str]:
    """Problems that make the committed book out of date with its templates and parameter profiles.

    An executed chapter is stale when it is missing, when its template changed since it was executed,
    when the library code its template imports (read from ``root/fragile``, see
    :func:`~fragile.run.code.code_problem`) changed or was not recorded, when the profile it was
    executed with now gives different parameters, or when an output it wrote (its ``summary.json`` and figures
    under ``results/``) is missing, changed, or joined by a file it did not write.
    """
    root = root or project_root()
    problems = []
    for section in sections(root):
        path = book_section_path(section, root)
        if not path.is_file():
            problems.append(f"{section.name}: not executed (no {path.relative_to(root)})")
            continue
        meta = json.loads(path.read_text()).get("metadata", {}).get("fragile")
        if not meta:
            problems.append(f"{section.name}: executed chapter has no fragile metadata (not run by the runner)")
            continue
        if meta.get("template_digest") != template_digest(section.path):
            problems.append(f"{section.name}: template changed since the chapter was executed")
        code = code_problem(meta, section.path, root)
        if code:
            problems.append(f"{section.name}: {code}")
        expected = resolve_parameters(section, meta.get("profile", "default"), None, root)
        if params_digest(expected) != meta.get("params_digest"):
            problems.append(f"{section.name}: book/params/{meta.get('profile')}.yml changed since the chapter was executed")
        problems += [f"{section.name}: {p}" for p in _output_problems(section, meta, expected, root)]
    return problems


def _output_problems(section: Section, meta: dict[str, Any], params: dict[str, Any], root: Path) -> list[str]:
    """How the chapter's outputs on disk (summary, figures) differ from those its execution wrote."""
    recorded = meta.get("outputs")
    if recorded is None:
        return ["the executed chapter does not record its outputs (executed by an older runner)"]
    now = output_digests(section, meta.get("profile", "default"), params, root)
    problems = [f"{name} is missing" for name in sorted(set(recorded) - set(now))]
    problems += [
        f"{name} changed since the chapter wrote it" for name in sorted(n for n in recorded if n in now and now[n] != recorded[n])
    ]
    problems += [f"{name} was not written by the chapter's execution" for name in sorted(set(now) - set(recorded))]
    return problems
