"""The MNIST/CIFAR-10 (Table 1) section's own logic: data and stand-ins, inputs, config checks, job keys, and that a
model job's numbers match independent computations (sequential leave-one-out, an exact estimator built here)."""

import dataclasses

import numpy as np
import pytest
import torch
from brute_force import retrained_change, write_measurement
from data_roots import write_cifar_root, write_mnist_root
from scipy import stats

from fragile import Objective, TrainSpec, fit, make_estimator
from fragile.chapters.mnist_cifar10 import (
    MnistCifar10Config,
    claims,
    estimator_comparison,
    lissa_depth_claim,
    models_table,
    paper_comparison,
    table1,
    weight_layers,
)
from fragile.chapters.results import Estimate, EstimatorFailure, Fit
from fragile.chapters.table1_protocol import (
    Comparison,
    Network,
    PointResult,
    Retraining,
    Table1Result,
    build_network,
    load_data,
    model_inputs,
    model_jobs,
    run_model,
)
from fragile.core.selection import choose_test_points
from fragile.core.selection import test_points_by_kind as points_by_kind  # not collected as a test
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


FIT = Fit(train_loss=0.1, train_accuracy=1.0, test_accuracy=0.9, grad_norm=0.01, seconds=1.0)


def _model(ds, arch, wd, seed, spearmans, stand_in=False, *, residuals=(0.5, 0.5), compared=()):
    """A finished Table 1 job whose test points have the Spearman ``spearmans`` (Pearson half of it) and LiSSA the
    solve ``residuals``."""
    points = tuple(
        PointResult(k, np.arange(3), np.ones(3), np.ones(3), np.ones(3), s, s / 2, s, compared)
        for k, s in zip(("highest loss", "median loss"), spearmans)
    )
    lissa = Estimate("lissa", np.ones((2, 20)), np.array(residuals), 2.0, lambda_max=3.0, scale=4.5)
    return Table1Result(
        network=Network(ds, arch, wd, seed, stand_in, 100, 20, 30, FIT, "cpu"),
        primary="lissa",
        test_points=np.arange(2),
        test_losses=np.ones(2),
        estimators={"lissa": lissa},
        retraining=Retraining(models=6, steps=3, drift=np.zeros(2), control_grad_norm=0.0, seconds=1.0),
        per_test_point=points,
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
    rows = models_table([ok, cg_failed, lissa_failed]).set_index(["architecture", "seed"])
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


def test_claims_follow_the_stated_rules():
    poor = [
        _model("mnist", "resnet50", 0.001, 0, [0.2, 0.2]),
        _model("mnist", "resnet50", 0.0, 0, [0.1, 0.2]),
        _model("cifar10", "vgg11", 0.001, 0, [0.3, 0.9], stand_in=True),
        _model("cifar10", "vgg11", 0.0, 0, [0.5, 0.2], stand_in=True),
    ]
    got = {c.key: c for c in claims(poor, stand_in={"cifar10": True})}
    assert got["resnet50"].verdict == "reproduced" and got["resnet50"].value == pytest.approx(0.175)
    assert got["varies"].verdict == "reproduced" and got["varies"].value == pytest.approx(0.8)
    assert got["vgg_wd"].verdict == "reproduced on the stand-in (not CIFAR-10)" and got["vgg_wd"].value == 1
    good = [
        _model("mnist", "resnet50", 0.001, 0, [0.9, 0.85]),
        _model("cifar10", "vgg11", 0.001, 0, [0.9, 0.9]),
        _model("cifar10", "vgg11", 0.0, 0, [0.8, 0.85]),
    ]
    got = {c.key: c for c in claims(good, stand_in={})}
    assert got["resnet50"].verdict == "not reproduced" and got["varies"].verdict == "not reproduced"
    assert got["vgg_wd"].verdict == "not reproduced"
    assert {c.key: c for c in claims(good[1:], stand_in={})}["resnet50"].verdict.startswith(
        "needs the real data set and a GPU: run with `--profile paper`"
    )
    assert {c.key: c for c in claims(good[:1], stand_in={})}["vgg_wd"].verdict.startswith(
        "needs the real data set: run with `--profile paper`"
    )


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


def test_lissa_depth_claim_orders_architectures_by_their_weight_layers():
    # counted from the networks: LeNet 2 conv + 3 fc; Koh & Liang's CNN 6 conv + 1 fc; VGG-11 8 conv + 1 fc;
    # ResNet-18 17 conv + 3 shortcut convs + 1 fc
    assert [weight_layers(a) for a in ("lenet", "small_cnn", "vgg11", "resnet18")] == [5, 7, 9, 21]

    def m(arch, residuals):
        return _model("mnist", arch, 0.001, 0, [0.5, 0.5], residuals=residuals)

    worse = [m("small_cnn", [0.25, 0.35]), m("lenet", [0.2]), m("vgg11", [0.5, 0.7]), m("small_cnn", [0.3])]
    got = lissa_depth_claim(worse)
    assert got.verdict == "reproduced" and got.value == pytest.approx(1.0) and "small_cnn (7 layers) 0.30" in got.ours
    better = [m("small_cnn", [0.5]), m("lenet", [0.9]), m("vgg11", [0.05])]
    assert lissa_depth_claim(better).verdict == "not reproduced" and lissa_depth_claim(better).value == pytest.approx(-1.0)
    assert lissa_depth_claim([m("small_cnn", [0.9]), m("lenet", [0.5]), m("vgg11", [0.2])]).verdict == "partly reproduced"
    assert lissa_depth_claim(worse[:2]).verdict.startswith("not run")
