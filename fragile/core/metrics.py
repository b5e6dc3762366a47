"""Agreement between predicted and actual loss changes: correlations, bootstrap intervals, seed summaries.

Which points a correlation is computed over is :mod:`fragile.core.selection`'s job.
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


def _as_1d(name: str, values) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidArgumentError(f"{name} is empty")
    return arr.astype(float)


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
