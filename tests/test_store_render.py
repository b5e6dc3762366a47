"""The committed book renders from the result store: every chapter executed again at its committed profile takes
every job from the store (none computed, none from a cache) and gives the committed chapter's results, value for
value. This is what `make book` does on a fresh clone."""

import json
from pathlib import Path

import pytest

from fragile.run import runner

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = runner.sections(ROOT)


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.name)
def test_a_chapter_renders_from_the_store_with_the_committed_numbers(section, tmp_path):
    committed_nb = json.loads((ROOT / "book" / "sections" / f"{section.name}.ipynb").read_text())
    profile = committed_nb["metadata"]["fragile"]["profile"]
    overrides = {"results_dir": str(tmp_path / "results"), "use_cache": False, "scheduler": "in-process"}
    runner.run_section(section.name, profile, overrides, output=tmp_path / "nb.ipynb", root=ROOT)
    summary = json.loads((tmp_path / "results" / section.name / profile / "summary.json").read_text())
    committed = json.loads((ROOT / "results" / section.name / profile / "summary.json").read_text())
    assert summary["sweeps"] and all(s["done"] == 0 and s["cached"] == 0 and not s["failed"] for s in summary["sweeps"]), (
        f"jobs not in the store were computed: {summary['sweeps']}"
    )
    assert summary["compute"]["stored"] == summary["compute"]["jobs"] > 0
    assert summary["results"] == committed["results"]
    assert summary["compute"] == committed["compute"]
