"""Packaging: pyproject.toml's dependency groups, environment.yml (Binder), constraints.txt and the code's imports
agree. Reads files only (tomllib, yaml, ast): imports no torch, runs in about a second."""

import ast
import functools
import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
SELF = PROJECT["name"]

# An import name that differs from its distribution's name (the rest: the same name, `_` read as `-`).
IMPORT_TO_DIST = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "IPython": "ipython",
    "distributed": "dask",  # declared as dask[distributed]
    "myst_nb": "myst-nb",
}
# A PyPI distribution (with an extra) under its conda-forge name(s).
PYPI_TO_CONDA = {
    "torch": ["pytorch"],
    "dask[distributed]": ["dask", "distributed"],
}
# A requirement with an extra that is itself a distribution: it installs that one too.
INSTALLED_WITH_EXTRA = {"dask[distributed]": ["distributed"]}
# Installed for what they run, not for an import: the book builder, the kernel papermill starts, the test tools.
RUNTIME_ONLY = {"jupyter-book", "ipykernel", "pytest", "playwright", "ruff", "pypdf"}
# Not packages of the environment: the interpreter and the installer.
CONDA_INFRASTRUCTURE = {"python", "pip"}

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(requirement: str) -> tuple[str, tuple[str, ...], str]:
    """``name``, its extras and its version specifier (``">=8,<9"``), from a PEP 508 string (no markers here)."""
    m = REQUIREMENT.match(requirement)
    assert m and ";" not in requirement, f"cannot read the requirement {requirement!r}"
    extras = tuple(sorted(_norm(e) for e in m[2][1:-1].split(","))) if m[2] else ()
    return _norm(m[1]), extras, m[3].replace(" ", "")


def _closure(group: str | None) -> list[str]:
    """The requirements of the core (``None``) or of an extra, with `fragile[...]` self-references expanded and
    the core included (an extra is installed on top of the core)."""
    out, todo, seen = list(PROJECT["dependencies"]), [group] if group else [], set()
    while todo:
        g = todo.pop()
        if g in seen:
            continue
        seen.add(g)
        for req in EXTRAS[g]:
            name, extras, _ = _parse(req)
            if name == SELF:
                todo.extend(extras)
            else:
                out.append(req)
    return out


def _bounds(spec: str) -> tuple[str | None, str | None]:
    """The lower (``>=``) and upper (``<``) bound of a specifier, as strings."""
    lower = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    upper = re.search(r"(?<![<>=!~])<\s*([0-9][0-9A-Za-z.]*)", spec)
    return (lower[1] if lower else None), (upper[1] if upper else None)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v.split("+")[0].split("post")[0])[:4])


def _module_imports(tree: ast.AST, *, top_level_only: bool = False) -> set[str]:
    """Absolute imports (``a.b.c``) of a module; ``top_level_only`` skips function bodies (what runs at import time)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)  # `from pkg import submodule`
            visit(child)

    visit(tree)
    return found


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells if c["cell_type"] == "code"]
    return "\n".join(line for line in "\n".join(code).splitlines() if not line.lstrip().startswith(("%", "!")))


@functools.cache
def _imports_by_file() -> dict[str, frozenset[str]]:
    """The third-party top-level imports, function-level ones included, of every file whose imports must be
    declared: the package and the chapter notebooks."""
    files = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "fragile").rglob("*.py"))}
    files.update({str(p.relative_to(ROOT)): _notebook_code(p) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))})
    return {path: frozenset(_third_party(_module_imports(ast.parse(code, path)))) for path, code in files.items()}


def _third_party(modules: set[str]) -> set[str]:
    tops = {m.split(".")[0] for m in modules}
    return {t for t in tops if t not in sys.stdlib_module_names and t != SELF}


def _dist_of(top_level_import: str) -> str:
    return _norm(IMPORT_TO_DIST.get(top_level_import, top_level_import))


def _declared() -> dict[str, str]:
    """Every declared distribution (all groups), by normalised name, with the group that declares it."""
    out = {_parse(r)[0]: "dependencies" for r in PROJECT["dependencies"]}
    for group, reqs in EXTRAS.items():
        for r in reqs:
            name = _parse(r)[0]
            if name != SELF:
                out.setdefault(name, group)
    return out


def _conda_packages() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    out = {}
    for entry in env["dependencies"]:
        assert isinstance(entry, str), f"environment.yml: {entry!r} (a pip section would bypass conda-forge)"
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(.*)$", entry.strip())
        name, spec = _norm(m[1]), m[2].replace(" ", "")
        assert name not in out, f"environment.yml lists {name} twice"
        out[name] = spec
    return out


def test_the_core_install_is_small_and_takes_ranges():
    names = [_parse(r)[0] for r in PROJECT["dependencies"]]
    assert set(names) == {"torch", "numpy", "scipy", "tqdm", "pyyaml"}
    assert all("==" not in r for r in _closure("book") + EXTRAS["test"]), "exact pins belong in constraints.txt"
    assert _bounds(dict(zip(names, PROJECT["dependencies"]))["torch"])[0] == "2.4"


def test_import_fragile_needs_only_the_core():
    """What `import fragile` runs at module level (following fragile's own imports) imports only core packages."""
    core = {_parse(r)[0] for r in PROJECT["dependencies"]}

    def module_file(name: str) -> Path | None:
        base = ROOT.joinpath(*name.split("."))
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)

    seen, todo, needed = set(), ["fragile"], {}
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        imports = _module_imports(ast.parse(path.read_text()), top_level_only=True)
        todo.extend(m for m in imports if m.split(".")[0] == SELF)
        for top in _third_party(imports):
            needed.setdefault(_dist_of(top), str(path.relative_to(ROOT)))
    assert "fragile.core.objective" in seen and "fragile.estimators.base" in seen
    extra = {dist: where for dist, where in needed.items() if dist not in core}
    assert not extra, f"imported at module level by `import fragile`, but not core dependencies: {extra}"


def test_every_third_party_import_is_declared():
    declared = _declared()
    missing = {}
    for path, tops in _imports_by_file().items():
        for top in tops:
            if _dist_of(top) not in declared:
                missing.setdefault(_dist_of(top), path)
    assert not missing, f"imported but declared in no dependency group of pyproject.toml: {missing}"


def test_nothing_declared_is_never_imported():
    imported = {_dist_of(t) for tops in _imports_by_file().values() for t in tops}
    peers = {_parse(r)[0] for r in EXTRAS["peers"]}
    unused = sorted(set(_declared()) - imported - RUNTIME_ONLY - peers)
    assert not unused, f"declared in pyproject.toml but imported nowhere in fragile/ or notebooks/: {unused}"


def test_environment_yml_has_exactly_the_books_packages_with_the_same_bounds():
    conda = _conda_packages()
    expected = {}
    for req in _closure("book"):
        name, extras, spec = _parse(req)
        key = f"{name}[{','.join(extras)}]" if extras else name
        for conda_name in PYPI_TO_CONDA.get(key, [name]):
            expected[conda_name] = spec
    listed = set(conda) - CONDA_INFRASTRUCTURE
    assert listed == set(expected), (
        f"environment.yml misses {sorted(set(expected) - listed)} and has extra {sorted(listed - set(expected))}"
    )
    assert conda["python"] == "=3.11" and PROJECT["requires-python"] == ">=3.11"
    for name, spec in expected.items():
        env_spec = conda[name].split("=cpu")[0]  # a build-string selector, e.g. pytorch's CPU build
        for which, ours, theirs in zip(("lower", "upper"), _bounds(spec), _bounds(env_spec)):
            if ours and theirs:
                assert ours == theirs, f"{name}: {which} bound {ours} in pyproject.toml, {theirs} in environment.yml"
        assert _bounds(spec)[0] is None or _bounds(env_spec)[0] is not None, f"{name}: environment.yml drops the lower bound"


def test_constraints_pin_every_direct_dependency_within_its_range():
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = {}
    for line in filter(None, lines):
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"constraints.txt: {line!r} is not an exact pin"
        pins[_norm(m[1])] = m[2]
    direct = [r for group in ("book", "test") for r in _closure(group)]
    for req in direct:
        name, extras, spec = _parse(req)
        key = f"{name}[{','.join(extras)}]" if extras else name
        for dist in [name, *INSTALLED_WITH_EXTRA.get(key, [])]:
            assert dist in pins, f"constraints.txt does not pin {dist}"
            lower, upper = _bounds(spec)
            v = _version(pins[dist])
            assert lower is None or v >= _version(lower), f"{dist}=={pins[dist]} is below {spec}"
            assert upper is None or v < _version(upper), f"{dist}=={pins[dist]} is not below {upper}"
    for name in ("torch", "torchvision", "jupyter-book", "myst-nb", "sphinx"):
        assert name in pins, f"constraints.txt does not pin {name}"
    assert all("==" in r for r in EXTRAS["peers"]), "the peers are pinned in pyproject.toml (they are not in constraints.txt)"


def _make_rule(target: str) -> str:
    """The recipe lines of a Makefile target, after its prerequisites line (``target: prerequisites``)."""
    m = re.search(rf"^{re.escape(target)}:(.*)\n((?:\t.*\n)*)", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"the Makefile has no {target} target"
    return m[1] + "\n" + m[2]


def test_the_venv_is_installed_under_the_constraints_and_rebuilt_when_they_change():
    rule = _make_rule("$(STAMP)")
    assert rule.split("\n")[0].split() == ["pyproject.toml", "constraints.txt"]
    assert "-c constraints.txt -e '.[book,test]'" in rule


def test_make_test_lints_first():
    assert "lint" in _make_rule("test").split("\n")[0].split()
    rule = _make_rule("lint")
    assert "ruff check ." in rule and "ruff format --check ." in rule


def test_make_clean_keeps_the_cache():
    assert ".cache" not in _make_rule("clean"), "make clean keeps .cache/ (hours of finished jobs)"
    assert "rm -rf .cache" in _make_rule("clean-cache")


def test_the_package_ships_its_type_marker():
    assert (ROOT / "fragile" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["fragile"]
    requires = PYPROJECT["build-system"]["requires"]
    assert any(_parse(r)[0] == "setuptools" and _version(_bounds(r)[0] or "0") >= (77,) for r in requires)
