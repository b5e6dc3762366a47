"""The book's claims: one of the paper's claims, its number, ours and the verdict of a stated rule.

Every chapter returns its claims as :class:`Claim` values; the chapter's table, the numbers glued for the book's
claims table (``<prefix>_claim_<key>_ours``, ``…_value`` and ``…_verdict``) and ``summary.json`` are all made
from them here, so every chapter reports a claim the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as a chapter tests it.

    Attributes:
        key: short identifier, unique within the chapter (part of the glue keys).
        claim: the claim in words, with what is measured.
        paper: the paper's number or description, as shown ("0.97", "qualitative").
        ours: our number as shown, with its spread where there is one ("0.91 ± 0.16").
        verdict: the rule's verdict; a verdict that could not be reached says why ("not run: …", "needs the real
            data set: …").
        value: our number as a float, for other pages and tests (NaN when there is none).
    """

    key: str
    claim: str
    paper: str
    ours: str
    verdict: str
    value: float = math.nan

    @classmethod
    def not_run(cls, key: str, claim: str, paper: str, verdict: str) -> Claim:
        """A claim this run could not test; ``verdict`` says why and what would test it."""
        return cls(key=key, claim=claim, paper=paper, ours="not run", verdict=verdict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def number(value: float, digits: int = 3, spread: float = math.nan) -> str:
    """``value`` (and ``± spread`` when finite) as shown in a claims table; "—" for NaN."""
    if not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if math.isfinite(spread) else "")


def claims_markdown(claims: Sequence[Claim]) -> str:
    """The chapter's claims table: claim, paper, ours, verdict (in bold)."""
    lines = ["| claim | paper | ours | verdict |", "|---|---|---|---|"]
    lines += [f"| {c.claim} | {c.paper} | {c.ours} | **{c.verdict}** |" for c in claims]
    return "\n".join(lines)


def glue_claims(prefix: str, claims: Sequence[Claim]) -> None:
    """Glue every claim's shown number, float value and verdict for the book's claims table, under
    ``<prefix>_claim_<key>_ours`` / ``_value`` / ``_verdict``."""
    from myst_nb import glue

    for c in claims:
        glue(f"{prefix}_claim_{c.key}_ours", c.ours, display=False)
        glue(f"{prefix}_claim_{c.key}_value", float(c.value), display=False)
        glue(f"{prefix}_claim_{c.key}_verdict", c.verdict, display=False)
