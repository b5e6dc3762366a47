"""The committed book renders from the result store: every chapter executed again at its committed profile takes
every job from the store (none computed, none from a cache) and gives the committed chapter's results, value for
value. This is what `make book` does on a fresh clone."""

import json
import math
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
    assert _numbers_close(summary["results"], committed["results"]), "the rendered results differ from the committed ones"
    assert summary["compute"] == committed["compute"]


def _numbers_close(a, b, rtol: float = 1e-9) -> bool:
    """Equal structure and text, numbers within ``rtol``: the stored jobs are the same bits, but what the chapter
    computes from them (means, correlations) may differ in the last bits on a CPU with other vector instructions."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_numbers_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_numbers_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rtol, abs_tol=1e-300)
    return a == b
