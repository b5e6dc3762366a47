"""`fragile check` sees library code: a copy of the project whose executed chapters record the code they
ran with is current until a statement of a module they import changes (a docstring or comment does not)."""

import ast
import json
import shutil
from pathlib import Path

import pytest

from fragile.run import runner
from fragile.run.code import code_problem, notebook_code

ROOT = Path(__file__).resolve().parents[1]


def _code_problems(root: Path) -> dict[str, str]:
    """Section → its library-code problem; template and profile problems are another test's business."""
    out = {}
    for problem in runner.stale_sections(root):
        name, _, why = problem.partition(": ")
        if "library code" in why:
            out[name] = why
    return out


def _stamp(root: Path) -> None:
    """Record in each executed chapter the code it would have run with, as the runner does."""
    for section in runner.sections(root):
        path = runner.book_section_path(section, root)
        nb = json.loads(path.read_text())
        nb["metadata"]["fragile"].update(notebook_code(section.path, root))
        path.write_text(json.dumps(nb))


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("fragile", "notebooks", "book/params", "book/sections"):
        shutil.copytree(ROOT / part, root / part, ignore=ignore)
    return root


def _function(path: Path, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == name)


def _splice(path: Path, start: tuple[int, int], end: tuple[int, int], what: str) -> None:
    """Replace the source between two ``ast`` positions (line, UTF-8 byte column) with ``what``."""
    lines = path.read_bytes().splitlines(keepends=True)
    head, tail = lines[start[0] - 1][: start[1]], lines[end[0] - 1][end[1] :]
    lines[start[0] - 1 : end[0]] = [head + what.encode() + tail]
    path.write_bytes(b"".join(lines))


def _reword_docstring_and_comment(path: Path, name: str) -> None:
    doc = _function(path, name).body[0].value
    _splice(
        path,
        (doc.lineno, doc.col_offset),
        (doc.end_lineno, doc.end_col_offset),
        '"""Reworded, and now\n    on two lines."""  # with a comment\n',
    )


def _change_last_return(path: Path, name: str) -> None:
    ret = [n for n in ast.walk(_function(path, name)) if isinstance(n, ast.Return)][-1]
    end = (ret.end_lineno, ret.end_col_offset)
    _splice(path, end, end, " + 0.0")


def test_library_code_changes_make_exactly_the_chapters_that_import_them_stale(project):
    sections = runner.sections(project)
    _stamp(project)
    assert _code_problems(project) == {}
    imports = {s.name: set(notebook_code(s.path, project)["code_modules"]) for s in sections}

    metrics = project / "fragile" / "core" / "metrics.py"
    original = metrics.read_text()
    _reword_docstring_and_comment(metrics, "correlation")
    assert metrics.read_text() != original
    assert _code_problems(project) == {}

    _change_last_return(metrics, "correlation")
    problems = _code_problems(project)
    assert set(problems) == {name for name, mods in imports.items() if "fragile.core.metrics" in mods} != set()
    expected = "library code changed since the chapter was executed (modules: fragile.core.metrics)"
    assert all(why == expected for why in problems.values())
    metrics.write_text(original)
    assert _code_problems(project) == {}

    # A module only some chapters reach: only those go stale.
    reached = {m for mods in imports.values() for m in mods}
    some = sorted(
        (m for m in reached if 0 < sum(m in mods for mods in imports.values()) < len(imports)),
        key=lambda m: (sum(m in mods for mods in imports.values()), m),
    )
    assert some, "every chapter imports the same modules; nothing to tell apart"
    module = some[0]
    base = project.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    path.write_text(path.read_text() + "\n_STALENESS_PROBE = 1\n")
    assert set(_code_problems(project)) == {name for name, mods in imports.items() if module in mods}


def test_a_chapter_executed_without_a_code_digest_is_stale(project):
    _stamp(project)
    section = runner.sections(project)[0]
    path = runner.book_section_path(section, project)
    nb = json.loads(path.read_text())
    del nb["metadata"]["fragile"]["code_digest"], nb["metadata"]["fragile"]["code_modules"]
    path.write_text(json.dumps(nb))
    assert _code_problems(project) == {section.name: "executed without a library code digest; re-execute it to record one"}


def test_a_module_newly_imported_by_a_template_is_named(project):
    _stamp(project)
    section = runner.sections(project)[0]
    meta = json.loads(runner.book_section_path(section, project).read_text())["metadata"]["fragile"]
    assert "fragile.run.runner" not in meta["code_modules"]  # chapters never import the runner
    nb = json.loads(section.path.read_text())
    nb["cells"].append(
        {
            "cell_type": "code",
            "id": "staleness-probe",
            "metadata": {},
            "execution_count": None,
            "outputs": [],
            "source": "from fragile.run import runner\n",
        }
    )
    section.path.write_text(json.dumps(nb))
    assert "fragile.run.runner (now imported)" in _code_problems(project)[section.name]


def test_the_runner_records_the_code_of_the_chapter_it_executes(tmp_path, monkeypatch):
    import papermill

    def copy_unexecuted(template, output, **kwargs):  # what papermill writes, minus executing the cells
        shutil.copyfile(template, output)

    monkeypatch.setattr(papermill, "execute_notebook", copy_unexecuted)
    section = runner.sections(ROOT)[0]
    out = runner.run_section(
        section.name,
        "smoke",
        {"scheduler": "in-process", "results_dir": str(tmp_path / "r")},
        output=tmp_path / "nb.ipynb",
        root=ROOT,
    ).path
    meta = json.loads(out.read_text())["metadata"]["fragile"]
    assert {k: meta[k] for k in ("code_digest", "code_modules")} == notebook_code(section.path, ROOT)
    assert f"fragile.chapters.{section.short}" in meta["code_modules"]
    assert code_problem(meta, section.path, ROOT) is None


def test_an_output_changed_missing_or_added_since_the_chapter_wrote_it_is_stale(project):
    shutil.copytree(ROOT / "results", project / "results")
    sections = runner.sections(project)
    for section in sections:  # record the outputs as the runner does after executing
        path = runner.book_section_path(section, project)
        nb = json.loads(path.read_text())
        meta = nb["metadata"]["fragile"]
        params = runner.resolve_parameters(section, meta["profile"], None, project)
        meta["outputs"] = runner.output_digests(section, meta["profile"], params, project)
        path.write_text(json.dumps(nb))

    def output_problems() -> list[str]:
        return [p for p in runner.stale_sections(project) if "results/" in p or "outputs" in p]

    assert output_problems() == []
    first = sections[0]
    summary = project / "results" / first.name / "default" / "summary.json"
    summary.write_text(summary.read_text().replace('"profile": "default"', '"profile": "smoke"', 1))
    assert output_problems() == [f"{first.name}: results/{first.name}/default/summary.json changed since the chapter wrote it"]
    summary.unlink()
    assert output_problems() == [f"{first.name}: results/{first.name}/default/summary.json is missing"]
    (project / "results" / first.name / "default" / "summary.json").write_text("{}")
    (project / "results" / first.name / "default" / "extra.png").write_bytes(b"png")
    assert f"{first.name}: results/{first.name}/default/extra.png was not written by the chapter's execution" in output_problems()
