"""The layers of fragile/, read from the source with ``ast``: what each package may import.

core, estimators, data and models are the numerics (no chapter, no Dask, no papermill, no plotting); run/ is
the execution machinery (it knows no chapter but through the registry); chapters import the core, the book
layer and the shared protocol, never another chapter.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fragile"
PROTOCOLS = {
    "fragile.chapters.protocol",
    "fragile.chapters.results",
    "fragile.chapters.table1_protocol",
    "fragile.chapters.registry",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (``from a import b`` gives ``a`` and ``a.b``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


MODULES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}
CHAPTERS = sorted(m for m in MODULES if m.startswith("fragile.chapters.") and m not in PROTOCOLS)


def test_the_layout_has_the_packages_the_readme_names():
    readme = (ROOT / "README.md").read_text()
    for package in ("core", "estimators", "data", "models", "run", "book", "chapters"):
        assert (PACKAGE / package / "__init__.py").is_file(), package
        assert f"fragile/{package}/" in readme or f"fragile.{package}" in readme, package
    assert len(CHAPTERS) == 6


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_chapter_imports_another_chapter(chapter):
    others = {c for c in CHAPTERS if c != chapter}
    assert not {m for m in MODULES[chapter] if m in others or any(m.startswith(o + ".") for o in others)}


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[1:2] in (["core"], ["estimators"], ["data"], ["models"])])
def test_the_numerics_import_nothing_above_them(module):
    above = (
        "fragile.chapters",
        "fragile.book",
        "fragile.run",
        "dask",
        "distributed",
        "papermill",
        "matplotlib",
        "myst_nb",
        "pandas",
        "ipywidgets",
    )
    assert not {m for m in MODULES[module] if m.startswith(above)}, module


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("fragile.run.") and m != "fragile.run.runner"])
def test_the_run_layer_knows_no_chapter(module):
    assert not {m for m in MODULES[module] if m.startswith("fragile.chapters")}, module


def test_the_chapter_protocols_import_no_chapter():
    for module in PROTOCOLS - {"fragile.chapters.registry"}:
        assert not {m for m in MODULES[module] if m in CHAPTERS}, module


def readme_modules() -> set[str]:
    """The modules the README's table names: ``fragile.x.y`` in full, or ``.z`` for a sibling of the cell's last full name."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## What is in the library") : text.index("## Use the library")]
    named = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        parent = ""
        for name in __import__("re").findall(r"`([.\w]+)`", line.split("|")[1]):
            if name.startswith("."):
                named.add(parent + name)
            elif name.startswith("fragile."):
                named.add(name)
                parent = name.rsplit(".", 1)[0]
    return named


def test_the_readme_module_table_matches_the_tree():
    tree = {m for m in MODULES if not m.endswith("__main__") and m.count(".") and not (PACKAGE / m.split(".", 1)[1]).is_dir()}
    assert readme_modules() == tree


def test_the_book_pages_read_each_chapters_numbers_under_its_registered_glue_prefix():
    import re

    from fragile.chapters.registry import CHAPTERS

    prefixes = {c.notebook: c.glue_prefix for c in CHAPTERS.values()}
    refs = []
    for page in sorted((ROOT / "book").glob("*.md")):
        refs += re.findall(r"sections/(\d\d_\w+)\.ipynb::(\w+)", page.read_text())
    assert refs, "the book's pages glue no chapter number"
    for notebook, key in refs:
        assert notebook in prefixes, notebook
        assert key.startswith(prefixes[notebook] + "_"), (notebook, key)
