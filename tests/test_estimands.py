"""The estimator × ground-truth chapter (fragile.chapters.estimands): config errors by name, one Iris job's ground truths
and fit against the functions called on their own (sequential retraining, one proximal problem at a time, the
materialised Hessian), its tables against correlations computed by hand, the common set and the failure counts on a
synthetic grid with planted failures, the claims on synthetic models with planted effects and non-converged models,
the data labels, the job keys, and the league-table rendering."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from fragile import Objective, TrainSpec, build_model, fit, loo_retrain_sequential, make_estimator
from fragile.book.claims import DataLabel
from fragile.book.verdicts import Verdict
from fragile.chapters import estimands as E
from fragile.chapters import iris
from fragile.chapters.results import Estimate, EstimatorFailure, Fit
from fragile.core.curvature import hessian_matrix
from fragile.core.ground_truth import pbrf_retrain
from fragile.core.metrics import correlation
from fragile.core.selection import select_top_k
from fragile.errors import InvalidArgumentError
from fragile.run.payload import decode, encode

TINY = dict(
    n_seeds=1,
    iris_depths=(1,),
    iris_train_steps=300,
    iris_retrain_steps=40,
    iris_top_k=6,
    mnist_test_points=0,
    tracin_checkpoints=3,
    pbrf_max_iter=200,
    lissa_depth=20,
    iris_estimators=("exact", "exact_gn", "grad_dot", "tracin"),
    scheduler="in-process",
)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("selection", "best", "selection"),
        ("iris_estimators", ("exact", "magic"), "iris_estimators"),
        ("mnist_estimators", (), "mnist_estimators"),
        ("iris_depths", (0,), "iris_depths"),
        ("iris_top_k", 0, "iris_top_k"),
        ("pbrf_max_iter", 0, "pbrf_max_iter"),
        ("iris_damping", -1.0, "iris_damping"),
        ("mnist_n_train", 5, "mnist_n_train"),
    ],
)
def test_bad_config_values_are_refused_by_name(field, value, match):
    with pytest.raises(InvalidArgumentError, match=match):
        E.EstimandsConfig(**{field: value})


def test_the_pbrf_needs_a_proximity_term():
    with pytest.raises(InvalidArgumentError, match="weight decay \\+ damping"):
        E.EstimandsConfig(iris_weight_decay=0.0, iris_damping=0.0)


@pytest.fixture(scope="module")
def iris_run():
    cfg = E.EstimandsConfig(**TINY)
    return cfg, E.run_iris_depth(cfg, 1)


def test_an_iris_job_measures_each_ground_truth_as_its_function_does_on_its_own(iris_run):
    cfg, res = iris_run
    assert isinstance(res, E.EstimandsResult) and res.setting == "iris/d1" and res.n_train == len(cfg.iris_data()[0])
    (model,) = res.models
    (point,) = model.points
    assert model.depth == 1 and model.seed == 0 and model.full_batch_gd
    train, test = cfg.iris_data()
    obj = Objective(
        build_model("mlp", seed=0, in_features=4, num_classes=3, depth=1, width=5, activation="relu"), cfg.iris_weight_decay
    )
    theta0 = obj.initial_params()
    spec = TrainSpec("gd", lr=cfg.iris_lr, steps=cfg.iris_train_steps)
    trained = fit(obj, theta0, train.x, train.y, spec, progress=False)
    theta = trained.params[0]
    # the fit's diagnostics, by hand: what the convergence class is decided on
    logits = obj.logits(theta, train.x).detach()
    assert model.fit.grad_norm == pytest.approx(float(trained.grad_norm[0]), rel=1e-10)
    assert model.fit.train_accuracy == pytest.approx(float((logits.argmax(1) == train.y).double().mean()))
    assert model.fit.majority_share == pytest.approx(np.bincount(train.y.numpy()).max() / len(train))
    top = float(torch.linalg.eigvalsh(hessian_matrix(obj, theta, train.x, train.y).double()).max())
    assert model.lr_times_lambda_max == pytest.approx(cfg.iris_lr * top, rel=1e-6)
    t = int(obj.sample_losses(theta, test.x, test.y).argmax())
    assert point.test_point == t
    x_t, y_t = test.x[t : t + 1], test.y[t : t + 1]
    exact = make_estimator("exact", obj, theta, train.x, train.y, damping=cfg.iris_damping, progress=False).influences(x_t, y_t)
    chosen = select_top_k(exact.predicted[0].numpy(), cfg.iris_top_k)  # the paper's selection, by the first estimator
    np.testing.assert_array_equal(point.chosen, chosen)
    assert isinstance(point.estimates["exact"], Estimate) and not point.estimates["exact"].failed
    np.testing.assert_allclose(point.estimates["exact"].predicted, exact.predicted[0].numpy()[chosen], rtol=1e-10)
    warm = loo_retrain_sequential(
        obj, theta, train.x, train.y, chosen, spec.replace(steps=cfg.iris_retrain_steps), x_t, y_t, progress=False
    )
    np.testing.assert_allclose(point.truths.warm, warm.actual[:, 0].numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(point.truths.warm_corrected, warm.actual_vs_control[:, 0].numpy(), rtol=1e-6, atol=1e-12)
    cold = loo_retrain_sequential(obj, theta0, train.x, train.y, chosen, spec, x_t, y_t, progress=False)
    np.testing.assert_allclose(point.truths.cold, cold.actual_vs_control[:, 0].numpy(), rtol=1e-6, atol=1e-12)
    # one problem at a time (no stacking) and solved tightly: the stacked solve agrees to its own stationarity
    for name, fit_term in (("pbrf", "bregman"), ("proximal", "objective")):
        alone = pbrf_retrain(
            obj,
            theta,
            train.x,
            train.y,
            chosen,
            x_t,
            y_t,
            damping=cfg.iris_damping,
            fit_term=fit_term,
            chunk_size=1,
            max_iter=300,
            tolerance=1e-10,
        )
        np.testing.assert_allclose(point.truths.of(name), alone.actual[:, 0].numpy(), rtol=2e-2, atol=1e-8)
    assert model.pbrf.stationarity < 1e-2 and model.pbrf.unsolved == 0 and model.proximal.unsolved == 0


def test_the_random_baseline_is_measured_like_the_chosen_points(iris_run):
    cfg, res = iris_run
    (model,) = res.models
    (point,) = model.points
    (baseline,) = model.random_points
    train, test = cfg.iris_data()
    drawn = baseline.chosen
    assert len(drawn) == cfg.iris_top_k and len(set(drawn.tolist())) == len(drawn) and np.all(np.diff(drawn) > 0)
    assert baseline.test_point == point.test_point and baseline.drift == point.drift
    exact = point.estimates["exact"]
    obj = Objective(
        build_model("mlp", seed=0, in_features=4, num_classes=3, depth=1, width=5, activation="relu"), cfg.iris_weight_decay
    )
    spec = TrainSpec("gd", lr=cfg.iris_lr, steps=cfg.iris_train_steps)
    theta = fit(obj, obj.initial_params(), train.x, train.y, spec, progress=False).params[0]
    t = point.test_point
    x_t, y_t = test.x[t : t + 1], test.y[t : t + 1]
    full = make_estimator("exact", obj, theta, train.x, train.y, damping=cfg.iris_damping, progress=False).influences(x_t, y_t)
    np.testing.assert_allclose(baseline.estimates["exact"].predicted, full.predicted[0].numpy()[drawn], rtol=1e-10)
    assert exact.predicted.shape == (cfg.iris_top_k,)
    warm = loo_retrain_sequential(
        obj, theta, train.x, train.y, drawn, spec.replace(steps=cfg.iris_retrain_steps), x_t, y_t, progress=False
    )
    np.testing.assert_allclose(baseline.truths.warm, warm.actual[:, 0].numpy(), rtol=1e-6, atol=1e-12)
    # a point both chosen and drawn has one ground truth: the union is measured once
    for i in set(drawn.tolist()) & set(point.chosen.tolist()):
        a, b = int(np.flatnonzero(drawn == i)[0]), int(np.flatnonzero(point.chosen == i)[0])
        for g in E.GROUND_TRUTHS:
            np.testing.assert_equal(baseline.truths.of(g)[a], point.truths.of(g)[b])
    grid = E.grid_table([res], at_random=True)
    row = grid[(grid["estimator"] == "exact") & (grid["ground_truth"] == "warm")].iloc[0]
    keep = E.common_points(baseline)
    assert row["spearman"] == pytest.approx(
        correlation(baseline.estimates["exact"].predicted[keep], baseline.truths.warm[keep], "spearman"), nan_ok=True
    )
    assert E.grid_table([res]).shape == grid.shape
    at_random = E.run_iris_depth(E.EstimandsConfig(**{**TINY, "selection": "random"}), 1)
    assert at_random.models[0].random_points == ()  # the chosen points are already random: nothing added
    assert E.run_iris_depth(E.EstimandsConfig(**{**TINY, "random_points": False}), 1).models[0].random_points == ()


def test_the_tables_are_the_correlations_and_distances_of_the_records(iris_run):
    cfg, res = iris_run
    (model,) = res.models
    (point,) = model.points
    grid = E.grid_table([res])
    assert len(grid) == len(cfg.iris_estimators) * len(E.GROUND_TRUTHS)
    assert (grid["points"] == cfg.iris_top_k).all()  # every solve converged: every chosen point is common
    for _, row in grid.iterrows():
        expected = stats.spearmanr(point.estimates[row["estimator"]].predicted, point.truths.of(row["ground_truth"]))[0]
        assert row["spearman"] == pytest.approx(expected, abs=1e-12)
    chain = E.chain_table([res])
    lin = chain[chain["gap"] == "linearisation"].iloc[0]
    a, b = point.truths.pbrf, point.estimates["exact_gn"].predicted
    assert lin["relative_distance"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-12)
    assert lin["units"] == 1 and lin["left_out"] == 0
    assert "solver error (LiSSA)" not in set(chain["gap"])  # lissa was not run: its step is left out, not faked
    summary = E.grid_summary(grid, "iris")
    assert list(summary.index) == list(cfg.iris_estimators) and summary.shape[1] == len(E.GROUND_TRUTHS) + 1
    assert (summary[E.N_COMMON] == 1).all()
    table = E.model_table([res], cfg.criteria)
    conv = model.convergence(cfg.criteria)
    assert table["convergence"].tolist() == [str(conv.kind)] and table["grad_norm"].iloc[0] == model.fit.grad_norm
    # 300 full-batch steps do not reach ‖∇‖ ≤ 1e-3: the one model is not converged, and the claims say so
    assert conv.kind is E.ConvergenceClass.NOT_CONVERGED
    head = next(c for c in E.claims([res], cfg) if c.key == "iris_headline_with_wd")
    assert head.decision is None and head.verdict == "inconclusive: none of 1 models converged"


# -- synthetic results: planted failures and effects ----------------------------------------------------------------


def _fit(grad_norm: float = 1e-5) -> Fit:
    return Fit(0.1, 0.95, 0.9, grad_norm, 1.0, majority_share=0.34, prediction_spread=0.3, loss_rise=0.0)


SOLVED = E.ProximalSolve(stationarity=1e-3, unsolved=0, seconds=0.1)


def _point(pred: np.ndarray, truths: dict[str, np.ndarray], estimates: dict | None = None, t: int = 0) -> E.PointResult:
    """A test point whose chosen points are 0..k-1: ``pred`` is the exact influence, ``truths`` the ground truths
    given (the others equal ``truths["warm"]``)."""
    full = {g: np.asarray(truths.get(g, truths["warm"]), dtype=float) for g in E.GROUND_TRUTHS}
    est = {"exact": Estimate("exact", np.asarray(pred, dtype=float), np.zeros(1), 0.1), **(estimates or {})}
    return E.PointResult(t, np.arange(len(pred)), 0.0, E.GroundTruths(**full), est)


def _model(depth, seed, *points, grad_norm=1e-5, lr_lambda=0.5) -> E.ModelResult:
    """A model trained by full-batch gradient descent (``lr_lambda`` its lr·λmax), or by Adam where it is NaN."""
    gd = math.isfinite(lr_lambda)
    return E.ModelResult(depth, seed, _fit(grad_norm), gd, lr_lambda, SOLVED, SOLVED, tuple(points))


def _reversed_prefix(k: int, length: int) -> np.ndarray:
    """0..k-1 with its first ``length`` values reversed: its Spearman with 0..k-1 falls as ``length`` grows."""
    out = np.arange(k, dtype=float)
    out[:length] = out[:length][::-1]
    return out


def test_every_comparison_is_on_the_common_set_and_what_is_left_out_is_counted():
    rng = np.random.default_rng(0)
    k = 8
    pred = np.arange(k, dtype=float)

    def truths():
        return {g: pred + rng.normal(scale=3.0, size=k) for g in E.GROUND_TRUTHS}

    cg_ok = lambda: {"cg": Estimate("cg", pred + rng.normal(scale=1.0, size=k), np.zeros(1), 0.1)}  # noqa: E731
    a = truths()
    b = truths()
    b["pbrf"][:2] = np.nan  # two unsolved PBRF problems: every ground truth is compared on the other six points
    c = truths()
    d = truths()
    d["proximal"][:5] = np.nan  # three common points: fewer than MIN_POINTS, the unit is out everywhere
    failed = {"cg": EstimatorFailure("cg", "H + λI is indefinite")}
    points = [_point(pred, a, cg_ok()), _point(pred, b, cg_ok()), _point(pred, c, failed), _point(pred, d, cg_ok())]
    res = E.EstimandsResult("iris/d1", 30, 120, E.IRIS_DATA, tuple(_model(1, s, p) for s, p in enumerate(points)))
    grid = E.grid_table([res])
    on_b = grid[grid["seed"] == 1]
    assert (on_b["points"] == 6).all()
    for _, row in on_b.iterrows():
        est = points[1].estimates[row["estimator"]].predicted
        expected = stats.spearmanr(est[2:], b[row["ground_truth"]][2:])[0]  # warm-start too: on the PBRF's six points
        assert row["spearman"] == pytest.approx(expected, abs=1e-12)
    assert grid[grid["seed"] == 3]["spearman"].isna().all()
    assert grid[(grid["seed"] == 2) & (grid["estimator"] == "cg")]["spearman"].isna().all()

    # every estimator: only the units where cg ran (0, 1); exact alone: the three with four or more common points
    def exact_vs_warm(seeds):
        return grid[(grid["estimator"] == "exact") & (grid["ground_truth"] == "warm") & grid["seed"].isin(seeds)]["spearman"]

    assert E.estimator_sets([res], "iris") == [
        ("every estimator", ["exact", "cg"]),
        ("without cg (failed on some models)", ["exact"]),
    ]
    both = E.grid_summary(grid, "iris")
    assert (both[E.N_COMMON] == 2).all()
    v = exact_vs_warm([0, 1])
    assert both.loc["exact", E.TRUTH_NAMES["warm"]] == f"{v.mean():.2f} ± {v.std():.2f}"
    alone = E.grid_summary(grid, "iris", estimators=("exact",))
    v = exact_vs_warm([0, 1, 2])
    assert alone.loc["exact", E.TRUTH_NAMES["warm"]] == f"{v.mean():.2f} ± {v.std():.2f}" and alone[E.N_COMMON].iloc[0] == 3
    depth = E.depth_table(grid)
    assert set(depth["n"]) == {3} and depth[depth["ground_truth"] == "warm"]["mean"].iloc[0] == pytest.approx(v.mean())
    chain = E.chain_table([res])
    assert set(chain["units"]) == {3} and set(chain["left_out"]) == {1}  # cg is no stage of the chain: only d is out

    fails = E.failures_table([res]).set_index("what")
    assert fails.loc["cg", ["models_failed", "models", "test_points_failed"]].tolist() == [1, 4, 1]
    assert fails.loc["cg", "why"] == "H + λI is indefinite" and fails.loc["exact", "models_failed"] == 0
    pbrf = fails.loc[E.TRUTH_NAMES["pbrf"]]
    assert pbrf[["models_failed", "removals_failed", "removals"]].tolist() == [1, 2, 4 * k] and pbrf["why"] == E.UNSOLVED_WHY
    assert fails.loc[E.TRUTH_NAMES["proximal"], "removals_failed"] == 5
    assert fails.loc["every ground truth", "test_points_failed"] == 1
    assert E.failures_table([res])["kind"].value_counts()["ground truth"] == len(E.GROUND_TRUTHS)


def test_a_failed_estimator_is_a_value_the_tables_leave_blank_and_name():
    k = 4
    truths = E.GroundTruths(*(np.arange(k, dtype=float) * (g + 1) for g in range(len(E.GROUND_TRUTHS))))
    reversed_order = Estimate("exact", np.arange(k, dtype=float)[::-1].copy(), np.zeros(1), 0.5)
    failed = EstimatorFailure("cg", "H + λI is indefinite")
    point = E.PointResult(3, np.arange(k), 0.0, truths, {"exact": reversed_order, "cg": failed})
    res = E.EstimandsResult("iris/d1", 10, 20, E.IRIS_DATA, (_model(1, 0, point),))
    grid = E.grid_table([res])
    assert grid[grid["estimator"] == "cg"]["spearman"].isna().all()
    np.testing.assert_allclose(grid[grid["estimator"] == "exact"]["spearman"], -1.0)
    fails = E.failures_table([res]).set_index("what")
    assert fails.loc["cg", ["models_failed", "test_points_failed", "why"]].tolist() == [1, 1, "H + λI is indefinite"]
    assert list(E.timing_table([res])["method"]) == ["exact", "proximal response", "PBRF"]
    # the cache's pickle-free format rebuilds the failure as its own type
    back = decode(*encode(res)).models[0].points[0]
    assert back.estimates["cg"] == failed and back.estimates["cg"].failed and isinstance(back.estimates["exact"], Estimate)


def _depth_sweep(extra: tuple[E.ModelResult, ...] = ()) -> list[E.EstimandsResult]:
    """Four depths × three seeds, every model converged: against warm-start LOO the exact influence's Spearman
    falls with depth (a longer reversed prefix), against the PBRF it depends on the seed only; ``extra`` models go
    to depth 4."""
    k = 16
    pred = np.arange(k, dtype=float)
    out = []
    for d in (1, 2, 3, 4):
        models = tuple(
            _model(d, s, _point(pred, {"warm": _reversed_prefix(k, 3 * d + s + 2), "pbrf": _reversed_prefix(k, 2 + s)}))
            for s in range(3)
        )
        out.append(E.EstimandsResult(f"iris/d{d}", 30, 120, E.IRIS_DATA, models + (extra if d == 4 else ())))
    return out


def _by_key(results) -> dict:
    return {c.key: c for c in E.claims(results, E.EstimandsConfig())}


def test_a_planted_depth_effect_against_warm_start_only_is_decided_so_on_the_converged_models():
    k = 16
    perfect = _point(np.arange(k, dtype=float), {"warm": np.arange(k, dtype=float), "pbrf": np.arange(k, dtype=float)})
    # two deep models that would break the trend, neither at an optimum: one far from stationary, one past
    # gradient descent's stability limit
    odd = (_model(4, 3, perfect, grad_norm=0.5), _model(4, 4, perfect, lr_lambda=2.5))
    results = _depth_sweep(odd)
    assert [str(m.convergence(E.EstimandsConfig().criteria).kind) for m in odd] == ["not converged", "unstable"]
    got = _by_key(results)
    depths = np.repeat([1, 2, 3, 4], 3)
    warm = [stats.spearmanr(np.arange(k), _reversed_prefix(k, 3 * d + s + 2))[0] for d in (1, 2, 3, 4) for s in range(3)]
    drop = got["iris_depth_drop_warm"]
    assert drop.decision is not None and drop.decision.n == 12 and drop.decision.unit == "model"
    assert drop.decision.estimate == pytest.approx(stats.spearmanr(depths, warm)[0])
    assert drop.outcome is Verdict.REPRODUCED and drop.decision.null_rate <= 0.05
    assert drop.note.startswith("12 of 14 models converged; all models:")
    flat = got["iris_depth_drop"]  # against the PBRF: no trend with depth, so nothing is decided
    assert flat.decision.n == 12 and flat.decision.estimate == pytest.approx(0.0, abs=1e-12)
    assert flat.outcome is Verdict.INCONCLUSIVE
    assert "against warm-start LOO on the same models and points" in flat.note and drop.ours in flat.note
    diff = got["iris_pbrf_over_warm"]
    pbrf = [stats.spearmanr(np.arange(k), _reversed_prefix(k, 2 + s))[0] for _ in range(4) for s in range(3)]
    assert diff.decision.estimate == pytest.approx(np.mean(np.subtract(pbrf, warm)))
    assert diff.outcome is Verdict.REPRODUCED and diff.decision.n == 12
    assert got["iris_headline_with_wd"].decision.n == 3  # depth 1's three seeds; too few to decide
    assert got["iris_headline_with_wd"].outcome is Verdict.INCONCLUSIVE
    assert all(c.data.label is DataLabel.REAL and c.data.name == "Iris" for c in got.values() if c.key.startswith("iris"))
    assert got["smnist_range"].verdict.startswith("not run")


def test_too_few_converged_models_leave_the_trend_inconclusive_with_why():
    results = _depth_sweep()
    stuck = [replace(r, models=tuple(replace(m, fit=_fit(0.5)) if m.depth > 1 else m for m in r.models)) for r in results]
    drop = _by_key(stuck)["iris_depth_drop_warm"]
    assert drop.decision is None and drop.verdict == "inconclusive: 3 converged models over 1 depth"
    assert drop.ours.startswith("all models: ") and drop.note == "3 of 12 models converged"


def test_small_mnist_is_reduced_mnist_and_a_non_converged_model_decides_nothing():
    rng = np.random.default_rng(1)
    k = 8
    pred = np.arange(k, dtype=float)
    pts = [_point(pred, {"warm": pred + rng.normal(size=k), "pbrf": pred + rng.normal(size=k)}, t=t) for t in range(3)]
    pts = [replace(p, estimates={"exact_gn": replace(p.estimates["exact"], method="exact_gn")}) for p in pts]
    mnist = E.EstimandsResult("mnist", 2616, 60, "digits", (_model(None, 0, *pts, grad_norm=0.05, lr_lambda=math.nan),))
    assert mnist.data_used.label is DataLabel.REDUCED and mnist.data_used.text() == "reduced (MNIST, 60 of 5,500 training points)"
    assert E.data_used("Iris", 120).label is DataLabel.REAL
    got = _by_key([mnist])
    for key in ("smnist_range", "smnist_range_warm"):
        c = got[key]
        assert (
            c.decision is None and c.verdict == "inconclusive: none of 1 models converged" and c.data.label is DataLabel.REDUCED
        )
        assert "(exact_gn)" in c.claim
    assert got["iris_depth_drop"].verdict.startswith("not run: iris_depths is empty")
    # the PBRF unsolved on five of eight points: no test point has the four common points a value needs
    unsolved = [replace(p, truths=replace(p.truths, pbrf=np.where(np.arange(k) < 5, np.nan, p.truths.pbrf))) for p in pts]
    lost = replace(mnist, models=(replace(mnist.models[0], points=tuple(unsolved)),))
    range_claim = _by_key([lost])["smnist_range"]
    assert range_claim.verdict == "inconclusive: none of 1 models has a value on the common points"
    # Adam has no stability limit: the same fit at a small gradient is converged whatever lr·λmax, gradient descent not
    criteria = E.EstimandsConfig().criteria
    adam = replace(mnist.models[0], fit=_fit(), lr_times_lambda_max=3.0)
    assert adam.convergence(criteria).converged
    assert replace(adam, full_batch_gd=True).convergence(criteria).kind is E.ConvergenceClass.UNSTABLE


def test_the_rules_are_the_paper_chapters_own():
    """Chapters never import each other, so the rules this chapter re-applies are declared again: they must be equal."""
    from fragile.chapters import small_mnist

    assert E.HEADLINE_RULE == iris.HEADLINE_RULES["with_wd"] and E.DEPTH_RULE == iris.TREND_RULE
    assert E.RANGE_RULE == small_mnist.RANGE_RULE
    assert E.PAPER_HEADLINE_WITH_WD == iris.PAPER_HEADLINE["with_wd"]
    text = E.rules_markdown()
    for rule in (E.HEADLINE_RULE, E.DEPTH_RULE, E.PBRF_OVER_WARM_RULE, E.RANGE_RULE):
        assert rule.statement() in text


def test_job_keys_hold_what_the_numbers_depend_on():
    base = {j.name: j.key for j in E.study_jobs(E.EstimandsConfig())}
    assert set(base) == {
        "estimands/iris-d1",
        "estimands/iris-d2",
        "estimands/iris-d3",
        "estimands/mnist-s0",
        "estimands/mnist-s1",
    }
    moved = {j.name: j.key for j in E.study_jobs(E.EstimandsConfig(mnist_lr=0.01, scheduler="in-process", cache_dir="elsewhere"))}
    assert all(moved[n] == base[n] for n in base if "iris" in n)  # a small-MNIST value leaves the Iris jobs cached
    assert all(moved[n] != base[n] for n in base if "mnist" in n)
    deeper = {j.name: j.key for j in E.study_jobs(E.EstimandsConfig(iris_retrain_steps=10))}
    assert all(deeper[n] != base[n] for n in base if "iris" in n)


def test_the_league_table_renders_every_row():
    report = {
        "title": "t",
        "timestamp": "2026-11-30T00:00:00+00:00",
        "git": {"commit": "abcdef0123456", "dirty": False},
        "machine": {"cpu_count": 2, "torch_threads": 1},
        "total_seconds": 12.0,
        "versions": {"torch": "2.14.1", "dattri": "0.3.0"},
        "model": {"num_params": 2616, "data": "digits", "grad_norm": 0.01},
        "settings": {"damping": 0.01, "dtype": "float32", "lissa_depth": 50, "cg_max_iter": 200, "arnoldi_rank": 100},
        "rows": [
            {
                "library": "fragile (ours)",
                "method": "cg",
                "status": "ok",
                "seconds": 2.0,
                "ratio": None,
                "pearson": 1.0,
                "spearman": 1.0,
                "max_rel_err": 1e-5,
                "max_rel_err_same": None,
                "note": "",
            },
            {
                "library": "dattri",
                "method": "cg",
                "status": "ok",
                "seconds": 5.0,
                "ratio": 2.5,
                "pearson": 1.0,
                "spearman": 1.0,
                "max_rel_err": 2e-5,
                "max_rel_err_same": 3e-5,
                "note": "",
            },
            {"library": "torch-influence", "method": "cg", "status": "not installed", "note": "not installed (not on PyPI)"},
        ],
    }
    text = E.peers_markdown(report)
    assert (
        "| dattri | cg | 5.0 | 2.50 |" in text
        and "| torch-influence | cg | — |" in text
        and "not installed (not on PyPI)" in text
    )
    assert "abcdef0123" in text and "dattri 0.3.0" in text
