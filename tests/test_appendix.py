"""The appendix chapter's own logic: config checks, that its optimiser and initialisation jobs are the Table 1
chapter's jobs (same keys), and that the summed-loss and group job's numbers match independent computations (the sum
of per-test-point influences on an independently trained network, sequential retraining, brute-force leave-one-out
on a convex problem), plus Table 2's assembly and the claims' rules both ways."""

import math

import numpy as np
import pytest
import torch
from brute_force import newton_minimise, write_measurement

from fragile import Objective, correlation, fit, loo_retrain_sequential, make_estimator
from fragile.chapters.appendix import (
    AppendixConfig,
    AppendixResults,
    Group,
    GroupRemovals,
    StudyResult,
    SummedGroupResult,
    TopPointRemovals,
    claims,
    gpu_table,
    group_table,
    make_groups,
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
    assert retraining.steps == round(0.06 * 60) and retraining.models == cfg.top_k + 6  # the top points and the groups
    assert float(top.actual[j]) == pytest.approx(float(seq.actual[0].sum()), rel=1e-3, abs=1e-6)
    assert retraining.drift.shape == (1,) and float(retraining.drift[0]) == pytest.approx(
        float(seq.drift.sum()), rel=1e-3, abs=1e-6
    )


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
    rows = group_table(entries)
    cell = rows[(rows["kind"] == "same class") & (rows["size"] == "2")].iloc[0]
    assert cell["groups"] == 3 and cell["spearman"] == pytest.approx(
        correlation(g.predicted[3:], g.actual[3:], "spearman"), nan_ok=True
    )
    s = summed_table(entries).iloc[0]
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


def _network(ds, arch, seed, *, num_params, seconds, grad_norm, stand_in=False):
    fit_ = Fit(train_loss=0.1, train_accuracy=1.0, test_accuracy=0.9, grad_norm=grad_norm, seconds=seconds)
    return Network(ds, arch, 0.001, seed, stand_in, num_params, 20, 30, fit_, "cpu")


def _estimate(method, seconds, *, lambda_max=None, n_test=2):
    return Estimate(method, np.zeros((n_test, 20)), np.zeros(n_test), seconds, lambda_max=lambda_max)


def _point(kind, spearman, pearson, predicted, actual):
    return PointResult(kind, np.arange(len(actual)), predicted, actual, actual, spearman, pearson, spearman, ())


def _tp_model(
    job,
    arch,
    seed,
    spearman,
    pearson,
    *,
    optimizer="adam",
    seconds=1.0,
    drift=(math.nan, math.nan),
    predicted=(0.0, 1.0, 2.0),
    actual=(0.0, 1.0, 2.0),
):
    """A Table 1 model of the optimiser or initialisation study: LiSSA and CG ran, Arnoldi failed."""
    estimators = {
        "lissa": _estimate("lissa", 2.0, lambda_max=5.0),
        "cg": _estimate("cg", 1.0),
        "arnoldi": EstimatorFailure("arnoldi", "x"),
    }
    points = (
        _point("highest loss", spearman, pearson, np.array(predicted), np.array(actual)),
        _point("median loss", -1.0, -1.0, np.array(predicted), np.array(actual)),
    )
    result = Table1Result(
        network=_network("mnist", arch, seed, num_params=100, seconds=seconds, grad_norm=0.01),
        primary="lissa",
        test_points=np.array([3, 7]),
        test_losses=np.array([2.0, 0.5]),
        estimators=estimators,
        retraining=Retraining(models=2, steps=3, drift=np.array(drift), control_grad_norm=0.0, seconds=9.0),
        per_test_point=points,
    )
    return StudyResult(job, optimizer, 0.1, result)


PRED = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 30.0])
ACT = np.array([2, 0, 5, 1, 7, 3, 4, 9, 6, 31.0])  # Pearson 0.97, Spearman 0.76 with PRED


def _summed_model(ds, arch, sign, group_sign, stand_in=False, *, failed=False):
    """A summed-loss/group job of the top points PRED against sign × ACT, and twelve groups (two kinds, two sizes)
    whose actual change is group_sign × their prediction; ``failed``: its estimator failed instead."""
    network = _network(ds, arch, 0, num_params=10, seconds=1.0, grad_norm=0.1, stand_in=stand_in)
    job = f"appendix/{ds}-{arch}"
    if failed:
        result = SummedGroupResult(network, np.arange(8), np.ones(8), EstimatorFailure("lissa", "diverged"), None, None, None)
        return StudyResult(job, "adam", 0.001, result)
    groups = tuple(Group(kind, size, np.arange(size)) for kind in ("random", "same class") for size in (2, 2, 2, 4, 4, 4))
    pred = np.tile([1.0, 2.0, 3.0], 4)
    result = SummedGroupResult(
        network=network,
        test_points=np.arange(8),
        test_losses=np.ones(8),
        estimate=Estimate("lissa", np.zeros((1, 20)), np.array([0.1]), 4.0),
        retraining=Retraining(models=2, steps=3, drift=np.array([0.0]), control_grad_norm=0.0, seconds=6.0),
        top_points=TopPointRemovals(np.arange(10), PRED, sign * ACT, sign * ACT),
        groups=GroupRemovals(groups, pred, group_sign * pred, group_sign * pred),
    )
    return StudyResult(job, "adam", 0.001, result)


def test_table2_has_each_jobs_seconds_once_and_the_mean_per_network():
    shared = _tp_model("table1/mnist-lenet-seed0", "lenet", 0, 0.5, 0.5, seconds=3.0)
    results = AppendixResults(
        optimizer=(shared,),
        init=(shared, _tp_model("table1/mnist-lenet-seed1", "lenet", 1, 0.5, 0.5, seconds=5.0)),
        summed_group=(_summed_model("mnist", "small_cnn", 1, 1), _summed_model("cifar100", "resnet18", 1, 1, failed=True)),
    )
    timing = timing_table(results)
    assert list(timing["job"]) == [
        "table1/mnist-lenet-seed0",
        "table1/mnist-lenet-seed1",
        "appendix/mnist-small_cnn",
        "appendix/cifar100-resnet18",
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
    summed = summed_table(results.summed_group)
    assert list(summed["failed"]) == ["", "lissa: diverged"] and math.isnan(summed.iloc[1]["spearman"])
    assert results.failures() == ["summed_group: appendix/cifar100-resnet18: lissa: diverged"]


def test_the_gpu_table_reads_the_benchmarks_measurement(tmp_path):
    row = {"architecture": "lenet", "params": 5, "adam_step_s": 0.002, "loo_stack8_step_s": 0.004, "hours_per_model": 0.5}
    path = write_measurement(tmp_path / "gpu.json", [row])
    frame, meta = gpu_table(path)
    assert meta["device"] == "GPU X" and frame.iloc[0]["Adam step of 128 images (ms)"] == pytest.approx(2.0)
    assert gpu_table(tmp_path / "none.json") == (None, {})


def test_claims_follow_the_stated_rules_both_ways():
    def results(opt, init_sd, summed_sign, group_sign, *, stand_in=True, c100_arch="lenet"):
        models = tuple(
            _tp_model(f"o{i}", "lenet", 0, s, p, optimizer=name)
            for i, (name, (s, p)) in enumerate(zip(("adam", "gd", "nesterov", "rmsprop"), opt))
        )
        init = tuple(
            _tp_model(f"i{a}{s}", a, s, 0.5 + init_sd * (-1) ** s, 0.5) for a in ("small_cnn", "lenet") for s in range(2)
        )
        summed = (
            _summed_model("mnist", "small_cnn", summed_sign, group_sign),
            _summed_model("cifar100", c100_arch, summed_sign, group_sign, stand_in),
        )
        return AppendixResults(optimizer=models, init=init, summed_group=summed)

    close = [(0.5, 0.7), (0.6, 0.75), (0.55, 0.7), (0.6, 0.72)]  # Spearman mean 0.56, Pearson mean 0.72
    got = {c.key: c for c in claims(results(close, 0.05, 1, -1), stand_in={"mnist": False, "cifar100": True})}
    assert got["optimizer"].verdict == "reproduced" and got["optimizer"].value == pytest.approx(0.5625)
    assert got["init"].verdict == "reproduced" and got["init"].value == pytest.approx(np.std([0.55, 0.45], ddof=1))
    assert got["summed_mnist"].verdict == "reproduced" and got["summed_mnist"].ours.startswith("0.97 / 0.76")
    assert got["summed_cifar100"].verdict == "needs the real data set: run with `--profile paper`"
    assert "STAND-IN" in got["summed_cifar100"].ours and "STAND-IN" in got["group_cifar100"].ours
    assert got["group_mnist"].verdict == "reproduced with small CNN, not ResNet-18"  # every cell's Spearman is -1
    assert got["group_cifar100"].verdict == "needs the real data set: run with `--profile paper`"
    assert got["table2"].verdict.startswith("not comparable")

    far = [(0.9, 0.1), (0.95, 0.1), (0.9, 0.2), (0.92, 0.15)]
    got = {
        c.key: c
        for c in claims(
            results(far, 0.4, -1, 1, stand_in=False, c100_arch="resnet18"), stand_in={"mnist": False, "cifar100": False}
        )
    }
    assert got["optimizer"].verdict == "not reproduced" and got["init"].verdict == "not reproduced"
    assert got["summed_mnist"].verdict == "not reproduced"
    assert got["summed_cifar100"].verdict == "not reproduced"  # real data, ResNet-18: -0.97 / -0.76 against 0.15 / 0.11
    assert got["group_mnist"].verdict == "not reproduced with small CNN, not ResNet-18"  # every cell's Spearman is 1
    assert got["group_cifar100"].verdict == "not reproduced"

    half = [(0.56, 0.1), (0.56, 0.1), (0.56, 0.1), (0.56, 0.1)]  # Spearman on the paper's mean, Pearson far from it
    assert {c.key: c for c in claims(results(half, 0.25, 1, 1), stand_in={})}["optimizer"].verdict == "partly reproduced"
    assert {c.key: c for c in claims(results(half, 0.25, 1, 1), stand_in={})}["init"].verdict == "not reproduced"  # sd 0.35 > 0.3
    empty = {c.key: c for c in claims(AppendixResults(), stand_in={})}
    assert all(c.verdict.startswith(("not run", "not comparable")) for c in empty.values())


def test_observations_compare_the_studies_with_each_other():
    from fragile.chapters.appendix import observations

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
    text = observations(AppendixResults(optimizer=opt, init=init, summed_group=(_summed_model("mnist", "small_cnn", 1, 1),)))
    assert len(text) == 3
    assert f"sd {np.std([0.1, 0.9], ddof=1):.2f}" in text[0] and "larger than the seeds'" in text[0] and "visible" in text[0]
    assert "8.0× (adam), 0.5× (gd) the spread" in text[1] and "spread 1.0× (adam), 1.0× (gd) as widely" in text[1]
    assert "0.76 against 0.75" in text[2] and "from 1.00 to 1.00" in text[2]


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
