"""Agreement between predicted and actual loss changes: selections, correlations, bootstrap, seeds.

The paper computes correlations over a selected subset of training points for one test point at a
time (paper-brief §2): the top-k by |predicted influence|, or a band of k points around a quantile.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from fragile.errors import InvalidArgumentError, check_choice, check_int, check_positive

STATISTICS = ("spearman", "pearson", "kendall")
SELECTION_RULES = ("all", "top_k", "quantile_band")
SELECTION_SCORES = ("abs", "signed")


def _as_1d(name: str, values) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidArgumentError(f"{name} is empty")
    return arr.astype(float)


def _score(predicted: np.ndarray, by: str) -> np.ndarray:
    check_choice("by", by, SELECTION_SCORES)
    return np.abs(predicted) if by == "abs" else predicted


def select_top_k(predicted, k: int, *, by: str = "abs") -> np.ndarray:
    """Indices (into ``predicted``) of the k largest scores, largest first; ties keep index order."""
    pred = _as_1d("predicted", predicted)
    check_int("k", k, minimum=1, maximum=pred.size)
    score = _score(pred, by)
    return np.argsort(-score, kind="stable")[:k]


def select_quantile_band(predicted, quantile: float, k: int, *, by: str = "abs") -> np.ndarray:
    """Indices of the k points whose score ranks closest to the ``quantile`` of all scores.

    Points are sorted by score ascending; the band is k consecutive ranks centred on rank
    ``round(quantile·(n−1))``, shifted inwards at the ends. "100 points around the 30th percentile"
    is ``quantile=0.3, k=100``.
    """
    pred = _as_1d("predicted", predicted)
    check_int("k", k, minimum=1, maximum=pred.size)
    if not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
        raise InvalidArgumentError(f"quantile={quantile!r} is not allowed; it must be in [0, 1]")
    order = np.argsort(_score(pred, by), kind="stable")
    centre = int(round(quantile * (pred.size - 1)))
    start = min(max(centre - k // 2, 0), pred.size - k)
    return order[start : start + k]


def choose_test_points(test_losses: np.ndarray, n_points: int) -> np.ndarray:
    """Test indices at evenly spaced ranks of the test loss, from the highest-loss point down to the median.

    With one point, the highest-loss point (the paper's Table 1 choice). Ties keep index order.
    """
    losses = np.asarray(test_losses, dtype=float)
    check_int("n_points", n_points, minimum=1, maximum=losses.size)
    order = np.argsort(-losses, kind="stable")  # rank 0 = highest loss
    median_rank = (losses.size - 1) // 2
    ranks = np.unique(np.round(np.linspace(0, median_rank, n_points)).astype(int)) if n_points > 1 else np.array([0])
    if ranks.size < n_points:  # fewer distinct ranks than points: take the next ones
        ranks = np.arange(n_points)
    return order[ranks]


@dataclass(frozen=True)
class Selection:
    """Which training points a correlation is computed over.

    Attributes:
        rule: ``"all"``, ``"top_k"`` or ``"quantile_band"``.
        k: number of points (unused for ``all``).
        quantile: centre of the band for ``quantile_band``.
        by: ranking score, ``"abs"`` (|predicted|, the default) or ``"signed"``.
    """

    rule: str = "top_k"
    k: int = 40
    quantile: float = 0.3
    by: str = "abs"

    def __post_init__(self) -> None:
        check_choice("rule", self.rule, SELECTION_RULES)
        check_choice("by", self.by, SELECTION_SCORES)
        if self.rule != "all":
            check_int("k", self.k, minimum=1)

    def apply(self, predicted) -> np.ndarray:
        """The selected indices into ``predicted``."""
        pred = _as_1d("predicted", predicted)
        if self.rule == "all":
            return np.arange(pred.size)
        if self.rule == "top_k":
            return select_top_k(pred, self.k, by=self.by)
        return select_quantile_band(pred, self.quantile, self.k, by=self.by)

    def describe(self) -> str:
        """A phrase for figure captions and the book."""
        score = "|predicted influence|" if self.by == "abs" else "predicted influence"
        if self.rule == "all":
            return "all training points"
        if self.rule == "top_k":
            return f"the top {self.k} training points by {score}"
        return f"{self.k} training points around the {self.quantile:.0%} quantile of {score}"


def _check_pair(predicted, actual) -> tuple[np.ndarray, np.ndarray]:
    p, a = _as_1d("predicted", predicted), _as_1d("actual", actual)
    if p.shape != a.shape:
        raise InvalidArgumentError(f"predicted has {p.size} values but actual has {a.size}; they must match")
    if p.size < 3:
        raise InvalidArgumentError(f"a correlation needs at least 3 points; got {p.size}")
    return p, a


def correlation(predicted, actual, statistic: str = "spearman") -> float:
    """One rank or linear correlation; NaN (not an error) when either side is constant."""
    check_choice("statistic", statistic, STATISTICS)
    p, a = _check_pair(predicted, actual)
    if np.ptp(p) == 0 or np.ptp(a) == 0:
        return math.nan
    fn = {"spearman": stats.spearmanr, "pearson": stats.pearsonr, "kendall": stats.kendalltau}[statistic]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(p, a)[0])


def correlations(predicted, actual) -> dict[str, float]:
    """Spearman, Pearson and Kendall between predicted and actual loss changes."""
    return {s: correlation(predicted, actual, s) for s in STATISTICS}


def spearman_over(predicted, actual, idxs: Sequence[int] | np.ndarray | None = None) -> float:
    """Spearman correlation over the points ``idxs`` (all points when None)."""
    p, a = _check_pair(predicted, actual)
    if idxs is not None:
        idxs = np.asarray(idxs, dtype=int)
        p, a = p[idxs], a[idxs]
    return correlation(p, a, "spearman")


def bootstrap_ci(
    predicted, actual, statistic: str = "spearman", *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a correlation, resampling point pairs.

    Resamples whose statistic is undefined (a constant side) are dropped. Cost: ``n_boot`` correlations.
    """
    check_choice("statistic", statistic, STATISTICS)
    check_int("n_boot", n_boot, minimum=10)
    check_positive("level", level)
    if level >= 1:
        raise InvalidArgumentError(f"level={level!r} is not allowed; it must be in (0, 1)")
    p, a = _check_pair(predicted, actual)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, p.size, size=(n_boot, p.size))
    values = np.array([correlation(p[i], a[i], statistic) if np.ptp(p[i]) and np.ptp(a[i]) else math.nan for i in idx])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class SeedSummary:
    """A statistic over seeds: mean, sample standard deviation, and every value (seed order)."""

    mean: float
    std: float
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def as_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


def aggregate_over_seeds(values: Sequence[float]) -> SeedSummary:
    """Mean and spread over seeds. NaN values (undefined correlations) are kept in ``values`` but left
    out of mean and std; std is the sample standard deviation (ddof=1), NaN for a single value."""
    vals = tuple(float(v) for v in values)
    if not vals:
        raise InvalidArgumentError("values is empty; give one value per seed")
    finite = np.array([v for v in vals if math.isfinite(v)])
    mean = float(finite.mean()) if finite.size else math.nan
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return SeedSummary(mean, std, vals)
