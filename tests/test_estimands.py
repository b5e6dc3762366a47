"""The estimator × ground-truth chapter (fragile.chapters.estimands): config errors by name, one Iris job's ground truths
against the ground-truth functions called on their own (sequential retraining, one proximal problem at a time), its
tables against correlations computed by hand, the job keys, and the league-table rendering."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fragile import Objective, TrainSpec, build_model, fit, loo_retrain_sequential, make_estimator
from fragile.chapters import estimands as E
from fragile.chapters.results import Estimate, EstimatorFailure
from fragile.core.ground_truth import pbrf_retrain
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
    assert model.depth == 1 and model.seed == 0 and model.train_accuracy is None
    train, test = cfg.iris_data()
    obj = Objective(
        build_model("mlp", seed=0, in_features=4, num_classes=3, depth=1, width=5, activation="relu"), cfg.iris_weight_decay
    )
    theta0 = obj.initial_params()
    spec = TrainSpec("gd", lr=cfg.iris_lr, steps=cfg.iris_train_steps)
    theta = fit(obj, theta0, train.x, train.y, spec, progress=False).params[0]
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


def test_the_tables_are_the_correlations_and_distances_of_the_records(iris_run):
    cfg, res = iris_run
    (model,) = res.models
    (point,) = model.points
    grid = E.grid_table([res])
    assert len(grid) == len(cfg.iris_estimators) * len(E.GROUND_TRUTHS)
    for _, row in grid.iterrows():
        expected = stats.spearmanr(point.estimates[row["estimator"]].predicted, point.truths.of(row["ground_truth"]))[0]
        assert row["spearman"] == pytest.approx(expected, abs=1e-12)
    chain = E.chain_table([res])
    lin = chain[chain["gap"] == "linearisation"].iloc[0]
    a, b = point.truths.pbrf, point.estimates["exact_gn"].predicted
    assert lin["relative_distance"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-12)
    assert "solver error (LiSSA)" not in set(chain["gap"])  # lissa was not run: its step is left out, not faked
    summary = E.grid_summary(grid, "iris")
    assert list(summary.index) == list(cfg.iris_estimators) and summary.shape[1] == len(E.GROUND_TRUTHS)


def test_a_failed_estimator_is_a_value_the_tables_leave_blank_and_name():
    k = 4
    truths = E.GroundTruths(*(np.arange(k, dtype=float) * (g + 1) for g in range(len(E.GROUND_TRUTHS))))
    reversed_order = Estimate("exact", np.arange(k, dtype=float)[::-1].copy(), np.zeros(1), 0.5)
    failed = EstimatorFailure("cg", "H + λI is indefinite")
    point = E.PointResult(3, np.arange(k), 0.0, truths, {"exact": reversed_order, "cg": failed})
    solve = E.ProximalSolve(stationarity=1e-3, unsolved=0, seconds=0.25)
    res = E.EstimandsResult(
        "iris/d1", 10, 20, False, E.IRIS_DATA, (E.ModelResult(1, 0, 1e-4, 1.0, None, solve, solve, (point,)),)
    )
    grid = E.grid_table([res])
    assert grid[grid["estimator"] == "cg"]["spearman"].isna().all()
    np.testing.assert_allclose(grid[grid["estimator"] == "exact"]["spearman"], -1.0)
    assert E.estimator_failures([res]) == ["iris/d1 seed 0: cg: H + λI is indefinite"]
    assert list(E.timing_table([res])["method"]) == ["exact", "proximal response", "PBRF"]
    # the cache's pickle-free format rebuilds the failure as its own type
    back = decode(*encode(res)).models[0].points[0]
    assert back.estimates["cg"] == failed and back.estimates["cg"].failed and isinstance(back.estimates["exact"], Estimate)


def test_depth_statistics_by_hand():
    rows = [
        {"setting": f"iris/d{d}", "depth": d, "seed": s, "test_point": 0, "estimator": "exact", "ground_truth": g, "spearman": v}
        for d, vals in ((1, (0.9, 0.7)), (3, (0.6, 0.6)), (6, (0.2, 0.0)))
        for s, v in enumerate(vals)
        for g in ("warm", "pbrf")
    ]
    grid = pd.DataFrame(rows)
    assert E.depth_drop(grid, "exact", "warm") == (pytest.approx(0.8 - 0.1), 1, 6)
    assert E.depth_trend(grid, "exact", "pbrf") == pytest.approx(-1.0)
    dead = grid.assign(spearman=np.where(grid["depth"] == 6, np.nan, grid["spearman"]))  # a collapsed deepest network
    assert E.depth_drop(dead, "exact", "warm") == (pytest.approx(0.8 - 0.6), 1, 3) and E.undefined_depths(dead) == [6]
    assert math.isnan(E.depth_drop(dead[dead["depth"] == 1], "exact", "warm")[0])


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
