"""Verdicts by calibrated rules: every claim the book tests is decided from an interval over independent units.

A rule is fixed before the results are looked at. It takes one number per independent unit (a seed, a test point, a
model: whatever varies independently between repetitions of the experiment), computes an estimate and a 95 %
interval over those units, and returns a :class:`Decision`: the estimate, the interval, n, the :class:`Verdict`, the
rate at which the rule says *reproduced* under its null, and, when it cannot decide, the n that would.

The verdicts (``b`` a rule's boundary, CI its 95 % interval):

* **reproduced**: the whole CI lies on the side the paper claims (below 0.15; within the paper's value ± a
  tolerance; above the other arm; falling), *and* the exact test of the boundary under the rule's null rejects at
  2.5 % one-sided;
* **reversed**: the same on the opposite side of a direction claim (the other arm wins; rising);
* **not reproduced**: the same on the far side of a threshold or outside the paper's value ± its tolerance, or, for a
  direction claim with a tolerance, a CI inside ``(−tolerance, tolerance)``: no effect of the claimed size;
* **inconclusive**: anything else, in particular a CI that straddles a boundary. The decision says how many units
  would decide it at the present estimate and spread (:attr:`Decision.n_to_decide`).

The exact tests are what makes the rules' false-positive rates known at the small n of a chapter (five seeds): the
t interval alone says *reproduced* for 8 % of sign-exchanged paired differences at n = 5, the exact sign-flip test
never does below n = 6 (its smallest one-sided p-value is 2⁻ⁿ).

The intervals, and the exact test beside each:

* a mean over units (:class:`Threshold`, :class:`MatchesPaper`): Student's t over the units, on the Fisher z scale
  for correlations (``fisher=True``: the mean of ``atanh r``, returned as ``tanh``, which keeps the interval in
  (−1, 1)); test: the sign-flip (randomisation) test of the mean's residuals about the boundary;
* a paired difference (:class:`PairedDifference`): the t interval of the per-unit differences; test: sign flips of
  the differences (the two arms exchanged within units);
* a trend (:class:`Trend`): Spearman's ρ between the units' covariate (depth, width, λmax) and their values, with a
  percentile bootstrap interval over units; test: the permutation test of ρ;
* heterogeneity of correlations across cells (:class:`Heterogeneity`; the claim that they vary, or that they hardly
  do): τ, the standard deviation of the cells' true Fisher z beyond their sampling noise (DerSimonian–Laird), with
  the Q-profile interval (Viechtbauer 2007), the variance of a Spearman correlation's z over m points taken as
  ``1.06/(m − 3)`` (Fieller, Hartley & Pearson 1957).

Null calibration (:meth:`Rule.calibrated`, :meth:`Rule.null_rate`): the rule is run on ``null_draws`` data sets
simulated from the chapter's own units at the least favourable point of its null, and the share of *reproduced*
verdicts is shown beside the verdict:

* thresholds and the paper's value: the units' residuals about their mean, each with a random sign, added to the
  boundary (on the rule's scale; for the paper's value each edge of the band inside the scale's range, the larger
  rate reported);
* paired differences: each unit's two arms exchanged at random (a random sign on each difference);
* trends: the covariate permuted across units;
* heterogeneity: every cell's z drawn around the cells' common weighted mean with its own sampling variance (and,
  for a claim of low variance, a true spread of exactly the rule's ``min_tau``).

Cost: every rule works on arrays of at most a few hundred numbers. A sign-flip test enumerates the 2ⁿ signs up to
n = 12 and draws 4,000 otherwise; a trend's bootstrap is ``bootstrap`` Spearman correlations of n pairs and its
permutation test 2,000 (all n! up to n = 7); a null rate repeats a decision ``null_draws`` times.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import ClassVar

import numpy as np
from scipy import stats
from scipy.optimize import brentq

from fragile.errors import InvalidArgumentError, check_choice, check_int, check_positive

LEVEL = 0.95
"""Every interval's coverage: two-sided 95 %."""

ALPHA = (1 - LEVEL) / 2
"""The one-sided level of every exact test: 2.5 %."""

SPEARMAN_Z_VARIANCE = 1.06
"""The variance of Fisher's z of a Spearman correlation over m points is about ``1.06/(m − 3)`` (Fieller et al.)."""

EXACT_SIGNS = 12
"""Up to this many units a sign-flip test enumerates every sign pattern; above it draws :data:`DRAWN_SIGNS`."""
DRAWN_SIGNS = 4000
EXACT_PERMUTATIONS = 7
"""Up to this many units a permutation test enumerates every permutation; above it draws :data:`DRAWN_PERMUTATIONS`."""
DRAWN_PERMUTATIONS = 2000

_CLIP = 1 - 1e-6  # a correlation of exactly ±1 (a perfect fit) is infinite on the z scale


def plural(n: int, thing: str) -> str:
    """``3 models``, ``1 network``: a count and its noun, for the sentences rules and chapters write."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


class Verdict(StrEnum):
    """What the book concludes about one claim of the paper."""

    REPRODUCED = "reproduced"
    NOT_REPRODUCED = "not reproduced"
    REVERSED = "reversed"
    INCONCLUSIVE = "inconclusive"
    NEEDS_REAL_DATA = "needs the real data set"
    NEEDS_GPU = "needs a GPU"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class Decision:
    """One rule applied to one claim's units.

    Attributes:
        estimate: the rule's statistic (a mean, a difference, a trend's ρ, a heterogeneity τ).
        low, high: its 95 % interval (NaN when n is too small for one).
        n: the number of independent units.
        unit: what a unit is ("seed", "test point", "model", "cell").
        verdict: the rule's :class:`Verdict`.
        rule: the rule in words, as the chapter states it.
        p_value: the exact test's one-sided p-value on the side the interval points to (NaN when it straddles).
        null_rate: the share of *reproduced* verdicts under the rule's null, simulated from these units (NaN unless
            asked for with :meth:`Rule.calibrated`).
        null_draws: how many null data sets that share is over.
        n_to_decide: for an inconclusive verdict, the number of units at which the interval would clear the nearest
            boundary (and the exact test could reject) if the estimate and the spread stayed as they are; None when
            decided, or when no n would (the estimate sits on a boundary).
        statistic: what the estimate is, where it is not the units' mean (``ρ``, ``τ``), shown before it; else "".
    """

    estimate: float
    low: float
    high: float
    n: int
    unit: str
    verdict: Verdict
    rule: str
    p_value: float = math.nan
    null_rate: float = math.nan
    null_draws: int = 0
    n_to_decide: int | None = None
    statistic: str = ""

    def interval_text(self, digits: int = 2) -> str:
        """``0.91 [0.62, 0.99], n = 5 seeds``: the estimate, its interval and n, as every claim row shows them."""
        if not math.isfinite(self.estimate):
            return "—"
        ci = f" [{self.low:.{digits}f}, {self.high:.{digits}f}]" if math.isfinite(self.low) else " [no interval]"
        name = f"{self.statistic} = " if self.statistic else ""
        return f"{name}{self.estimate:.{digits}f}{ci}, n = {plural(self.n, self.unit)}"


@dataclass(frozen=True)
class _Assessment:
    estimate: float
    low: float
    high: float
    verdict: Verdict
    p_value: float
    n_to_decide: int | None


# -- the statistics ------------------------------------------------------------------------------------------------------
def _finite(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(arr).all():
        raise InvalidArgumentError(f"{name} must be finite: leave out (and count) the units that did not run")
    return arr


def _pair(rule: str, units: tuple[object, ...], names: tuple[str, str], minimum: int) -> tuple[np.ndarray, np.ndarray]:
    """The two per-unit arrays a rule takes, finite, of one length and at least ``minimum`` long."""
    if len(units) != 2:
        raise InvalidArgumentError(f"{rule}.decide takes two arrays, {names[0]} and {names[1]}, one value per unit each")
    a, b = _finite(names[0], units[0]), _finite(names[1], units[1])
    if a.size != b.size or a.size < minimum:
        raise InvalidArgumentError(
            f"{names[0]} and {names[1]} must pair up, at least {minimum} units; got {a.size} and {b.size} values"
        )
    return a, b


def mean_interval(values: object, *, fisher: bool = False) -> tuple[float, float, float]:
    """The mean of ``values`` and its 95 % Student-t interval (on Fisher's z with ``fisher``, returned as
    correlations): the interval every mean-over-units rule decides on, for tables that show one without a claim."""
    z = _to_z(_finite("values", values), fisher)
    if z.size == 0:
        return math.nan, math.nan, math.nan
    mean, low, high = _t_interval(z)
    return _from_z(mean, fisher), _from_z(low, fisher), _from_z(high, fisher)


def _t_interval(values: np.ndarray) -> tuple[float, float, float]:
    n = values.size
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(1 - ALPHA, n - 1)) * float(values.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def _sign_patterns(n: int, seed: int) -> np.ndarray:
    if n <= EXACT_SIGNS:
        return np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(DRAWN_SIGNS, n))
    signs[0] = 1.0  # the observed data are one of the patterns: p is never below 1/patterns
    return signs


def sign_flip_p(residuals: np.ndarray, side: int, seed: int = 0) -> float:
    """One-sided p-value that the mean of ``residuals`` is above 0 (``side`` +1) or below it (−1), under the null
    that each residual's sign is exchangeable (symmetric about 0): the share of sign patterns whose sum is at least
    as far on ``side`` as the observed one. Exact (all 2ⁿ patterns) up to :data:`EXACT_SIGNS` units."""
    r = np.asarray(residuals, dtype=float)
    sums = _sign_patterns(r.size, seed) @ r
    observed = r.sum()
    tol = 1e-12 * max(1.0, float(np.abs(r).sum()))
    return float(np.mean(side * sums >= side * observed - tol))


def _permutations(n: int, seed: int) -> np.ndarray:
    if n <= EXACT_PERMUTATIONS:
        return np.array(list(itertools.permutations(range(n))))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((DRAWN_PERMUTATIONS, n)), axis=1)
    perms[0] = np.arange(n)
    return perms


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row pair (ties share their mean rank); NaN where a row does not vary."""
    rx, ry = stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def permutation_p(x: np.ndarray, y: np.ndarray, side: int, seed: int = 0) -> float:
    """One-sided p-value that Spearman's ρ of (x, y) is above 0 (``side`` +1) or below it (−1), under the null that x
    is exchangeable across units. Exact (all n! permutations) up to :data:`EXACT_PERMUTATIONS` units."""
    rho = _spearman_rows(x[None], y[None])[0]
    perms = _spearman_rows(x[_permutations(x.size, seed)], np.broadcast_to(y, (1, y.size)))
    return float(np.mean(side * np.nan_to_num(perms, nan=0.0) >= side * rho - 1e-12))


def _units_needed(n: int, half_width: float, distance: float, minimum: int) -> int | None:
    """The n at which an interval of ``half_width`` at ``n`` units, shrinking like 1/√n, is narrower than
    ``distance``, and at least ``minimum`` (the fewest units whose exact test can reject)."""
    if n < 2 or not math.isfinite(half_width) or distance <= 0:
        return None
    return max(math.ceil(n * (half_width / distance) ** 2), minimum, n + 1)


MIN_SIGN_UNITS = 6
"""The fewest units whose sign-flip test can reject at 2.5 %: 2⁻⁶ < 0.025 < 2⁻⁵."""
MIN_TREND_UNITS = 5
"""The fewest units whose permutation test can reject at 2.5 %: 1/5! < 0.025 < 1/4!."""


def _side(low: float, high: float, boundary: float) -> int:
    """+1 when the interval lies above ``boundary``, −1 below, 0 when it straddles it (or is undefined)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return 0
    return 1 if low > boundary else (-1 if high < boundary else 0)


# -- the rules -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A verdict rule fixed before the results: :meth:`decide` on the units, :meth:`null_rate` under its null.

    A subclass states itself (:meth:`statement`), checks and prepares its units (:meth:`_check`), assesses prepared
    units (:meth:`_assess`) and simulates its null from them (:meth:`_null_samples`).
    """

    unit: str = field(default="seed", kw_only=True)
    null_draws: int = field(default=400, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    STATISTIC: ClassVar[str] = ""
    """What the estimate is where it is not a mean over the units (:attr:`Decision.statistic`)."""

    def __post_init__(self) -> None:
        check_int("null_draws", self.null_draws, minimum=1)
        check_int("seed", self.seed, minimum=0)

    def statement(self) -> str:
        raise NotImplementedError

    def decide(self, *units: object) -> Decision:
        """The verdict on these units (see the subclass for what they are), with its interval and n."""
        return self._decision(self._check(*units))

    def calibrated(self, *units: object) -> Decision:
        """:meth:`decide` with :attr:`Decision.null_rate` filled in from ``null_draws`` simulated null data sets."""
        data = self._check(*units)
        return replace(self._decision(data), null_rate=self._null_rate(data), null_draws=self.null_draws)

    def null_rate(self, *units: object) -> float:
        """The share of *reproduced* verdicts over ``null_draws`` data sets simulated under the rule's null."""
        return self._null_rate(self._check(*units))

    def _check(self, *units: object) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def _assess(self, data: tuple[np.ndarray, ...]) -> _Assessment:
        raise NotImplementedError

    def _null_samples(self, data: tuple[np.ndarray, ...], rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
        """One simulated data set per least-favourable null point (a rule with two boundaries has two)."""
        raise NotImplementedError

    def _decision(self, data: tuple[np.ndarray, ...]) -> Decision:
        a = self._assess(data)
        return Decision(
            estimate=a.estimate,
            low=a.low,
            high=a.high,
            n=int(data[0].size),
            unit=self.unit,
            verdict=a.verdict,
            rule=self.statement(),
            p_value=a.p_value,
            n_to_decide=a.n_to_decide if a.verdict is Verdict.INCONCLUSIVE else None,
            statistic=self.STATISTIC,
        )

    def _null_rate(self, data: tuple[np.ndarray, ...]) -> float:
        rng = np.random.default_rng(self.seed)
        hits: list[int] | None = None
        for _ in range(self.null_draws):
            samples = self._null_samples(data, rng)
            got = [self._assess(s).verdict is Verdict.REPRODUCED for s in samples]
            hits = got if hits is None else [h + g for h, g in zip(hits, got)]
        return max(hits or [0]) / self.null_draws


def _to_z(values: np.ndarray, fisher: bool) -> np.ndarray:
    return np.arctanh(np.clip(values, -_CLIP, _CLIP)) if fisher else values


def _from_z(value: float, fisher: bool) -> float:
    return float(np.tanh(value)) if fisher and math.isfinite(value) else float(value)


@dataclass(frozen=True)
class _MeanRule(Rule):
    """A claim about the mean of one number per unit: the t interval (on Fisher's z with ``fisher``), the sign-flip
    test of the residuals about each boundary."""

    fisher: bool = field(default=False, kw_only=True)

    def _check(self, *units: object) -> tuple[np.ndarray, ...]:
        if len(units) != 1:
            raise InvalidArgumentError(f"{type(self).__name__}.decide takes one array: each unit's value")
        values = _finite("values", units[0])
        if values.size == 0:
            raise InvalidArgumentError("values is empty: a rule needs at least one unit")
        if self.fisher and (np.abs(values) > 1).any():
            raise InvalidArgumentError("values must be correlations in [-1, 1] when fisher=True")
        return (_to_z(values, self.fisher),)

    def _boundaries_z(self) -> tuple[float, ...]:
        """The boundaries on the rule's scale that lie inside it (a band's edge beyond ±1 is no boundary)."""
        raise NotImplementedError

    def _interval(self, z: np.ndarray) -> tuple[float, float, float, int | None]:
        mean, low, high = _t_interval(z)
        distance = min(abs(mean - b) for b in self._boundaries_z())
        needed = _units_needed(z.size, (high - low) / 2, distance, MIN_SIGN_UNITS)
        return mean, low, high, needed

    def _beyond(self, z: np.ndarray, low: float, high: float, boundary: float, side: int) -> tuple[bool, float]:
        """Whether the interval lies wholly on ``side`` of ``boundary`` and the sign-flip test agrees, and its p."""
        if _side(low, high, boundary) != side:
            return False, math.nan
        p = sign_flip_p(z - boundary, side, self.seed)
        return p <= ALPHA, p

    def _null_samples(self, data, rng):
        z = data[0]
        signs = rng.choice((-1.0, 1.0), size=z.size)
        return [(b + signs * (z - z.mean()),) for b in self._boundaries_z()]


@dataclass(frozen=True)
class Threshold(_MeanRule):
    """The paper claims the mean lies ``side`` ("below" or "above") ``threshold``: *reproduced* when the interval
    lies wholly there and the sign-flip test agrees, *not reproduced* when both put it on the other side, else
    *inconclusive*.

    Units: one array, each unit's value (e.g. each test point's Spearman). Null: the units' residuals about their
    mean, randomly signed, about the threshold."""

    threshold: float = 0.0
    side: str = "below"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("side", self.side, ("below", "above"))
        if not math.isfinite(self.threshold) or (self.fisher and abs(self.threshold) >= 1):
            raise InvalidArgumentError(f"threshold={self.threshold!r} must be finite (inside (-1, 1) with fisher=True)")

    def statement(self) -> str:
        return (
            f"reproduced when the 95 % interval of the mean over {self.unit}s lies wholly {self.side} "
            f"{self.threshold:g} (and the exact sign-flip test agrees at 2.5 %), not reproduced when both put it on "
            "the other side, inconclusive otherwise"
        )

    def _boundaries_z(self) -> tuple[float, ...]:
        return (float(_to_z(np.array([self.threshold]), self.fisher)[0]),)

    def _assess(self, data):
        z = data[0]
        mean, low, high, needed = self._interval(z)
        (b,) = self._boundaries_z()
        claimed = -1 if self.side == "below" else 1
        yes, p_yes = self._beyond(z, low, high, b, claimed)
        no, p_no = self._beyond(z, low, high, b, -claimed)
        verdict = Verdict.REPRODUCED if yes else (Verdict.NOT_REPRODUCED if no else Verdict.INCONCLUSIVE)
        p = p_yes if math.isfinite(p_yes) else p_no
        return _Assessment(_from_z(mean, self.fisher), _from_z(low, self.fisher), _from_z(high, self.fisher), verdict, p, needed)


@dataclass(frozen=True)
class MatchesPaper(_MeanRule):
    """The paper reports ``paper`` for this mean: *reproduced* when the interval lies wholly within ``paper ±
    tolerance`` and the sign-flip tests at both edges agree (an equivalence test), *not reproduced* when the interval
    lies wholly outside the band and the test at that edge agrees, else *inconclusive*. An edge beyond the scale's
    range (a correlation's band past 1) is no boundary.

    Units: one array, each unit's value. Null: the units' residuals about their mean, randomly signed, about each
    edge inside the range; the larger rate is reported."""

    paper: float = 0.0
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("tolerance", self.tolerance)
        if self.fisher and abs(self.paper) > 1:
            raise InvalidArgumentError(f"paper={self.paper!r} must be a correlation in [-1, 1] with fisher=True")
        if not self._boundaries_z():
            raise InvalidArgumentError(
                f"tolerance={self.tolerance!r} is not allowed here: the band paper ± tolerance covers every correlation, "
                "so nothing could be decided; it must leave at least one edge inside (-1, 1)"
            )

    def statement(self) -> str:
        return (
            f"reproduced when the 95 % interval of the mean over {self.unit}s lies within the paper's {self.paper:g} ± "
            f"{self.tolerance:g} (and the exact sign-flip tests at its edges agree at 2.5 %), not reproduced when it "
            "lies wholly outside that band, inconclusive otherwise"
        )

    def _edges(self) -> tuple[float | None, float | None]:
        lo, hi = self.paper - self.tolerance, self.paper + self.tolerance
        if self.fisher:
            return (float(np.arctanh(lo)) if lo > -1 else None, float(np.arctanh(hi)) if hi < 1 else None)
        return lo, hi

    def _boundaries_z(self) -> tuple[float, ...]:
        return tuple(e for e in self._edges() if e is not None)

    def _assess(self, data):
        z = data[0]
        mean, low, high, needed = self._interval(z)
        lo, hi = self._edges()
        above_lo, p_lo = (True, 0.0) if lo is None else self._beyond(z, low, high, lo, 1)
        below_hi, p_hi = (True, 0.0) if hi is None else self._beyond(z, low, high, hi, -1)
        under, p_under = (False, math.nan) if lo is None else self._beyond(z, low, high, lo, -1)
        over, p_over = (False, math.nan) if hi is None else self._beyond(z, low, high, hi, 1)
        if above_lo and below_hi and math.isfinite(low):
            verdict, p = Verdict.REPRODUCED, max(p_lo, p_hi)
        elif under or over:
            verdict, p = Verdict.NOT_REPRODUCED, p_under if under else p_over
        else:
            verdict, p = Verdict.INCONCLUSIVE, math.nan
        return _Assessment(_from_z(mean, self.fisher), _from_z(low, self.fisher), _from_z(high, self.fisher), verdict, p, needed)


DIRECTIONS = {"positive": 1, "negative": -1}


def _direction_statement(what: str, direction: str, tolerance: float, test: str) -> str:
    side = "above" if direction == "positive" else "below"
    text = (
        f"reproduced when the 95 % interval of {what} lies wholly {side} 0 (and the exact {test} agrees at 2.5 %), "
        "reversed when both put it on the other side"
    )
    if tolerance > 0:
        text += f", not reproduced when the interval lies within ±{tolerance:g}"
    return text + ", inconclusive otherwise"


def _direction_verdict(
    low: float, high: float, direction: int, tolerance: float, test: Callable[[int], float]
) -> tuple[Verdict, float]:
    side = _side(low, high, 0.0)
    if side != 0:
        p = test(side)
        if p <= ALPHA:
            return (Verdict.REPRODUCED if side == direction else Verdict.REVERSED), p
        return Verdict.INCONCLUSIVE, p
    if tolerance > 0 and math.isfinite(low) and -tolerance < low and high < tolerance:
        return Verdict.NOT_REPRODUCED, math.nan
    return Verdict.INCONCLUSIVE, math.nan


@dataclass(frozen=True)
class PairedDifference(Rule):
    """The paper claims arm A beats arm B (``direction`` "positive": A − B > 0) on the same units (the same seeds
    with and without weight decay): the t interval of the per-unit differences and their sign-flip test.
    *Reproduced* when both put the difference on the claimed side of 0, *reversed* when both put it on the other,
    *not reproduced* when the interval lies inside ``(−tolerance, tolerance)`` (no difference of the claimed size; 0
    turns this off), else *inconclusive*.

    Units: two arrays, A and B, one number per unit each, paired by position. Null: the arms exchanged at random
    within each unit (a random sign on each difference)."""

    direction: str = "positive"
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("direction", self.direction, tuple(DIRECTIONS))
        check_positive("tolerance", self.tolerance, allow_zero=True)

    def statement(self) -> str:
        return _direction_statement(f"the paired difference over {self.unit}s", self.direction, self.tolerance, "sign-flip test")

    def _check(self, *units: object) -> tuple[np.ndarray, ...]:
        a, b = _pair("PairedDifference", units, ("a", "b"), 1)
        return (a - b,)

    def _assess(self, data):
        diff = data[0]
        mean, low, high = _t_interval(diff)
        verdict, p = _direction_verdict(
            low, high, DIRECTIONS[self.direction], self.tolerance, lambda side: sign_flip_p(diff, side, self.seed)
        )
        distance = abs(mean) if self.tolerance == 0 else max(abs(mean), self.tolerance - abs(mean))
        return _Assessment(mean, low, high, verdict, p, _units_needed(diff.size, (high - low) / 2, distance, MIN_SIGN_UNITS))

    def _null_samples(self, data, rng):
        return [(data[0] * rng.choice((-1.0, 1.0), size=data[0].size),)]


@dataclass(frozen=True)
class Trend(Rule):
    """The paper claims the value falls (``direction`` "negative") or rises with a covariate (depth, width, λmax):
    Spearman's ρ between the units' covariate and their values, a percentile bootstrap interval over units
    (``bootstrap`` resamples of the (covariate, value) pairs; those whose covariate does not vary are skipped) and
    the permutation test. Verdicts as :class:`PairedDifference`, with ρ for the difference.

    Units: two arrays, covariate and value, one pair per unit (each seed at each depth is a unit). Null: the
    covariate permuted across units."""

    direction: str = "negative"
    tolerance: float = 0.0
    bootstrap: int = field(default=2000, kw_only=True)
    STATISTIC: ClassVar[str] = "ρ"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("direction", self.direction, tuple(DIRECTIONS))
        check_positive("tolerance", self.tolerance, allow_zero=True)
        check_int("bootstrap", self.bootstrap, minimum=100)

    def statement(self) -> str:
        return _direction_statement(
            f"Spearman's ρ between covariate and value over {self.unit}s (bootstrap)",
            self.direction,
            self.tolerance,
            "permutation test",
        )

    def _check(self, *units: object) -> tuple[np.ndarray, ...]:
        x, y = _pair("Trend", units, ("covariate", "values"), 3)
        return x, y

    def _assess(self, data):
        x, y = data
        rho = float(_spearman_rows(x[None], y[None])[0])
        idx = np.random.default_rng(self.seed + 1).integers(0, x.size, size=(self.bootstrap, x.size))
        boot = _spearman_rows(x[idx], y[idx])
        boot = boot[np.isfinite(boot)]
        if not math.isfinite(rho) or boot.size < self.bootstrap // 2:
            return _Assessment(rho, math.nan, math.nan, Verdict.INCONCLUSIVE, math.nan, None)
        low, high = (float(q) for q in np.quantile(boot, [ALPHA, 1 - ALPHA]))
        verdict, p = _direction_verdict(
            low, high, DIRECTIONS[self.direction], self.tolerance, lambda side: permutation_p(x, y, side, self.seed)
        )
        distance = abs(rho) if self.tolerance == 0 else max(abs(rho), self.tolerance - abs(rho))
        return _Assessment(rho, low, high, verdict, p, _units_needed(x.size, (high - low) / 2, distance, MIN_TREND_UNITS))

    def _null_samples(self, data, rng):
        x, y = data
        return [(rng.permutation(x), y)]


@dataclass(frozen=True)
class Heterogeneity(Rule):
    """The paper claims correlations vary across cells (test points, architectures) by more than their sampling
    noise (``side`` "above") or that they hardly vary (``side`` "below": low variance across seeds): τ, the standard
    deviation of the cells' true Fisher z beyond noise (DerSimonian–Laird), with the Q-profile interval. *Reproduced*
    when the interval lies wholly on ``side`` of ``min_tau``, *not reproduced* when it lies wholly on the other,
    else *inconclusive*. The Q-profile interval is exact under the model, so no second test is needed.

    Units: two arrays, each cell's Spearman correlation and the number of points it is over (more than 3). Null, at
    its least favourable point: for "above", every cell's z drawn around the cells' common weighted mean with its own
    sampling variance ``1.06/(m − 3)`` (τ = 0); for "below", the same plus a true spread of exactly ``min_tau``."""

    min_tau: float = 0.1
    STATISTIC: ClassVar[str] = "τ"
    side: str = "above"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("min_tau", self.min_tau)
        check_choice("side", self.side, ("above", "below"))

    def statement(self) -> str:
        other = "below" if self.side == "above" else "above"
        return (
            f"reproduced when the 95 % interval of τ, the spread of the {self.unit}s' true Fisher z beyond their "
            f"sampling noise, lies wholly {self.side} {self.min_tau:g}; not reproduced when it lies wholly {other}; "
            "inconclusive otherwise"
        )

    def _check(self, *units: object) -> tuple[np.ndarray, ...]:
        r, m = _pair("Heterogeneity", units, ("correlations", "points"), 2)
        if (m <= 3).any() or (np.abs(r) > 1).any():
            raise InvalidArgumentError("every cell needs more than 3 points and a correlation in [-1, 1]")
        return np.arctanh(np.clip(r, -_CLIP, _CLIP)), SPEARMAN_Z_VARIANCE / (m - 3)

    @staticmethod
    def _q(z: np.ndarray, var: np.ndarray, tau2: float) -> float:
        w = 1.0 / (var + tau2)
        mean = (w * z).sum() / w.sum()
        return float((w * (z - mean) ** 2).sum())

    def _tau_at(self, z: np.ndarray, var: np.ndarray, target: float) -> float:
        """The τ at which the generalised Q equals ``target`` (Q falls as τ grows); 0 when Q is below it at τ = 0."""
        if self._q(z, var, 0.0) <= target:
            return 0.0
        upper = 1.0
        while self._q(z, var, upper) > target:
            upper *= 4
        return math.sqrt(brentq(lambda t2: self._q(z, var, t2) - target, 0.0, upper))

    def _assess(self, data):
        z, var = data
        k = z.size
        w = 1.0 / var
        c = w.sum() - (w * w).sum() / w.sum()
        tau = math.sqrt(max(0.0, (self._q(z, var, 0.0) - (k - 1)) / c))
        low = self._tau_at(z, var, float(stats.chi2.ppf(1 - ALPHA, k - 1)))
        high = self._tau_at(z, var, float(stats.chi2.ppf(ALPHA, k - 1)))
        side = _side(low, high, self.min_tau) * (1 if self.side == "above" else -1)
        verdict = {1: Verdict.REPRODUCED, -1: Verdict.NOT_REPRODUCED}.get(side, Verdict.INCONCLUSIVE)
        needed = _units_needed(k, (high - low) / 2, abs(tau - self.min_tau), 2)
        return _Assessment(tau, low, high, verdict, math.nan, needed)

    def _null_samples(self, data, rng):
        z, var = data
        w = 1.0 / var
        mean = (w * z).sum() / w.sum()
        spread = np.sqrt(var + (self.min_tau**2 if self.side == "below" else 0.0))
        return [(mean + rng.standard_normal(z.size) * spread, var)]


__all__ = [
    "ALPHA",
    "LEVEL",
    "Decision",
    "Heterogeneity",
    "MatchesPaper",
    "PairedDifference",
    "Rule",
    "Threshold",
    "Trend",
    "Verdict",
    "mean_interval",
    "permutation_p",
    "sign_flip_p",
]
