import math

import numpy as np
import pytest
from scipy import stats

from fragile import InvalidArgumentError, Selection, aggregate_over_seeds, bootstrap_ci, correlation, correlations, spearman_over
from fragile.core.selection import select_quantile_band, select_top_k


def test_correlations_against_hand_computed_values():
    p = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    a = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    # Spearman by the textbook formula 1 − 6Σd²/(n(n²−1)) with d = rank differences (1,1,1,1,0).
    assert correlation(p, a, "spearman") == pytest.approx(1 - 6 * 4 / (5 * 24))
    # Kendall: 10 pairs, 2 discordant → (8 − 2)/10.
    assert correlation(p, a, "kendall") == pytest.approx(0.6)
    pc, ac = p - p.mean(), a - a.mean()
    assert correlation(p, a, "pearson") == pytest.approx(float(pc @ ac / np.sqrt((pc @ pc) * (ac @ ac))))
    assert set(correlations(p, a)) == {"spearman", "pearson", "kendall"}


def test_constant_side_gives_nan():
    assert math.isnan(correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_top_k_by_absolute_value():
    pred = np.array([0.1, -5.0, 3.0, 0.0, -0.2])
    assert select_top_k(pred, 2).tolist() == [1, 2]
    assert select_top_k(pred, 2, by="signed").tolist() == [2, 0]


def test_quantile_band_is_centred_and_clipped():
    pred = np.arange(100, dtype=float)[::-1]  # |pred| rank of index i is 99 - i
    band = select_quantile_band(pred, 0.3, 10)
    ranks = sorted(99 - band)
    assert ranks == list(range(25, 35))  # centred on rank round(0.3·99) = 30
    assert sorted(99 - select_quantile_band(pred, 1.0, 10)) == list(range(90, 100))
    assert Selection("quantile_band", k=10, quantile=0.3).apply(pred).tolist() == band.tolist()


def test_spearman_over_a_selection():
    rng = np.random.default_rng(0)
    p, a = rng.normal(size=50), rng.normal(size=50)
    idx = select_top_k(p, 10)
    assert spearman_over(p, a, idx) == pytest.approx(stats.spearmanr(p[idx], a[idx])[0])


def test_bootstrap_interval_contains_estimate_and_narrows_with_n():
    rng = np.random.default_rng(1)

    def ci(n):
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)
        return correlation(x, y), bootstrap_ci(x, y, n_boot=500, seed=0)

    r_small, (lo_s, hi_s) = ci(20)
    r_big, (lo_b, hi_b) = ci(500)
    assert lo_s <= r_small <= hi_s and lo_b <= r_big <= hi_b
    assert hi_b - lo_b < hi_s - lo_s
    assert bootstrap_ci([1, 2, 3, 4], [1, 3, 2, 4], seed=3) == bootstrap_ci([1, 2, 3, 4], [1, 3, 2, 4], seed=3)


def test_aggregate_over_seeds():
    s = aggregate_over_seeds([0.5, 0.7, math.nan, 0.9])
    assert s.mean == pytest.approx(0.7) and s.std == pytest.approx(0.2) and s.n == 4
    assert math.isnan(aggregate_over_seeds([0.3]).std)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: select_top_k([1.0, 2.0], 3), "k=3"),
        (lambda: select_quantile_band([1.0, 2.0, 3.0], 1.5, 1), "quantile="),
        (lambda: correlation([1.0, 2.0, 3.0], [1.0, 2.0]), "must match"),
        (lambda: correlation([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "cosine"), "statistic="),
        (lambda: Selection("bottom_k"), "rule="),
        (lambda: aggregate_over_seeds([]), "values is empty"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()
