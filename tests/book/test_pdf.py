"""The PDF edition: Jupyter Book's LaTeX builder (XeLaTeX, offline) over the committed executed chapters, checked
with pypdf, which reads the PDF itself: its pages, every figure of the chapters, every claim of the front page's
table (none cut off at a page's foot), and no unresolved reference."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _flat(text: str) -> str:
    """Text without spaces, hyphens or curly quotes, so that LaTeX's line breaks and hyphenation do not matter."""
    return re.sub(r"[\s\-‐]", "", text.replace("’", "'"))


@pytest.fixture(scope="module")
def built_pdf(tmp_path_factory):
    if not shutil.which("xelatex") or not shutil.which("latexmk"):
        pytest.fail("XeLaTeX is not installed: `make test` installs Debian's texlive packages (make tex)")
    src = tmp_path_factory.mktemp("pdf") / "book"
    shutil.copytree(ROOT / "book", src, ignore=shutil.ignore_patterns("_build"))
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(src), "--builder", "pdflatex", "-W", "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"PDF build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    latex = src / "_build" / "latex"
    return latex / "fragile.pdf", (latex / "fragile.log").read_text(errors="replace")


def test_the_pdf_holds_every_page_figure_and_claim(built_pdf):
    from pypdf import PdfReader

    pdf, log = built_pdf
    reader = PdfReader(pdf)
    assert 40 <= len(reader.pages) <= 400, len(reader.pages)
    figures = sum(
        "image/png" in o.get("data", {})
        for nb in (ROOT / "book" / "sections").glob("*.ipynb")
        for c in json.loads(nb.read_text())["cells"]
        for o in c.get("outputs", [])
    )
    assert figures >= 20
    assert sum(len(p.images) for p in reader.pages) >= figures  # every figure of the chapters is in the PDF
    text = _flat(" ".join(p.extract_text() for p in reader.pages))
    rows = [line for line in (ROOT / "book" / "index.md").read_text().splitlines() if line.startswith("| ") and "{glue" in line]
    claims = [row.split("|")[1].strip() for row in rows]
    assert len(claims) >= 20
    missing = [c for c in claims if _flat(c) not in text]
    assert not missing, f"claims of the front page's table missing from the PDF: {missing}"
    assert "{glue" not in text and "??" not in text  # every glued number resolved, every reference too
    assert not re.findall(r"LaTeX Warning: (?:Reference|Citation) .* undefined", log)
