"""The objective's loss and measurement, and the estimators' typed options.

Cross-entropy through the open objective has the bits of explicit ``F.cross_entropy`` code; ``loss="mse"`` is checked
against the ridge normal equations (influence, leave-one-out, Gauss-Newton, EK-FAC, the PBRF) and against leave-one-out
retraining of a small regression MLP; a callable loss equal to cross-entropy reproduces the named one; computations that
need the loss's output Hessian refuse a callable one, naming ``loss``. Then the option dataclasses: their ranges, help
texts, JSON form, and how :func:`make_estimator` builds them from keywords.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from fragile import Objective, TrainSpec, build_model, correlation, fit, loo_retrain, loo_retrain_sequential, make_estimator
from fragile.core.curvature import gauss_newton_matrix, hvp
from fragile.core.ground_truth import pbrf_retrain
from fragile.core.objective import bregman_cross_entropy
from fragile.data.datasets import synthetic_classification
from fragile.errors import InvalidArgumentError
from fragile.estimators import (
    ESTIMATOR_ARGUMENTS,
    ESTIMATORS,
    METHODS,
    ArnoldiOptions,
    CGOptions,
    EKFACOptions,
    EstimatorOptions,
    ExactOptions,
    LissaOptions,
    SolvingEstimator,
    TracInOptions,
    methods,
)

WD = 0.05


def _ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


class LegacyCrossEntropy(Objective):
    """The objective's cross-entropy methods as they were written before the loss was opened, calling F.cross_entropy."""

    def sample_losses(self, theta, x, y):
        return F.cross_entropy(self.logits(theta, x), y, reduction="none")

    def stacked_train_losses(self, thetas, x, y):
        k = thetas.shape[0]
        z = vmap(self.logits, in_dims=(0, None))(thetas, x)
        losses = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.repeat(k), reduction="none").view(k, -1)
        return losses.mean(-1) + self.regulariser(thetas)

    def sample_grads(self, theta, x, y, grad_chunk=256):
        def one(t, xi, yi):
            return F.cross_entropy(self.logits(t, xi.unsqueeze(0)), yi.unsqueeze(0))

        return vmap(grad(one), in_dims=(None, 0, 0), chunk_size=grad_chunk)(theta, x, y)

    def point_grads(self, theta, x, y, grad_chunk=256):
        return self.sample_grads(theta, x, y, grad_chunk) + self.weight_decay * theta


@pytest.fixture(scope="module")
def classifier():
    data = synthetic_classification(30, num_features=3, num_classes=3, noise=1.5, seed=2)
    model = build_model("mlp", seed=0, in_features=3, num_classes=3, depth=1, width=4, activation="tanh")
    objective = Objective(model, weight_decay=0.01)
    theta = fit(objective, objective.initial_params(), data.x, data.y, TrainSpec(lr=0.5, steps=400), progress=False).params[0]
    return objective, theta, data


# -- (a) cross-entropy: the bits of explicit F.cross_entropy code --------------------------------------------------
def test_cross_entropy_has_the_bits_of_explicit_f_cross_entropy(classifier):
    objective, theta, data = classifier
    legacy = LegacyCrossEntropy(objective.model, objective.weight_decay)
    x, y = data.x, data.y
    assert torch.equal(objective.sample_losses(theta, x, y), F.cross_entropy(objective.logits(theta, x), y, reduction="none"))
    assert torch.equal(objective.measurements(theta, x, y), objective.sample_losses(theta, x, y))
    thetas = torch.stack([theta, 0.5 * theta, objective.initial_params()])
    assert torch.equal(objective.stacked_train_losses(thetas, x, y), legacy.stacked_train_losses(thetas, x, y))
    for chunk in (256, 7):
        assert torch.equal(objective.sample_grads(theta, x, y, chunk), legacy.sample_grads(theta, x, y, chunk))
        assert torch.equal(objective.point_grads(theta, x, y, chunk), legacy.point_grads(theta, x, y, chunk))
    v = torch.linspace(-1.0, 1.0, objective.num_params, dtype=theta.dtype)
    data_grad = grad(lambda t: F.cross_entropy(objective.logits(t, x), y, reduction="none").mean())
    assert torch.equal(hvp(objective, theta, x, y, v), objective.weight_decay * v + jvp(data_grad, (theta,), (v,))[1] * 1.0)
    for method, kw in (("exact", {}), ("cg", {"rtol": 1e-9})):
        ours = make_estimator(method, objective, theta, x, y, damping=0.05, progress=False, **kw).influences(x[:4], y[:4])
        ref = make_estimator(method, legacy, theta, x, y, damping=0.05, progress=False, **kw).influences(x[:4], y[:4])
        assert torch.equal(ours.predicted, ref.predicted) and torch.equal(ours.residuals, ref.residuals), method


# -- (b) mse against the ridge normal equations ---------------------------------------------------------------------
def _squared_error(outputs, targets):
    return (outputs[:, 0] - targets) ** 2


@pytest.fixture(scope="module")
def ridge():
    """Linear regression (nn.Linear, one output, float64) at the exact minimiser of mean ½(f − y)² + (wd/2)‖θ‖²."""
    n, d = 200, 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + 4, d, generator=gen, dtype=torch.float64)
    noise = torch.randn(n + 4, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.5 * noise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(d, 1).double()
    objective = Objective(model, WD, loss="mse", measurement=_squared_error)
    xt = torch.cat([x, torch.ones(n + 4, 1, dtype=torch.float64)], dim=1)  # θ = [w, b]: named_parameters() order
    theta = _ridge(xt[:n], y[:n])
    return objective, theta, x[:n], y[:n], x[n:], y[n:], xt[:n], xt[n:]


def _ridge(xt, y, down=None, eps=0.0):
    """The minimiser of ``(1/m)·Σ_j L(z_j) − eps·L(z_down)`` over the m rows, ``L = ½(x̃ᵀθ − y)² + (wd/2)‖θ‖²``: the
    normal equations ``(X̃ᵀX̃/m + wd·I − eps·(x̃x̃ᵀ + wd·I)) θ = X̃ᵀy/m − eps·x̃·y`` (x̃, y: row ``down``)."""
    m, eye = xt.shape[0], torch.eye(xt.shape[1], dtype=xt.dtype)
    lhs, rhs = xt.T @ xt / m + WD * eye, xt.T @ y / m
    if down is not None:
        lhs, rhs = lhs - eps * (torch.outer(xt[down], xt[down]) + WD * eye), rhs - eps * xt[down] * y[down]
    return torch.linalg.solve(lhs, rhs)


def test_mse_is_half_the_squared_error_and_its_gradient_vanishes_at_the_ridge_solution(ridge):
    objective, theta, x, y, *_ = ridge
    f = objective.logits(theta, x)[:, 0]
    torch.testing.assert_close(objective.sample_losses(theta, x, y), 0.5 * (f - y) ** 2, rtol=0, atol=0)
    assert float(objective.grad(theta, x, y).norm()) < 1e-12
    # The (n, d) form of the targets gives the same values as the (n,) form with a one-output model.
    assert torch.equal(objective.sample_losses(theta, x, y[:, None]), objective.sample_losses(theta, x, y))


def test_mse_exact_influence_is_the_normal_equations_closed_form_and_predicts_leave_one_out(ridge):
    objective, theta, x, y, x_test, y_test, xt, xt_test = ridge
    n = x.shape[0]
    est = make_estimator("exact", objective, theta, x, y, progress=False)
    res = est.influences(x_test, y_test)
    h = xt.T @ xt / n + WD * torch.eye(xt.shape[1], dtype=xt.dtype)
    torch.testing.assert_close(est.hessian, h, rtol=1e-12, atol=1e-13)
    g_train = (xt @ theta - y)[:, None] * xt + WD * theta  # ∇L(z_i) = (x̃ᵢᵀθ − yᵢ)x̃ᵢ + wd·θ
    g_test = 2 * (xt_test @ theta - y_test)[:, None] * xt_test  # the measurement (f − y)², not the loss
    closed = g_test @ torch.linalg.solve(h, g_train.T) / n
    torch.testing.assert_close(res.predicted, closed, rtol=1e-10, atol=1e-14)
    changes = torch.linalg.solve(h, g_train.T).T / n
    torch.testing.assert_close(est.predicted_param_changes(range(n)), changes, rtol=1e-10, atol=1e-14)
    star = objective.measurements(theta, x_test, y_test)
    # To first order: down-weighting point i by eps in the normal equations changes the measurement by
    # eps·n·predicted[:, i]; a central difference in eps leaves O(eps²).
    eps = 1e-4 / n

    def measured(i, e):
        return objective.measurements(_ridge(xt, y, i, e), x_test, y_test)

    tangent = torch.stack([measured(i, eps) - measured(i, -eps) for i in range(n)], dim=1) / (2 * eps * n)
    torch.testing.assert_close(tangent, res.predicted, rtol=1e-6, atol=1e-9 * float(res.predicted.abs().max()))
    # Leave-one-out by an exact solve: the ridge normal equations without row i (the mean over n − 1 rows).
    keep = torch.ones(n, dtype=torch.bool)
    actual = torch.empty(x_test.shape[0], n, dtype=torch.float64)
    for i in range(n):
        keep[i] = False
        actual[:, i] = objective.measurements(_ridge(xt[keep], y[keep]), x_test, y_test) - star
        keep[i] = True
    # The removal is not infinitesimal: leverage and the measurement's curvature make a second-order gap (measured:
    # 7.8% of the largest change at n = 200, Pearson >= 0.992 and Spearman >= 0.9999 per test point).
    gap = (res.predicted - actual).abs().max() / actual.abs().max()
    assert float(gap) < 0.15, f"max |predicted − actual| / max |actual| = {float(gap):.4f}"
    for t in range(x_test.shape[0]):
        assert correlation(res.predicted[t], actual[t], "pearson") > 0.98, t
        assert correlation(res.predicted[t], actual[t]) > 0.995, t


def test_mse_leave_one_out_retraining_reaches_the_normal_equations(ridge):
    objective, theta, x, y, x_test, y_test, xt, _ = ridge
    lam_max = float(torch.linalg.eigvalsh(xt.T @ xt / x.shape[0])[-1]) + WD
    spec = TrainSpec("gd", lr=1.0 / lam_max, steps=1500)
    res = loo_retrain(objective, theta, x, y, [0, 7, 31], spec, x_test, y_test, keep_params=True, progress=False)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    for row, i in enumerate([0, 7, 31]):
        keep[i] = False
        torch.testing.assert_close(res.params_removed[row], _ridge(xt[keep], y[keep]), rtol=1e-9, atol=1e-10)
        keep[i] = True
    torch.testing.assert_close(res.test_loss_control, res.test_loss_star, rtol=1e-10, atol=1e-12)  # θ* is the optimum


def _regression_mlp(seed=3, n=40):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 5, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.1 * torch.randn(n + 5, generator=gen, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return model, x[:n], y[:n], x[n:], y[n:]


def test_mse_influence_of_a_regression_mlp_ranks_leave_one_out_retraining():
    model, x, y, x_test, y_test = _regression_mlp()
    objective = Objective(model, WD, loss="mse")
    theta = fit(objective, objective.initial_params(), x, y, TrainSpec("gd", lr=0.5, steps=2000), progress=False).params[0]
    assert float(objective.grad(theta, x, y).norm()) < 1e-6
    t = int(objective.sample_losses(theta, x_test, y_test).argmax())
    est = make_estimator("exact", objective, theta, x, y, progress=False)
    pred = est.influences(x_test[t : t + 1], y_test[t : t + 1]).predicted[0]
    remove = torch.argsort(pred.abs(), descending=True)[:12]
    loo = loo_retrain_sequential(
        objective, theta, x, y, remove, TrainSpec("gd", lr=0.5, steps=300), x_test[t : t + 1], y_test[t : t + 1], progress=False
    )
    # Measured: Spearman 0.986 and Pearson 0.994 (0.986-0.988 for 10-15 points and 300-600 retraining steps).
    rho = correlation(pred[remove], loo.actual[:, 0])
    assert rho > 0.9, f"Spearman(predicted, actual) = {rho:.4f}"
    assert correlation(pred[remove], loo.actual[:, 0], "pearson") > 0.95


# -- (c) a callable loss equal to cross-entropy ---------------------------------------------------------------------
def test_a_callable_cross_entropy_reproduces_the_named_one(classifier):
    objective, theta, data = classifier
    custom = Objective(objective.model, objective.weight_decay, loss=_ce)
    assert custom.loss_name == "callable" and custom.with_weight_decay(0.1).loss is _ce
    x, y = data.x, data.y
    assert torch.equal(custom.sample_losses(theta, x, y), objective.sample_losses(theta, x, y))
    assert torch.equal(custom.sample_grads(theta, x, y), objective.sample_grads(theta, x, y))
    assert torch.equal(hvp(custom, theta, x, y, theta), hvp(objective, theta, x, y, theta))
    spec = TrainSpec(lr=0.5, steps=30)
    # Training takes a named loss feature-major on an MLP (fragile.core.stacked_mlp) and a callable on rows: the same
    # to rounding, not bit for bit.
    torch.testing.assert_close(
        fit(custom, objective.initial_params(), x, y, spec, progress=False).params,
        fit(objective, objective.initial_params(), x, y, spec, progress=False).params,
        rtol=1e-12,
        atol=1e-14,
    )
    for method in ("exact", "cg", "grad_dot"):
        a = make_estimator(method, custom, theta, x, y, damping=0.05, progress=False).influences(x[:3], y[:3])
        b = make_estimator(method, objective, theta, x, y, damping=0.05, progress=False).influences(x[:3], y[:3])
        assert torch.equal(a.predicted, b.predicted) and torch.equal(a.residuals, b.residuals), method
    a = loo_retrain(custom, theta, x, y, [0, 4], spec, x[:3], y[:3], progress=False)
    b = loo_retrain(objective, theta, x, y, [0, 4], spec, x[:3], y[:3], progress=False)
    torch.testing.assert_close(a.test_loss_removed, b.test_loss_removed, rtol=1e-12, atol=1e-14)
    # The Bregman divergence of a callable loss (by autograd) is the closed form's, up to round-off.
    z_star = objective.logits(theta, x)
    z = torch.stack([objective.logits(0.9 * theta, x), objective.logits(theta + 0.01, x)])
    torch.testing.assert_close(custom.output_bregman(z, z_star, y), bregman_cross_entropy(z, z_star), rtol=1e-10, atol=1e-13)


def test_a_measurement_enters_the_test_side_only(classifier):
    objective, theta, data = classifier
    margin = Objective(objective.model, objective.weight_decay, measurement=lambda z, t: z.gather(1, t[:, None])[:, 0])
    x, y = data.x, data.y
    assert torch.equal(margin.point_grads(theta, x, y), objective.point_grads(theta, x, y))
    assert torch.equal(margin.train_loss(theta, x, y), objective.train_loss(theta, x, y))
    assert torch.equal(margin.measurements(theta, x, y), objective.logits(theta, x).gather(1, y[:, None])[:, 0])
    jac = torch.func.jacrev(lambda t: objective.logits(t, x[:2]))(theta)  # (2, C, p)
    torch.testing.assert_close(margin.sample_grads(theta, x[:2], y[:2]), jac[torch.arange(2), y[:2]], rtol=1e-12, atol=1e-14)
    assert margin.with_weight_decay(0.0).measurement is margin.measurement


def test_bad_losses_and_targets_are_refused_naming_them(classifier, ridge):
    objective, theta, data = classifier
    with pytest.raises(InvalidArgumentError, match=r"loss='hinge' is not allowed.*\['cross_entropy', 'mse'\]"):
        Objective(objective.model, loss="hinge")
    with pytest.raises(InvalidArgumentError, match="measurement=3"):
        Objective(objective.model, measurement=3)
    with pytest.raises(InvalidArgumentError, match="y_train has dtype torch.float64; class labels must be integers"):
        make_estimator("exact", objective, theta, data.x, data.y.double())
    mean_loss = Objective(objective.model, loss=lambda z, t: _ce(z, t).mean())
    with pytest.raises(InvalidArgumentError, match=r"returned \(\); it must return one value per row"):
        mean_loss.sample_losses(theta, data.x, data.y)
    reg, theta_r, x, y, *_ = ridge
    with pytest.raises(InvalidArgumentError, match="y has dtype torch.int64; regression targets must be floating point"):
        fit(reg, theta_r, x, y.long(), TrainSpec(lr=0.1, steps=1), progress=False)
    with pytest.raises(InvalidArgumentError, match=r"loss='mse' needs outputs and targets of one shape"):
        reg.sample_losses(theta_r, x, torch.zeros(x.shape[0], 2, dtype=torch.float64))


# -- (d) Gauss-Newton and EK-FAC with mse; a callable loss refused -------------------------------------------------
def test_gauss_newton_and_ekfac_with_mse_match_the_explicit_matrices(ridge):
    objective, theta, x, y, x_test, y_test, xt, _ = ridge
    h = xt.T @ xt / x.shape[0] + WD * torch.eye(xt.shape[1], dtype=xt.dtype)  # linear model: G = H
    torch.testing.assert_close(gauss_newton_matrix(objective, theta, x, data_chunk=7), h, rtol=1e-12, atol=1e-13)
    exact = make_estimator("exact", objective, theta, x, y, damping=0.01, progress=False).influences(x_test, y_test)
    ekfac = make_estimator("ekfac", objective, theta, x, y, damping=0.01, progress=False).influences(x_test, y_test)
    torch.testing.assert_close(ekfac.predicted, exact.predicted, rtol=1e-9, atol=1e-13)  # one layer, S = I: EK-FAC is exact
    # A hidden layer: G = (1/n) Σ JᵢᵀJᵢ + wd·I, no longer the Hessian.
    model, xm, ym, *_ = _regression_mlp(n=12)
    mlp = Objective(model, WD, loss="mse")
    t = mlp.initial_params()
    jac = torch.func.jacrev(lambda p: mlp.logits(p, xm))(t).reshape(xm.shape[0], -1)
    expected = jac.T @ jac / xm.shape[0] + WD * torch.eye(mlp.num_params, dtype=t.dtype)
    torch.testing.assert_close(gauss_newton_matrix(mlp, t, xm, data_chunk=5), expected, rtol=1e-11, atol=1e-13)
    est = make_estimator("exact", mlp, t, xm, ym, curvature="gauss_newton", progress=False).prepare()
    torch.testing.assert_close(est.hessian, expected, rtol=1e-11, atol=1e-13)


def test_pbrf_with_mse_of_a_linear_model_is_the_quadratic_problem_solved_exactly(ridge):
    objective, theta, x, y, x_test, y_test, xt, _ = ridge
    n, damping, m = x.shape[0], 0.02, 5
    res = pbrf_retrain(objective, theta, x, y, [m], x_test, y_test, damping=damping)
    # min (1/n)Σ½(x̃ᵀ(θ−θ*))² + ((wd+λ)/2)‖θ−θ*‖² − (1/n)·L(z_m, θ): quadratic, so one linear solve from θ*.
    eye = torch.eye(xt.shape[1], dtype=xt.dtype)
    g = xt.T @ xt / n + (WD + damping) * eye
    h_m = xt[m : m + 1].T @ xt[m : m + 1] + WD * eye
    grad_m = (xt[m] @ theta - y[m]) * xt[m] + WD * theta
    theta_m = theta + torch.linalg.solve(g - h_m / n, grad_m / n)
    torch.testing.assert_close(res.test_loss_removed[0], objective.measurements(theta_m, x_test, y_test), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    "build",
    [
        lambda o, t, x, y: gauss_newton_matrix(o, t, x),
        lambda o, t, x, y: make_estimator("exact", o, t, x, y, curvature="gauss_newton"),
        lambda o, t, x, y: make_estimator("ekfac", o, t, x, y, damping=0.1),
    ],
    ids=["gauss_newton_matrix", "exact_gauss_newton", "ekfac"],
)
def test_output_hessian_computations_refuse_a_callable_loss_naming_it(classifier, build):
    objective, theta, data = classifier
    custom = Objective(objective.model, objective.weight_decay, loss=_ce)
    with pytest.raises(InvalidArgumentError, match=r"loss=<function _ce.*is not supported by .*\['cross_entropy', 'mse'\]"):
        build(custom, theta, data.x, data.y)


# -- (e) typed options ------------------------------------------------------------------------------------------------
OPTION_CLASSES = (ExactOptions, CGOptions, LissaOptions, ArnoldiOptions, EKFACOptions, TracInOptions)
CHECKPOINTS = torch.zeros(2, 31, dtype=torch.float64)


@pytest.mark.parametrize(
    "cls,field,value",
    [
        (ExactOptions, "negative", "flip"),
        (ExactOptions, "vector_chunk", 0),
        (ExactOptions, "curvature", "fisher"),
        (CGOptions, "rtol", 0.0),
        (CGOptions, "max_iter", 0),
        (CGOptions, "vector_chunk", 1.5),
        (LissaOptions, "depth", 0),
        (LissaOptions, "repeats", 0),
        (LissaOptions, "batch_size", 0),
        (LissaOptions, "scale", -1.0),
        (LissaOptions, "scale_margin", float("inf")),
        (LissaOptions, "power_rtol", 0),
        (LissaOptions, "seed", -1),
        (LissaOptions, "growth_tolerance", float("nan")),
        (LissaOptions, "vector_chunk", 0),
        (ArnoldiOptions, "rank", 0),
        (ArnoldiOptions, "iterations", 0),
        (ArnoldiOptions, "negative", "flip"),
        (ArnoldiOptions, "seed", True),
        (EKFACOptions, "vector_chunk", 0),
        (TracInOptions, "checkpoints", torch.zeros(3)),
        (TracInOptions, "lrs", [0.1, 0.0]),
    ],
)
def test_every_option_refuses_an_out_of_range_value_naming_the_field(cls, field, value):
    base = {"checkpoints": CHECKPOINTS} if cls is TracInOptions else {}
    with pytest.raises(InvalidArgumentError, match=field):
        cls(**{**base, field: value})


def test_every_option_field_has_help_and_the_options_are_frozen_and_json_friendly():
    assert set(OPTION_CLASSES) == {ESTIMATORS[m].Options for m in methods()} - {None}
    for cls in OPTION_CLASSES:
        assert issubclass(cls, EstimatorOptions) and dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 20, (cls.__name__, f.name)
        options = cls(checkpoints=CHECKPOINTS, lrs=torch.tensor([0.5, 2.0])) if cls is TracInOptions else cls()
        assert set(cls.help()) == set(options.to_dict())
        json.dumps(options.to_dict())
        with pytest.raises(dataclasses.FrozenInstanceError):
            options.__setattr__(dataclasses.fields(cls)[0].name, None)
    assert TracInOptions(checkpoints=CHECKPOINTS, lrs=torch.tensor([0.5, 2.0])).lrs == (0.5, 2.0)
    key = TracInOptions(checkpoints=CHECKPOINTS).to_dict()["checkpoints"]
    assert key["shape"] == [2, 31] and key["dtype"] == "float64" and len(key["sha256"]) == 64


def test_methods_are_registered_in_order_and_only_solvers_have_solver_methods(classifier):
    assert METHODS == ("exact", "cg", "lissa", "arnoldi", "grad_dot", "ekfac", "tracin") == methods()
    assert {m for m in METHODS if issubclass(ESTIMATORS[m], SolvingEstimator)} == {"exact", "cg", "lissa", "arnoldi", "ekfac"}
    objective, theta, data = classifier
    dot = make_estimator("grad_dot", objective, theta, data.x, data.y)
    assert not any(hasattr(dot, m) for m in ("hvp", "inverse_hvp", "inverse_hvps", "predicted_param_changes"))


def test_make_estimator_refuses_unknown_keywords_naming_them_and_the_allowed_ones(classifier):
    objective, theta, data = classifier
    allowed = sorted((*ESTIMATOR_ARGUMENTS, "rtol", "max_iter", "vector_chunk"))
    with pytest.raises(InvalidArgumentError, match=r"unknown option\(s\) \['depht', 'tol'\] for method='cg'; allowed: ") as info:
        make_estimator("cg", objective, theta, data.x, data.y, depht=3, tol=1e-3)
    assert str(allowed) in str(info.value)
    with pytest.raises(InvalidArgumentError, match=r"unknown option\(s\) \['rank'\] for method='grad_dot'"):
        make_estimator("grad_dot", objective, theta, data.x, data.y, rank=2)
    with pytest.raises(InvalidArgumentError, match="give a CGOptions"):
        make_estimator("cg", objective, theta, data.x, data.y, options=ExactOptions())
    with pytest.raises(InvalidArgumentError, match="method='grad_dot' takes no options"):
        make_estimator("grad_dot", objective, theta, data.x, data.y, options=CGOptions())
    with pytest.raises(InvalidArgumentError, match=r"options= and the option keywords \['rtol'\] were both given"):
        make_estimator("cg", objective, theta, data.x, data.y, options=CGOptions(), rtol=1e-3)
    with pytest.raises(InvalidArgumentError, match="grad_chunk=0"):
        make_estimator("cg", objective, theta, data.x, data.y, grad_chunk=0)


@pytest.mark.parametrize(
    "method,options",
    [
        ("exact", ExactOptions(negative="abs", vector_chunk=5)),
        ("cg", CGOptions(rtol=1e-8, max_iter=40, vector_chunk=3)),
        ("lissa", LissaOptions(depth=20, batch_size=9, repeats=2, seed=1, power_rtol=1e-3, vector_chunk=2)),
        ("arnoldi", ArnoldiOptions(rank=5, seed=2)),
        ("ekfac", EKFACOptions(vector_chunk=2)),
        ("tracin", None),
    ],
)
def test_options_instance_and_keywords_give_the_same_bits(classifier, method, options):
    objective, theta, data = classifier
    if method == "tracin":
        options = TracInOptions(checkpoints=torch.stack([objective.initial_params(), theta]), lrs=[0.5, 1.0])
    kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    common = {"damping": 0.05, "progress": False, "grad_chunk": 7}
    by_instance = make_estimator(method, objective, theta, data.x, data.y, options=options, **common)
    by_keywords = make_estimator(method, objective, theta, data.x, data.y, **kwargs, **common)
    a, b = by_instance.influences(data.x[:3], data.y[:3]), by_keywords.influences(data.x[:3], data.y[:3])
    assert torch.equal(a.predicted, b.predicted)
    assert torch.equal(a.residuals, b.residuals) or bool(torch.isnan(a.residuals).all() and torch.isnan(b.residuals).all())
    assert a.details == b.details and by_instance.options is options
