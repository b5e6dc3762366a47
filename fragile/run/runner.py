"""Run the section notebooks with papermill under a parameter profile, and check the book is current.

A section is a chapter of :mod:`fragile.chapters.registry` and its template ``notebooks/NN_<name>.ipynb`` with
one ``parameters`` cell declaring the chapter config's fields. A profile ``book/params/<profile>.yml`` maps
section names to parameter values; every value is checked against the chapter's config (name, type, range)
before papermill starts. Book runs write
``book/sections/NN_<name>.ipynb``; ad-hoc runs write under ``runs/`` and never touch the book. Output is
written to a temporary file and moved into place only when the whole notebook succeeded.

Sections run their grids through :mod:`fragile.run.sweep`. When a section's ``scheduler`` is ``local``, the
runner starts one Dask ``LocalCluster`` for the whole call, logs its dashboard address, and hands the
section its address, so every chapter of a book run shares the same workers.
"""

from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragile.atomic import atomic_write_bytes
from fragile.book.chapter import COMMON_FIELDS, EXECUTION_PARAMETERS, Chapter
from fragile.config import PROFILES, from_dict, load_yaml
from fragile.errors import FragileError, InvalidArgumentError
from fragile.run.code import code_problem, notebook_code

log = logging.getLogger(__name__)

# Parameters every notebook declares (``cache_dir`` and ``n_seeds`` keep their config defaults where not declared).
COMMON_PARAMETERS = tuple(name for name in COMMON_FIELDS if name not in ("cache_dir", "n_seeds"))


class SectionFailedError(FragileError):
    """A section notebook raised while executing; nothing was written to the output path."""


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


def run_section(
    name: str,
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    *,
    output: str | Path | None = None,
    root: Path | None = None,
    progress: bool = False,
    cluster: Schedulers | None = None,
) -> Path:
    """Execute one section with papermill; returns the executed notebook's path.

    Args:
        name: section name (``iris`` or ``01_iris``).
        profile: parameter profile.
        overrides: parameter values replacing the profile's.
        output: where the executed notebook goes; default ``runs/<section>-<profile>-<time>.ipynb``
            (ad-hoc runs never write into the book).
        root: the project checkout (default: found from the working directory).
        progress: show papermill's cell progress bar.
        cluster: shares one local Dask cluster between calls; by default a section whose
            ``scheduler`` is ``local`` gets a cluster of its own for this call.

    Raises:
        InvalidArgumentError: unknown section, profile or parameter name (before executing anything).
        SectionFailedError: the notebook raised; its message is the notebook's error line.
    """
    root = root or project_root()
    section = find_section(name, root)
    params = resolve_parameters(section, profile, overrides, root)
    if output is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        output = root / "runs" / f"{section.name}-{profile}-{stamp}.ipynb"
        params.setdefault("results_dir", "runs/results")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        cluster = cluster or Schedulers(stack, params.get("n_workers") or None)
        run_params = dict(params)
        if "scheduler" in section.parameters:
            run_params["scheduler"] = cluster.resolve(params.get("scheduler", declared_default(section, "scheduler")))
        _execute(section, profile, params, run_params, output, root, progress)
    return output


def _execute(
    section: Section, profile: str, params: dict[str, Any], run_params: dict[str, Any], output: Path, root: Path, progress: bool
) -> None:
    import nbformat
    import papermill as pm

    code = notebook_code(section.path, root)  # read before executing: the code the chapter runs
    fd, tmp = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=".ipynb", dir=output.parent)
    os.close(fd)
    env_before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        pm.execute_notebook(
            str(section.path),
            tmp,
            parameters=run_params,
            cwd=str(root),
            kernel_name="python3",
            progress_bar=progress,
            log_output=False,
            request_save_on_cell_execute=False,
        )
        nb = nbformat.read(tmp, as_version=4)
        nb.metadata["fragile"] = {
            "section": section.name,
            "profile": profile,
            "parameters": params,
            "template_digest": template_digest(section.path),
            "params_digest": params_digest(params),
            **code,
        }
        atomic_write_bytes(output, nbformat.writes(nb).encode())
    except pm.PapermillExecutionError as exc:
        raise SectionFailedError(f"section {section.short!r} failed: {exc.ename}: {exc.evalue}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
        if env_before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env_before


def book_section_path(section: Section, root: Path) -> Path:
    return root / "book" / "sections" / f"{section.name}.ipynb"


def run_book_sections(
    profile: str = "default",
    root: Path | None = None,
    only: list[str] | None = None,
    *,
    overrides: dict[str, Any] | None = None,
) -> list[Path]:
    """Execute every section (or ``only`` these) into ``book/sections/`` with the profile's parameters.

    ``overrides`` may hold only execution parameters (``scheduler``, ``n_workers``): anything else would
    make the book disagree with its profile. Sections whose scheduler is ``local`` share one cluster of
    ``n_workers`` workers (default: one per CPU).
    """
    root = root or project_root()
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(EXECUTION_PARAMETERS))
    if bad:
        raise InvalidArgumentError(
            f"book runs take only execution overrides {list(EXECUTION_PARAMETERS)}, not {bad}; "
            "change book/params/<profile>.yml instead"
        )
    chosen = [s for s in sections(root) if not only or s.name in only or s.short in only]
    for section in chosen:  # every name is checked before the first section starts
        resolve_parameters(section, profile, overrides, root)
    out = []
    with schedulers(overrides.get("n_workers") or None) as cluster:
        for section in chosen:
            log.info("running section %s (profile %s)", section.name, profile)
            out.append(
                run_section(section.name, profile, overrides, output=book_section_path(section, root), root=root, cluster=cluster)
            )
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
    :func:`~fragile.run.code.code_problem`) changed or was not recorded, or when the profile it was
    executed with now gives different parameters.
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
    return problems
