"""Every chooser of points: training points to evaluate (top-k, a quantile band) and test points (by loss rank,
by kind, at random).

The paper computes correlations over a selected subset of training points for one test point at a time: the
top-k by |predicted influence|, or a band of k points around a quantile (docs/protocol.md). Every chooser is
deterministic: ties keep index order (stable sorts), random draws take an explicit seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fragile.core.metrics import _as_1d
from fragile.errors import InvalidArgumentError, check_choice, check_int

SELECTION_RULES = ("all", "top_k", "quantile_band")
SELECTION_SCORES = ("abs", "signed")
TEST_POINT_KINDS = ("highest loss", "median loss")


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


def highest_loss(test_losses: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """The ``k`` test indices of highest loss, highest first; ties keep index order."""
    losses = np.asarray(test_losses, dtype=float)
    check_int("k", k, minimum=1, maximum=losses.size)
    return np.argsort(-losses, kind="stable")[:k]


def test_points_by_kind(test_losses: np.ndarray, per_kind: int) -> tuple[np.ndarray, list[str]]:
    """The ``per_kind`` highest-loss test points and the ``per_kind`` nearest the median loss (by rank, the median
    first, then alternately below and above it), with their kinds. With one of each: the paper's Table 1 pair."""
    losses = np.asarray(test_losses, dtype=float)
    check_int("per_kind", per_kind, minimum=1, maximum=max(1, losses.size // 4))
    order = np.argsort(-losses, kind="stable")
    median_rank = (losses.size - 1) // 2
    offsets = [0] + [o for k in range(1, per_kind) for o in (k, -k)]
    median_ranks = sorted(median_rank + o for o in offsets[:per_kind])
    tp = np.concatenate([order[:per_kind], order[median_ranks]])
    return tp, [TEST_POINT_KINDS[0]] * per_kind + [TEST_POINT_KINDS[1]] * per_kind


def random_test_points(n_test: int, k: int, seed: int, *, name: str = "k") -> np.ndarray:
    """``k`` distinct test indices drawn uniformly at random with ``seed``, in draw order; ``name`` is the parameter
    the caller's user set, for the error message."""
    check_int(name, k, minimum=1, maximum=n_test)
    return np.random.default_rng(seed).choice(n_test, size=k, replace=False)
