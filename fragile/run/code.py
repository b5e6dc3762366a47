"""What library code a result depends on: the fragile modules a chapter or a job imports, and a digest of them.

The modules are found statically: each module's source is parsed with :mod:`ast` and every import
statement counts, at module level or inside a function (chapters import lazily), absolute or relative,
``import fragile.x`` as much as ``from fragile.x import y`` (``y`` counted too when it is a submodule).
Importing a submodule runs its parent packages' ``__init__``, so those count as well. Imports made by
computed names (``importlib.import_module(name)``) are not seen, nor are imports of a fragile module that
does not exist (it has no code to digest; the import statement itself is part of the importer's source).

A module's digest covers its normalised source: the ``ast`` tree unparsed, with every bare string
statement (docstrings) removed. Comments, docstrings and formatting therefore change nothing; any other
change to a statement, a constant or an annotation changes the digest. The normalised form is that of
:func:`ast.unparse` of the running Python; should a later Python unparse some construct differently, a
book executed under one Python reads as stale under the other (never the reverse: equal digests always
mean the same statements).

Cost: each distinct source text is parsed and unparsed once per process (a few milliseconds per
module; the whole package well under a second); a closure then costs one file read per module.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragile.errors import FragileError, InvalidArgumentError

PACKAGE = "fragile"
DIGEST_CHARS = 16


@dataclass(frozen=True)
class _Import:
    """One imported name as written: ``level`` dots, then ``module``; ``names`` for a ``from`` import."""

    level: int
    module: str | None
    names: tuple[str, ...] | None  # None: ``import module``


@dataclass(frozen=True)
class _Analysis:
    digest: str
    imports: tuple[_Import, ...]


def _short_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _is_bare_string(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _strip_bare_strings(tree: ast.AST) -> ast.AST:
    """Remove every statement that is only a string (docstrings included): none of them runs any code.
    A body left empty gets a ``pass`` so that the tree still unparses to valid Python."""
    for node in ast.walk(tree):
        for name, value in ast.iter_fields(node):
            if isinstance(value, list) and value and all(isinstance(s, ast.stmt) for s in value):
                kept = [s for s in value if not _is_bare_string(s)]
                setattr(node, name, kept or [ast.Pass()])
    return tree


def _parse(text: str, filename: str) -> ast.Module:
    try:
        return ast.parse(text, filename=filename)
    except SyntaxError as exc:
        raise FragileError(f"{filename} is not valid Python ({exc.msg}, line {exc.lineno}); its imports cannot be read") from None


def _imports(tree: ast.AST) -> tuple[_Import, ...]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [_Import(0, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(_Import(node.level, node.module, tuple(alias.name for alias in node.names)))
    return tuple(found)


@functools.lru_cache(maxsize=1024)
def _analyse(text: str, filename: str) -> _Analysis:
    """Digest and import statements of one source text; cached by the text itself, so a file edited
    between two calls is analysed afresh and an unchanged one is not parsed twice."""
    tree = _parse(text, filename)
    found = _imports(tree)
    return _Analysis(_short_sha(ast.unparse(_strip_bare_strings(tree))), found)


def package_root() -> Path:
    """The folder holding the imported ``fragile`` package (a checkout's root for an editable install)."""
    import fragile

    return Path(fragile.__file__).resolve().parent.parent


class _Package:
    """The fragile modules under ``root / "fragile"``, read from disk (not from the imported package)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not (self.root / PACKAGE / "__init__.py").is_file():
            raise FragileError(f"no {PACKAGE}/ package under {self.root}; its code cannot be digested")

    def file(self, name: str) -> Path | None:
        """The source file of module ``name``, or None when it is not a fragile module under root."""
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        base = self.root.joinpath(*name.split("."))
        for path in (base / "__init__.py", base.with_suffix(".py")):  # a package shadows a same-named module
            if path.is_file():
                return path
        return None

    def analyse(self, name: str) -> _Analysis:
        path = self.file(name)
        return _analyse(path.read_text(), str(path.relative_to(self.root)))

    def resolve(self, found: Iterable[_Import], importer: str, importer_is_package: bool) -> set[str]:
        """The fragile modules that the import statements ``found`` of module ``importer`` load."""
        out = set()
        for imp in found:
            base = self._absolute(imp, importer, importer_is_package)
            if base is None or self.file(base) is None:
                continue
            out.add(base)
            for name in imp.names or ():
                if self.file(f"{base}.{name}") is not None:
                    out.add(f"{base}.{name}")
        return out

    @staticmethod
    def _absolute(imp: _Import, importer: str, importer_is_package: bool) -> str | None:
        if imp.level == 0:
            return imp.module
        parts = importer.split(".") if importer_is_package else importer.split(".")[:-1]
        if imp.level - 1 >= len(parts):
            return None
        parts = parts[: len(parts) - (imp.level - 1)]
        return ".".join(parts + ([imp.module] if imp.module else []))

    def imports_of(self, name: str) -> set[str]:
        """The fragile modules module ``name`` imports directly, plus its parent packages."""
        path = self.file(name)
        direct = self.resolve(self.analyse(name).imports, name, path.name == "__init__.py")
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        return direct | {p for p in parents if self.file(p) is not None}

    def closure(self, modules: Iterable[str]) -> list[str]:
        if isinstance(modules, str):
            raise InvalidArgumentError(f"modules={modules!r} must be a list of module names, not one string")
        todo = list(modules)
        unknown = sorted(m for m in todo if self.file(m) is None)
        if unknown:
            raise InvalidArgumentError(f"modules={unknown} are not {PACKAGE} modules under {self.root}")
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.imports_of(name) - seen)
        return sorted(seen)

    def digests(self, modules: Iterable[str]) -> dict[str, str]:
        return {name: self.analyse(name).digest for name in self.closure(modules)}


def _root(root: str | Path | None) -> Path:
    return Path(root) if root is not None else package_root()


def module_closure(modules: Iterable[str], root: str | Path | None = None) -> list[str]:
    """The fragile modules ``modules`` and every fragile module they import, transitively, sorted.

    Args:
        modules: dotted names of fragile modules (``fragile.chapters.iris``).
        root: the folder holding the ``fragile/`` package whose files are read (default: the imported
            package's, :func:`package_root`).

    Raises:
        InvalidArgumentError: a name in ``modules`` is not a fragile module under ``root``.
        FragileError: a module's source is not valid Python.
    """
    return _Package(_root(root)).closure(modules)


def module_digests(modules: Iterable[str], root: str | Path | None = None) -> dict[str, str]:
    """Module name → digest of its normalised source, for every module of :func:`module_closure`."""
    return _Package(_root(root)).digests(modules)


def combined_digest(digests: dict[str, str]) -> str:
    """One digest over the names and digests of ``digests`` (as :func:`module_digests` returns them)."""
    return _short_sha(json.dumps(sorted(digests.items())))


def code_digest(modules: Iterable[str], root: str | Path | None = None) -> str:
    """A 16-hex-digit digest of the code of :func:`module_closure` ``(modules)``: the same exactly when
    every module of the closure has the same normalised source (docstrings, comments, layout ignored)."""
    return combined_digest(module_digests(modules, root))


def _cell_source(cell: dict[str, Any]) -> str:
    text = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    # IPython magics and shell escapes are not Python; the rest of the cell still is.
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("%", "!")))


def notebook_modules(path: str | Path, root: str | Path | None = None) -> list[str]:
    """The fragile modules that the code cells of notebook ``path`` import (directly), sorted.

    Args:
        path: a ``.ipynb`` file.
        root: the folder holding the ``fragile/`` package the names are resolved against (default:
            :func:`package_root`).

    Raises:
        FragileError: the notebook cannot be read, or a code cell is not valid Python.
    """
    path = Path(path)
    try:
        cells = json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError) as exc:
        raise FragileError(f"notebook {path} cannot be read ({exc})") from None
    package = _Package(_root(root))
    out: set[str] = set()
    for i, cell in enumerate(cells):
        if cell.get("cell_type") == "code":
            found = _analyse(_cell_source(cell), f"{path.name}, code cell {i}").imports
            out |= package.resolve(found, "__notebook__", importer_is_package=False)
    return sorted(out)


def notebook_code(path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """What an executed notebook records about its library code: ``code_digest`` (the
    :func:`combined_digest`) and ``code_modules`` (module → digest) of the closure of
    :func:`notebook_modules`, read from the files under ``root``."""
    digests = module_digests(notebook_modules(path, root), root)
    return {"code_digest": combined_digest(digests), "code_modules": digests}


def _describe(name: str, recorded: dict[str, str], current: dict[str, str]) -> str:
    if name not in recorded:
        return f"{name} (now imported)"
    if name not in current:
        return f"{name} (no longer imported)"
    return name


def code_problem(meta: dict[str, Any], template: str | Path, root: str | Path) -> str | None:
    """Why an executed chapter is stale against the library code under ``root``, or None if it is not.

    ``meta`` is the chapter's ``nb.metadata["fragile"]``, ``template`` its notebook template. A chapter
    whose metadata holds no code digest (executed before digests were recorded) is stale.
    """
    recorded = meta.get("code_modules")
    if not isinstance(recorded, dict) or "code_digest" not in meta:
        return "executed without a library code digest; re-execute it to record one"
    current = notebook_code(template, root)
    if current["code_digest"] == meta["code_digest"]:
        return None
    now = current["code_modules"]
    changed = sorted(m for m in set(recorded) | set(now) if recorded.get(m) != now.get(m))
    named = ", ".join(_describe(m, recorded, now) for m in changed)
    return f"library code changed since the chapter was executed (modules: {named})"


def _outside_module_digest(module: str) -> str:
    """Digest of a module outside the package (a test's job functions): its own normalised source and
    the code digest of the fragile modules it imports. Its imports of other non-fragile modules are
    not followed."""
    file = getattr(sys.modules.get(module), "__file__", None)
    if not file or not file.endswith(".py"):
        raise InvalidArgumentError(
            f"module {module!r} has no Python source file; define job functions in an importable module "
            "(its code is part of every job's cache key)"
        )
    path = Path(file)
    analysis = _analyse(path.read_text(), str(path))
    package = _Package(package_root())
    imported = package.resolve(analysis.imports, module, path.name == "__init__.py")
    return combined_digest({module: analysis.digest, **package.digests(imported)})


@functools.cache
def module_code_digest(module: str) -> str:
    """The code digest of module ``module`` of the imported package (:func:`package_root`), computed on
    first use and then kept for the process, so that every job of a sweep is keyed by the same code
    (files edited later in the process do not change it).

    A fragile module gets :func:`code_digest` of its closure; another module (it must be imported
    already, as a job function's module is) its own source plus the closure of its fragile imports.

    Raises:
        InvalidArgumentError: ``module`` is neither a fragile module nor an imported one with a ``.py`` file.
    """
    package = _Package(package_root())
    if package.file(module) is not None:
        return combined_digest(package.digests([module]))
    return _outside_module_digest(module)
