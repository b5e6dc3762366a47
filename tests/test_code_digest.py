"""The library-code digest: which fragile modules a module or a notebook imports, what changes the digest,
and cached jobs keyed by it."""

import json
import sys
import textwrap
import types

import pytest
from sweep_jobs import fail_if

from fragile.errors import InvalidArgumentError
from fragile.run import sweep
from fragile.run.code import code_digest, module_closure, module_code_digest, notebook_modules
from fragile.run.sweep import Job, run_sweep

A = '''\
"""Module a: its docstring."""

import math

SCALE = 2.0


def scaled(x):
    """Scale x."""
    from fragile.b import offset  # lazy, as chapters import

    return SCALE * math.sqrt(x) + offset()
'''

B = """\
def offset():
    return 1.0
"""


def _package(root, files):
    """A throw-away ``fragile`` package under ``root``: module name (without ``fragile.``) → source."""
    (root / "fragile").mkdir(parents=True, exist_ok=True)
    (root / "fragile" / "__init__.py").write_text('"""A stand-in package."""\n')
    for name, source in files.items():
        path = root.joinpath("fragile", *name.split("."))
        if source is None:  # a subpackage
            path.mkdir(parents=True, exist_ok=True)
            (path / "__init__.py").write_text("")
        else:
            path.with_suffix(".py").write_text(textwrap.dedent(source))
    return root


def test_closure_of_iris_holds_the_numerics_it_uses_and_no_other_chapter():
    closure = module_closure(["fragile.chapters.iris"])
    assert {"fragile.chapters.iris", "fragile.core.metrics", "fragile.core.train", "fragile.run.sweep"} <= set(closure)
    assert "fragile.chapters.small_mnist" not in closure and "fragile.chapters.estimands" not in closure
    assert {"fragile", "fragile.chapters"} <= set(closure)  # importing a submodule runs its packages' __init__
    assert closure == sorted(closure)


def test_closure_follows_lazy_submodule_and_relative_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "a": A,
            "b": B,
            "sub": None,
            "c": "X = 1\n",
            "d": "Y = 2\n",
            "e": "Z = 3\n",
            "sub.x": "from . import y\nfrom .z import w\nfrom .. import c\n",
            "sub.y": "import fragile.d as dee\n",
            "sub.z": "w = 1\nfrom fragile import e\n",
            "f": "import json\nimport fragile.nonexistent\n",
        },
    )
    assert module_closure(["fragile.a"], root) == ["fragile", "fragile.a", "fragile.b"]
    assert module_closure(["fragile.sub.x"], root) == [
        "fragile",
        "fragile.c",
        "fragile.d",
        "fragile.e",
        "fragile.sub",
        "fragile.sub.x",
        "fragile.sub.y",
        "fragile.sub.z",
    ]
    assert module_closure(["fragile.f"], root) == ["fragile", "fragile.f"]  # a missing module has no code
    with pytest.raises(InvalidArgumentError, match=r"modules=\['fragile.g', 'numpy'\] are not fragile modules"):
        module_closure(["fragile.a", "numpy", "fragile.g"], root)
    with pytest.raises(InvalidArgumentError, match="must be a list of module names"):
        module_closure("fragile.a", root)


def test_docstrings_comments_and_layout_leave_the_digest_a_changed_statement_changes_it(tmp_path):
    root = _package(tmp_path, {"a": A, "b": B})
    before = code_digest(["fragile.a"], root)
    cosmetic = (
        A.replace("Module a: its docstring.", "Module a, reworded.")
        .replace('"""Scale x."""', '"""Scale x (reworded)."""\n    # and a comment')
        .replace("SCALE * math.sqrt(x) + offset()", "(SCALE\n            * math.sqrt(x)\n            + offset())")
    )
    (root / "fragile" / "a.py").write_text(cosmetic)
    (root / "fragile" / "b.py").write_text("# a comment\n\n\ndef offset( ):\n    return 1.0  # why\n")
    assert code_digest(["fragile.a"], root) == before
    (root / "fragile" / "a.py").write_text(cosmetic.replace("SCALE = 2.0", "SCALE = 2.5"))
    changed = code_digest(["fragile.a"], root)
    assert changed != before
    (root / "fragile" / "a.py").write_text(cosmetic)
    (root / "fragile" / "b.py").write_text(B.replace("1.0", "1.0 + 0.0"))  # a module the closure reaches lazily
    assert code_digest(["fragile.a"], root) not in (before, changed)


def test_a_package_shadows_a_module_of_the_same_name(tmp_path):
    root = _package(tmp_path, {"c": "X = 1\n", "d": None, "d.e": "", "a": "import fragile.c\n"})
    (root / "fragile" / "c").mkdir()
    (root / "fragile" / "c" / "__init__.py").write_text("import fragile.d.e\n")
    assert module_closure(["fragile.a"], root) == ["fragile", "fragile.a", "fragile.c", "fragile.d", "fragile.d.e"]


def test_a_function_left_with_only_a_docstring_is_a_pass(tmp_path):
    root = _package(tmp_path, {"a": 'def f():\n    """Nothing."""\n'})
    before = code_digest(["fragile.a"], root)
    (root / "fragile" / "a.py").write_text("def f():\n    pass\n")
    assert code_digest(["fragile.a"], root) == before


def test_notebook_modules_reads_code_cells_and_skips_magics(tmp_path):
    root = _package(tmp_path, {"a": A, "b": B, "book": None, "book.chapter": "", "book.plotting": ""})
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": "import fragile.b is prose here"},
        {
            "cell_type": "code",
            "metadata": {},
            "source": ["%matplotlib inline\n", "!ls\n", "from fragile.book import chapter, plotting\n"],
        },
        {"cell_type": "code", "metadata": {}, "source": "import numpy\n\ndef later():\n    import fragile.a\n"},
    ]
    nb = tmp_path / "n.ipynb"
    nb.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert notebook_modules(nb, root) == ["fragile.a", "fragile.book", "fragile.book.chapter", "fragile.book.plotting"]


def test_the_real_templates_import_their_chapter():
    from fragile.run import runner

    for section in runner.sections():
        assert f"fragile.chapters.{section.short}" in notebook_modules(section.path), section.name


def test_job_digests_are_computed_once_per_module():
    module_code_digest.cache_clear()
    first = module_code_digest("fragile.chapters.iris")
    assert module_code_digest("fragile.chapters.iris") == first
    assert module_code_digest.cache_info().hits == 1 and module_code_digest.cache_info().misses == 1
    assert module_code_digest("sweep_jobs") != first  # a module outside the package: its source and its fragile imports


def test_a_job_is_keyed_by_its_code_and_recomputed_when_the_code_differs(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "module_code_digest", lambda module: "old-code")
    jobs = [Job(f"f/{s}", fail_if, {"seed": s, "bad": -1}) for s in range(2)]
    first = run_sweep(jobs, cache_dir=str(tmp_path), progress=False)
    assert sorted(first.done) == ["f/0", "f/1"] and first.results["f/0"] == {"seed": 0}  # fn gets its config only
    saved = json.loads((tmp_path / jobs[0].key / "config.json").read_text())
    assert saved == {"seed": 0, "bad": -1, "code": "old-code"}
    assert sorted(run_sweep(jobs, cache_dir=str(tmp_path), progress=False).cached) == ["f/0", "f/1"]

    old_key = jobs[0].key
    monkeypatch.setattr(sweep, "module_code_digest", lambda module: "new-code")
    assert jobs[0].key != old_key
    again = run_sweep(jobs, cache_dir=str(tmp_path), progress=False)
    assert sorted(again.done) == ["f/0", "f/1"] and not again.cached
    assert json.loads((tmp_path / jobs[0].key / "config.json").read_text())["code"] == "new-code"


def test_the_code_entry_is_reserved():
    with pytest.raises(InvalidArgumentError, match="holds 'code', which is reserved"):
        _ = Job("x", fail_if, {"seed": 0, "bad": 1, "code": 3}).key


def test_a_module_without_source_cannot_key_a_job(monkeypatch):
    monkeypatch.setitem(sys.modules, "made_in_memory", types.ModuleType("made_in_memory"))
    with pytest.raises(InvalidArgumentError, match="'made_in_memory' has no Python source file"):
        module_code_digest("made_in_memory")
