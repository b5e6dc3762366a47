"""What the code and the docs cite is in the repository: every `docs/<page>.md#anchor` exists, and nothing points
to notes outside it (a design document, a reproduction brief, an issue number). Reads files only."""

import functools
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Citations of things a reader of the repository cannot open.
OUTSIDE = re.compile(r"design\.md|paper-brief|\.\./shared/|\b[Ii]ssue [0-9]+")
CITATION = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")


@functools.cache
def _texts() -> dict[str, str]:
    """Every file that may cite: the package, the notebook templates (their cells), tests, benchmarks, the book's
    own pages and profiles, the docs and the top-level files. The executed chapters in book/sections/ are copies of
    the templates (tests/test_notebooks.py checks that they are current)."""
    paths = [
        *ROOT.glob("fragile/**/*.py"),
        *ROOT.glob("tests/**/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        *ROOT.glob("book/*.md"),
        *ROOT.glob("book/*.yml"),
        *ROOT.glob("book/params/*.yml"),
        *DOCS.glob("*.md"),
        *(
            ROOT / name
            for name in (
                "README.md",
                "Makefile",
                "pyproject.toml",
                "environment.yml",
                "postBuild",
                "constraints.txt",
                "CITATION.cff",
                ".ci/run",
            )
        ),
    ]
    out = {str(p.relative_to(ROOT)): p.read_text() for p in paths if p.is_file() and p != Path(__file__).resolve()}
    for p in ROOT.glob("notebooks/*.ipynb"):
        cells = json.loads(p.read_text())["cells"]
        out[str(p.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells)
    return out


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub and MyST give the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", page.read_text(), flags=re.M)
    return {re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", h.strip().lower())) for h in headings}


def test_the_docs_pages_exist_with_their_sections():
    assert _anchors(DOCS / "protocol.md") >= {
        "sources",
        "definitions",
        "iris",
        "small-mnist",
        "table-1",
        "cifar-100",
        "imagenet",
        "appendix",
        "estimands",
    }
    assert _anchors(DOCS / "conventions.md") >= {
        "sign",
        "ground-truth",
        "selection",
        "statistics",
        "convergence",
        "hessian",
        "lissa",
        "stack",
        "pitfalls",
    }


def test_every_cited_docs_anchor_exists():
    broken = []
    for path, text in _texts().items():
        for page, anchor in CITATION.findall(text):
            target = DOCS / page
            if not target.is_file() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{path}: docs/{page}" + (f"#{anchor}" if anchor else ""))
    assert not broken, f"citations of docs that do not exist: {broken}"


@pytest.mark.parametrize("path", sorted(_texts()))
def test_nothing_cites_notes_outside_the_repository(path):
    text = _texts()[path]
    hits = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not hits, f"cite docs/protocol.md or docs/conventions.md instead: {hits}"


def test_the_provenance_page_lists_every_chapter_with_glued_numbers():
    from fragile.chapters.registry import CHAPTERS

    page = (ROOT / "book" / "provenance.md").read_text()
    for ch in CHAPTERS.values():
        for field in ("profile", "commit", "duration_s"):
            assert f"sections/{ch.notebook}.ipynb::{ch.glue_prefix}_{field}" in page, (ch.name, field)
        # the chapter glues what the page shows: chapter.glue_provenance glues exactly these three (test_provenance)
        template = (ROOT / "notebooks" / f"{ch.notebook}.ipynb").read_text()
        assert "chapter.glue_provenance(CH.glue_prefix, summary)" in template, ch.name


def _committed_claims():
    """Every chapter with claims, and the claims its committed default-profile execution recorded."""
    from fragile.chapters.registry import CHAPTERS

    for ch in CHAPTERS.values():
        path = ROOT / "results" / ch.notebook / "default" / "summary.json"
        results = json.loads(path.read_text())["results"]
        yield ch, results.get("claims", [])


def test_the_front_page_shows_every_claim_of_every_chapter_from_its_execution():
    """Each claim a chapter decides has one front-page row whose paper, ours (estimate, interval, n), data label and
    verdict, and the chapter's profile, are glued from that chapter's execution; no column of a row has a typed
    number."""
    rows = [line for line in (ROOT / "book" / "index.md").read_text().splitlines() if line.startswith("| ") and "{glue" in line]
    for ch, claims in _committed_claims():
        for c in claims:
            ref = f"sections/{ch.notebook}.ipynb::{ch.glue_prefix}_claim_{c['key']}_"
            found = [r for r in rows if f"{ref}verdict" in r]
            assert len(found) == 1, (ch.name, c["key"])
            for field in ("paper", "ours", "data", "verdict"):
                assert f"{ref}{field}" in found[0], (ch.name, c["key"], field)
            assert f"sections/{ch.notebook}.ipynb::{ch.glue_prefix}_profile" in found[0], (ch.name, c["key"])
    for row in rows:
        for cell in row.strip().strip("|").split("|")[2:]:  # the claim's words and its section link may hold digits
            typed = re.sub(r"\{glue:text\}`[^`]*`", "", cell)
            assert not re.search(r"\d", typed), (row, cell)


def test_every_rule_applied_was_calibrated_and_its_null_rate_is_at_most_five_percent():
    """Each committed claim's rule, on the converged models' units or (beside or instead) on every model's, shows a
    null rate over at least 200 simulated data sets, at most 5 %."""
    applied = 0
    for ch, claims in _committed_claims():
        for c in claims:
            for d in (c.get("decision"), c.get("all_models")):
                if d is None:
                    continue
                applied += 1
                assert d["null_draws"] >= 200, (ch.name, c["key"])
                assert d["null_rate"] <= 0.05, (ch.name, c["key"], d["null_rate"])
    assert applied >= 20
