"""The verdict rules: their exact tests against brute force and scipy, their false-positive rates under pure noise,
their power against planted effects, and their refusals of bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from fragile.book.verdicts import (
    ALPHA,
    Heterogeneity,
    MatchesPaper,
    PairedDifference,
    Threshold,
    Trend,
    Verdict,
    permutation_p,
    sign_flip_p,
)
from fragile.errors import InvalidArgumentError

DRAWS = 300
# A rule's false-positive rate is at most 5 % when it says "reproduced" in at most 5 % of noise draws; with DRAWS
# draws the binomial standard error at 5 % is 1.3 %, so a measured rate above 8 % (2.3 standard errors) fails.
MAX_NOISE_RATE = 0.08


def _rate(rule, make, draws=DRAWS, verdict=Verdict.REPRODUCED, seed=0):
    rng = np.random.default_rng(seed)
    return np.mean([rule.decide(*make(rng)).verdict is verdict for _ in range(draws)])


# -- the exact tests against independent computations ---------------------------------------------------------------------
def test_sign_flip_p_is_the_brute_force_share_of_sign_patterns():
    r = np.array([0.3, -0.1, 0.25, 0.4, 0.05, -0.2, 0.15])
    sums = [sum(s * v for s, v in zip(signs, r)) for signs in itertools.product((1, -1), repeat=r.size)]
    assert sign_flip_p(r, +1) == pytest.approx(np.mean([s >= r.sum() - 1e-12 for s in sums]))
    assert sign_flip_p(r, -1) == pytest.approx(np.mean([s <= r.sum() + 1e-12 for s in sums]))
    assert sign_flip_p(np.full(5, 1.0), +1) == pytest.approx(2.0**-5)  # its smallest p at n = 5: above 2.5 %


def test_sign_flip_p_drawn_above_the_exact_size_agrees_with_scipy():
    rng = np.random.default_rng(3)
    r = rng.normal(0.4, 1.0, size=20)
    ref = stats.permutation_test(
        (r,), lambda x: x.sum(), permutation_type="samples", alternative="greater", n_resamples=20000, random_state=0
    ).pvalue
    assert sign_flip_p(r, +1) == pytest.approx(ref, abs=0.02)


def test_permutation_p_against_scipy():
    x = np.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5], dtype=float)
    y = np.array([0.9, 0.7, 0.8, 0.75, 0.6, 0.65, 0.5, 0.7, 0.4, 0.45])
    ref = stats.permutation_test(
        (x, y),
        lambda a, b: stats.spearmanr(a, b).statistic,
        permutation_type="pairings",
        alternative="less",
        n_resamples=5000,
        random_state=0,
    ).pvalue
    assert permutation_p(x, y, -1) == pytest.approx(ref, abs=0.01)
    small_x, small_y = np.arange(5.0), np.array([5.0, 4, 3, 2, 1])
    assert permutation_p(small_x, small_y, -1) == pytest.approx(1 / 120)  # exact: the one perfectly falling order


def test_heterogeneity_tau_and_its_q_profile_match_the_formulas():
    r, m = np.array([0.9, 0.2, 0.6, -0.1, 0.5]), np.array([20, 30, 25, 40, 22])
    z, v = np.arctanh(r), 1.06 / (m - 3)
    w = 1 / v
    q = (w * (z - (w * z).sum() / w.sum()) ** 2).sum()
    tau_dl = math.sqrt(max(0, (q - 4) / (w.sum() - (w**2).sum() / w.sum())))
    d = Heterogeneity(unit="test point").decide(r, m)
    assert d.estimate == pytest.approx(tau_dl)

    def q_at(tau):
        ww = 1 / (v + tau**2)
        return (ww * (z - (ww * z).sum() / ww.sum()) ** 2).sum()

    assert q_at(d.low) == pytest.approx(stats.chi2.ppf(0.975, 4), rel=1e-6)
    assert q_at(d.high) == pytest.approx(stats.chi2.ppf(0.025, 4), rel=1e-6)
    assert d.verdict is Verdict.REPRODUCED and d.low > 0.1


def test_the_mean_interval_is_students_t_and_fisher_keeps_it_inside_the_range():
    v = np.array([0.2, 0.5, 0.3, 0.6, 0.4])
    d = Threshold(threshold=0.9, side="below").decide(v)
    lo, hi = stats.t.interval(0.95, 4, loc=v.mean(), scale=stats.sem(v))
    assert (d.estimate, d.low, d.high) == pytest.approx((v.mean(), lo, hi))
    near_one = MatchesPaper(paper=0.97, tolerance=0.1, fisher=True).decide([0.98, 0.62, 0.98, 0.99, 0.99])
    assert -1 < near_one.low < near_one.estimate < near_one.high < 1


def test_t_interval_covers_95_percent():
    rng = np.random.default_rng(1)
    rule = Threshold(threshold=10.0, side="below")
    cover = [(d.low < 0.3 < d.high) for d in (rule.decide(rng.normal(0.3, 0.2, size=8)) for _ in range(2000))]
    assert 0.93 < np.mean(cover) < 0.97


# -- pure noise is not "reproduced" -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 10, 30])
def test_a_mean_at_the_threshold_is_not_reproduced(n):
    rule = Threshold(threshold=0.15, side="below", fisher=True, unit="test point")
    rate = _rate(rule, lambda rng: (np.tanh(np.arctanh(0.15) + rng.normal(0, 0.3, size=n)),))
    assert rate <= MAX_NOISE_RATE


@pytest.mark.parametrize("n", [5, 10, 30])
def test_a_mean_at_the_edge_of_the_band_is_not_reproduced(n):
    rule = MatchesPaper(paper=0.5, tolerance=0.1, fisher=True)
    rate = _rate(rule, lambda rng: (np.tanh(np.arctanh(0.4) + rng.normal(0, 0.2, size=n)),))
    assert rate <= MAX_NOISE_RATE


@pytest.mark.parametrize("n", [5, 8, 20])
def test_exchangeable_arms_are_neither_reproduced_nor_reversed(n):
    rule = PairedDifference()

    def make(rng):
        common = rng.normal(0.6, 0.2, size=n)  # the seeds' shared part: the arms differ only by noise
        return common + rng.normal(0, 0.1, size=n), common + rng.normal(0, 0.1, size=n)

    assert _rate(rule, make) <= MAX_NOISE_RATE
    assert _rate(rule, make, verdict=Verdict.REVERSED) <= MAX_NOISE_RATE


@pytest.mark.parametrize("n", [5, 10, 24])
def test_no_trend_is_not_reproduced(n):
    rule = Trend(direction="negative", bootstrap=500)
    depth = np.repeat(np.arange(1, n // 2 + 2), 2)[:n].astype(float)
    assert _rate(rule, lambda rng: (depth, rng.normal(0.5, 0.2, size=n)), draws=200) <= MAX_NOISE_RATE


@pytest.mark.parametrize("cells", [4, 10, 16])
def test_homogeneous_correlations_are_not_called_heterogeneous(cells):
    """Four Spearmans over 10 points spanning 0.38–0.92 is what noise does: the null sd of one is 0.33."""
    rule = Heterogeneity(min_tau=0.1, unit="test point")
    m = np.full(cells, 10.0)

    def make(rng):
        x = rng.normal(size=(cells, 10))
        y = 0.6 * x + 0.8 * rng.normal(size=(cells, 10))  # every cell the same true correlation
        return np.array([stats.spearmanr(a, b).statistic for a, b in zip(x, y)]), m

    assert _rate(rule, make, draws=200) <= MAX_NOISE_RATE


# -- planted effects are found at a chapter's n -------------------------------------------------------------------------------
def test_a_planted_paired_gap_is_detected_at_eight_seeds():
    rule = PairedDifference(tolerance=0.1)

    def make(rng):
        common = rng.normal(0.6, 0.2, size=8)
        return common + 0.25 + rng.normal(0, 0.1, size=8), common + rng.normal(0, 0.1, size=8)

    assert _rate(rule, make) >= 0.9
    flipped = _rate(rule, lambda rng: make(rng)[::-1], verdict=Verdict.REVERSED)
    assert flipped >= 0.9


def test_no_gap_within_the_tolerance_is_not_reproduced():
    rule = PairedDifference(tolerance=0.2)
    rate = _rate(rule, lambda rng: (rng.normal(0.5, 0.05, 20), rng.normal(0.5, 0.05, 20)), verdict=Verdict.NOT_REPRODUCED)
    assert rate >= 0.9


def test_a_planted_trend_is_detected_at_three_seeds_per_depth():
    rule = Trend(direction="negative", bootstrap=500)
    depth = np.repeat(np.arange(1, 9), 3).astype(float)
    assert _rate(rule, lambda rng: (depth, 0.9 - 0.08 * depth + rng.normal(0, 0.1, depth.size)), draws=100) >= 0.9


def test_a_planted_match_and_mismatch_are_decided():
    rule = MatchesPaper(paper=0.97, tolerance=0.1, fisher=True)
    close = _rate(rule, lambda rng: (np.tanh(np.arctanh(0.97) + rng.normal(0, 0.3, 20)),), draws=100)
    far = _rate(rule, lambda rng: (np.tanh(np.arctanh(0.6) + rng.normal(0, 0.3, 20)),), draws=100, verdict=Verdict.NOT_REPRODUCED)
    assert close >= 0.9 and far >= 0.9


def test_planted_heterogeneity_is_detected():
    rule = Heterogeneity(min_tau=0.1, unit="test point")
    true = np.tile([0.95, 0.0], 5)

    def make(rng):
        out = []
        for rho in true:
            x = rng.normal(size=50)
            out.append(stats.spearmanr(x, rho * x + math.sqrt(1 - rho**2) * rng.normal(size=50)).statistic)
        return np.array(out), np.full(true.size, 50.0)

    assert _rate(rule, make, draws=100) >= 0.9


def test_low_variance_is_decided_with_side_below():
    rule = Heterogeneity(min_tau=0.3, side="below", unit="seed")
    m = np.full(12, 40.0)

    def cells(rng, tau):
        out = []
        for z in np.arctanh(0.6) + tau * rng.standard_normal(12):
            x = rng.normal(size=40)
            rho = np.tanh(z)
            out.append(stats.spearmanr(x, rho * x + math.sqrt(1 - rho**2) * rng.normal(size=40)).statistic)
        return np.array(out), m

    assert _rate(rule, lambda rng: cells(rng, 0.0), draws=100) >= 0.5  # a common correlation: low spread found
    assert _rate(rule, lambda rng: cells(rng, 0.3), draws=200) <= MAX_NOISE_RATE  # a spread at the limit: not "low"
    assert _rate(rule, lambda rng: cells(rng, 0.8), draws=100, verdict=Verdict.NOT_REPRODUCED) >= 0.9
    assert rule.calibrated(*cells(np.random.default_rng(0), 0.0)).null_rate <= MAX_NOISE_RATE


def test_a_band_that_covers_every_correlation_is_refused():
    with pytest.raises(InvalidArgumentError, match="tolerance"):
        MatchesPaper(paper=0.0, tolerance=1.5, fisher=True)


# -- what a decision carries --------------------------------------------------------------------------------------------------
def test_an_undecidable_n_is_inconclusive_with_the_n_that_would_decide():
    """Five paired seeds with every difference positive: the t interval clears 0, the exact test cannot (2⁻⁵)."""
    d = PairedDifference().decide([0.9, 0.8, 0.95, 0.7, 0.85], [0.5, 0.6, 0.4, 0.6, 0.3])
    assert d.low > 0 and d.p_value == pytest.approx(1 / 32) and d.p_value > ALPHA
    assert d.verdict is Verdict.INCONCLUSIVE and d.n_to_decide == 6
    six = PairedDifference().decide([0.9, 0.8, 0.95, 0.7, 0.85, 0.8], [0.5, 0.6, 0.4, 0.6, 0.3, 0.5])
    assert six.verdict is Verdict.REPRODUCED and six.n_to_decide is None
    straddles = Threshold(threshold=0.5, side="below").decide([0.3, 0.7, 0.4, 0.6, 0.45, 0.5])
    assert straddles.verdict is Verdict.INCONCLUSIVE and straddles.n_to_decide > 6
    assert straddles.interval_text() == f"{straddles.estimate:.2f} [{straddles.low:.2f}, {straddles.high:.2f}], n = 6 seeds"


def test_calibrated_reports_the_null_rate_of_the_chapter_data():
    d = Trend(direction="negative", null_draws=200).calibrated(
        [1, 1, 2, 2, 3, 3, 7, 7, 8, 8], [0.9, 0.8, 0.85, 0.7, 0.8, 0.6, 0.3, 0.2, 0.1, 0.4]
    )
    assert d.verdict is Verdict.REPRODUCED and d.null_draws == 200 and 0 <= d.null_rate <= 0.05
    again = Trend(direction="negative", null_draws=200).calibrated(
        [1, 1, 2, 2, 3, 3, 7, 7, 8, 8], [0.9, 0.8, 0.85, 0.7, 0.8, 0.6, 0.3, 0.2, 0.1, 0.4]
    )
    assert again == d  # seeded: the same units give the same decision, null rate included


def test_a_band_edge_past_one_is_no_boundary():
    """The paper's 0.97 ± 0.1 reaches past 1: only the lower edge can be crossed, and only it makes a null."""
    rule = MatchesPaper(paper=0.97, tolerance=0.1, fisher=True, null_draws=200)
    d = rule.calibrated(np.full(8, 0.99) + np.linspace(-0.005, 0.005, 8))
    assert d.verdict is Verdict.REPRODUCED and d.null_rate <= 0.05


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Threshold(side="under"), "side='under'"),
        (lambda: Threshold(threshold=1.5, fisher=True), "threshold=1.5"),
        (lambda: MatchesPaper(tolerance=0), "tolerance"),
        (lambda: PairedDifference(direction="up"), "direction='up'"),
        (lambda: Trend(bootstrap=10), "bootstrap"),
        (lambda: Heterogeneity(min_tau=-1), "min_tau"),
        (lambda: Threshold(null_draws=0), "null_draws"),
    ],
)
def test_bad_rules_are_refused_by_name(make, match):
    with pytest.raises(InvalidArgumentError, match=match):
        make()


def test_bad_units_are_refused_before_any_work():
    with pytest.raises(InvalidArgumentError, match="finite"):
        Threshold().decide([0.1, math.nan])
    with pytest.raises(InvalidArgumentError, match="empty"):
        Threshold().decide([])
    with pytest.raises(InvalidArgumentError, match="correlations in"):
        Threshold(fisher=True).decide([1.5])
    with pytest.raises(InvalidArgumentError, match="pair up"):
        PairedDifference().decide([1.0, 2.0], [1.0])
    with pytest.raises(InvalidArgumentError, match="at least 3"):
        Trend().decide([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(InvalidArgumentError, match="more than 3 points"):
        Heterogeneity().decide([0.5, 0.2], [3, 10])
