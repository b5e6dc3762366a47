"""The ground truths beyond warm-started leave-one-out (docs/conventions.md#ground-truth): the proximal Bregman
response function against closed forms (the exact leave-one-out optimum of a convex model; the damped Gauss-Newton
influence of a small network to first order), cold-started leave-one-out against sequential retraining, and plain
gradient dot products."""

import numpy as np
import pytest
import torch

from fragile import Objective, TrainSpec, build_model, fit, loo_retrain_sequential, make_estimator
from fragile.core.ground_truth import loo_retrain, pbrf_retrain
from fragile.core.objective import bregman_cross_entropy
from fragile.data.datasets import synthetic_classification
from fragile.errors import InvalidArgumentError


def _trained(depth, seed=0, n=40, wd=0.01, steps=3000):
    data = synthetic_classification(n=n, num_features=4, num_classes=3, seed=seed)
    obj = Objective(build_model("mlp", seed=seed, in_features=4, num_classes=3, depth=depth, width=6, activation="tanh"), wd)
    theta = fit(obj, obj.initial_params(), data.x, data.y, TrainSpec("gd", lr=0.5, steps=steps), progress=False).params[0]
    if depth == 0:  # polished to the optimum, so that leave-one-out is an exact comparison
        theta = _minimise(lambda t: obj.train_loss(t, data.x, data.y), theta)
    return data, obj, theta


def _minimise(f, start, iterations=30):
    """Newton's method on a convex objective (a loss-based line search stalls at float64 resolution near the optimum)."""
    t = start.clone()
    for _ in range(iterations):
        t = t - torch.linalg.solve(torch.func.hessian(f)(t), torch.func.grad(f)(t))
    return t


def test_the_bregman_divergence_is_the_kl_and_vanishes_to_second_order():
    z_star, z = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    p_star = torch.softmax(z_star, -1)
    kl = (p_star * (torch.log_softmax(z_star, -1) - torch.log_softmax(z, -1))).sum(-1)
    torch.testing.assert_close(bregman_cross_entropy(z, z_star), kl)
    assert bregman_cross_entropy(z_star + 1e-4 * z, z_star).abs().max() < 1e-7


def test_pbrf_without_damping_is_the_exact_leave_one_out_optimum_of_a_convex_model():
    data, obj, theta = _trained(depth=0)
    x_test, y_test = data.x[:3], data.y[:3]
    res = pbrf_retrain(obj, theta, data.x, data.y, [4, 17], x_test, y_test, damping=0.0, tolerance=1e-13, max_iter=2000)
    n = data.x.shape[0]
    for k, m in enumerate([4, 17]):
        weights = torch.full((n,), n / (n - 1.0), dtype=theta.dtype)  # Σ_{j≠m} ℓ_j / n + wd/2‖θ‖² − (1/n)·wd/2‖θ‖², rescaled
        weights[m] = 0.0

        def loo_objective(t, weights=weights):
            return (obj.sample_losses(t, data.x, data.y) * weights).mean() * (n - 1.0) / n + obj.regulariser(t) * (n - 1.0) / n

        t = _minimise(loo_objective, theta)
        expected = obj.sample_losses(t, x_test, y_test) - obj.sample_losses(theta, x_test, y_test)
        torch.testing.assert_close(res.actual[k], expected, rtol=1e-4, atol=1e-9)  # L-BFGS stops at ‖∇F‖ ≈ 1e-9
    assert res.objective_grad_norm.max() < 1e-8 and torch.equal(res.drift, torch.zeros(3, dtype=theta.dtype))


def _gauss_newton(obj, theta, x):
    jac = torch.func.jacrev(lambda t: obj.logits(t, x))(theta)  # (n, c, p)
    s = torch.softmax(obj.logits(theta, x), -1)
    h_out = torch.diag_embed(s) - s[:, :, None] * s[:, None, :]
    return torch.einsum("nap,nab,nbq->pq", jac, h_out, jac) / x.shape[0]


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_pbrf_to_a_small_removal_weight_is_the_damped_gauss_newton_influence_to_first_order(damping):
    data, obj, theta = _trained(depth=1)
    n, m = data.x.shape[0], 7
    g = _gauss_newton(obj, theta, data.x)
    grad_m = obj.point_grads(theta, data.x[m : m + 1], data.y[m : m + 1])[0]
    first_order = torch.linalg.solve(g + (obj.weight_decay + damping) * torch.eye(g.shape[0], dtype=g.dtype), grad_m)
    errors, test_errors = [], []
    for scale in (1e-2, 1e-3):
        eps = scale / n
        res = pbrf_retrain(obj, theta, data.x, data.y, [m], data.x[:2], data.y[:2], damping=damping, epsilon=eps)
        # the result keeps ‖θ_m − θ*‖ and the test losses: both against the first-order response
        t_norm = res.param_change[0] / eps
        errors.append(abs(float(t_norm / first_order.norm()) - 1.0))
        g_test = obj.sample_grads(theta, data.x[:2], data.y[:2])
        predicted = eps * (g_test @ first_order)
        test_errors.append((res.actual[0] / predicted - 1.0).abs())
    assert errors[1] < 2e-3 and errors[1] < errors[0]  # the gap shrinks with the removal weight: first order
    # the test-loss changes too: within 1 % at the smaller weight, and the larger gap shrinks in proportion to the
    # weight (at least 5x for 10x), as a second-order remainder does (the smaller one can sit at the solves' floor)
    assert (test_errors[1] < 1e-2).all(), test_errors
    k = int(test_errors[0].argmax())
    assert test_errors[1][k] < test_errors[0][k] / 5, test_errors


def test_pbrf_refuses_bad_arguments_by_name():
    data, obj, theta = _trained(depth=0, steps=10)
    with pytest.raises(InvalidArgumentError, match="damping"):
        pbrf_retrain(obj, theta, data.x, data.y, [0], data.x[:1], data.y[:1], damping=-1.0)
    with pytest.raises(InvalidArgumentError, match="epsilon"):
        pbrf_retrain(obj, theta, data.x, data.y, [0], data.x[:1], data.y[:1], damping=0.0, epsilon=0.0)
    with pytest.raises(InvalidArgumentError, match="remove"):
        pbrf_retrain(obj, theta, data.x, data.y, [99], data.x[:1], data.y[:1], damping=0.0)
    with pytest.raises(InvalidArgumentError, match="fit_term='loss'.*bregman.*objective"):
        pbrf_retrain(obj, theta, data.x, data.y, [0], data.x[:1], data.y[:1], damping=0.0, fit_term="loss")


def test_cold_started_leave_one_out_retrains_from_the_initialisation_against_theta_star():
    data = synthetic_classification(n=30, num_features=4, num_classes=3, seed=2)
    obj = Objective(build_model("mlp", seed=2, in_features=4, num_classes=3, depth=1, width=5), 0.01)
    theta0 = obj.initial_params()
    spec = TrainSpec("sgd", lr=0.1, steps=60, batch_size=10, seed=3)
    theta_star = fit(obj, theta0, data.x, data.y, spec, progress=False).params[0]
    x_test, y_test = data.x[:2], data.y[:2]
    res = loo_retrain(obj, theta0, data.x, data.y, [1, 5], spec, x_test, y_test, chunk_size=2, progress=False).against_control()
    star = obj.sample_losses(theta_star, x_test, y_test)
    torch.testing.assert_close(res.test_loss_star, star, rtol=1e-9, atol=1e-12)  # the control reproduces θ*
    seq = loo_retrain_sequential(obj, theta0, data.x, data.y, [1, 5], spec, x_test, y_test, progress=False)
    torch.testing.assert_close(res.actual, seq.test_loss_removed - star, rtol=1e-7, atol=1e-10)
    assert torch.equal(res.drift, torch.zeros_like(res.drift))


def test_gradient_dot_products_are_the_training_and_test_gradients_dotted():
    data, obj, theta = _trained(depth=1, steps=200)
    est = make_estimator("grad_dot", obj, theta, data.x, data.y, damping=0.1)
    res = est.influences(data.x[:2], data.y[:2])
    g_test = obj.sample_grads(theta, data.x[:2], data.y[:2])
    g_train = obj.sample_grads(theta, data.x, data.y) + obj.weight_decay * theta  # ∇L includes the regulariser share
    torch.testing.assert_close(res.predicted, g_test @ g_train.T / data.x.shape[0], rtol=1e-9, atol=1e-12)
    h = torch.func.hessian(lambda t: obj.train_loss(t, data.x, data.y))(theta)
    expected = ((h + 0.1 * torch.eye(h.shape[0], dtype=h.dtype)) @ g_test.T - g_test.T).norm(dim=0) / g_test.norm(dim=1)
    torch.testing.assert_close(res.residuals, expected, rtol=1e-6, atol=1e-9)


def _convex_trained(n=40, wd=0.05, steps=1500):
    """Softmax regression trained by full-batch GD to its optimum: the cold-start control reaches θ* itself."""
    data = synthetic_classification(n=n, num_features=4, num_classes=3, seed=4)
    obj = Objective(build_model("mlp", seed=4, in_features=4, num_classes=3, depth=0), wd)
    spec = TrainSpec("gd", lr=1.0, steps=steps)
    theta0 = obj.initial_params()
    theta = fit(obj, theta0, data.x, data.y, spec, progress=False).params[0]
    return data, obj, theta0, theta, spec


def test_all_four_ground_truths_meet_the_exact_influence_as_the_removal_weight_vanishes():
    data, obj, theta0, theta, spec = _convex_trained()
    assert obj.grad(theta, data.x, data.y).norm() < 1e-12  # converged: warm starts have nothing left to drift
    n, remove = data.x.shape[0], [3, 11, 25]
    x_test, y_test = data.x[-4:], data.y[-4:]
    exact = make_estimator("exact", obj, theta, data.x, data.y, progress=False).influences(x_test, y_test, remove)
    warm_spec = spec.replace(steps=800)
    errors = {}
    for scale in (1.0, 0.01):
        eps = scale / n
        truths = {
            "warm": loo_retrain(
                obj, theta, data.x, data.y, remove, warm_spec, x_test, y_test, progress=False, removal_weight=eps
            ).actual,
            "drift-corrected": loo_retrain(
                obj, theta, data.x, data.y, remove, warm_spec, x_test, y_test, progress=False, removal_weight=eps
            )
            .against_control()
            .actual,
            "cold": loo_retrain(obj, theta0, data.x, data.y, remove, spec, x_test, y_test, progress=False, removal_weight=eps)
            .against_control()
            .actual,
            "pbrf": pbrf_retrain(
                obj, theta, data.x, data.y, remove, x_test, y_test, damping=0.0, epsilon=eps, tolerance=1e-14, max_iter=2000
            ).actual,
        }
        for name, actual in truths.items():  # (K, n_test) per unit of removal vs (n_test, K) predicted for ε = 1/n
            rel = float((actual.T / (n * eps) - exact.predicted).abs().max() / exact.predicted.abs().max())
            errors.setdefault(name, []).append(rel)
    for name, errs in errors.items():
        assert errs[0] > 1e-4, (name, errs)  # a whole removal is not first order: the comparison can fail
        assert errs[1] < 5e-3 and errs[1] < 0.03 * errs[0], (name, errs)  # the gap shrinks like ε: first order


def test_partial_removal_weights_batched_as_sequential_and_refused_outside_the_range():
    data, obj, theta0, theta, spec = _convex_trained(steps=50)
    short = spec.replace(steps=30)
    x_test, y_test = data.x[:2], data.y[:2]
    n = data.x.shape[0]
    batched = loo_retrain(obj, theta, data.x, data.y, [2, 9], short, x_test, y_test, progress=False, removal_weight=0.3 / n)
    seq = loo_retrain_sequential(
        obj, theta, data.x, data.y, [2, 9], short, x_test, y_test, progress=False, removal_weight=0.3 / n
    )
    torch.testing.assert_close(batched.test_loss_removed, seq.test_loss_removed, rtol=1e-10, atol=1e-13)
    # by hand: the weighted mean with weight 1 − nε on the point is (1/n)Σ L − ε L(z_m), rescaled
    w = torch.ones(n, dtype=theta.dtype)
    w[2] = 0.7
    by_hand = fit(obj, theta, data.x, data.y, short, weights=w, progress=False).params[0]
    torch.testing.assert_close(batched.test_loss_removed[0], obj.sample_losses(by_hand, x_test, y_test), rtol=1e-10, atol=1e-13)
    for bad in (0.0, -0.1, 2.0 / n):
        with pytest.raises(InvalidArgumentError, match="removal_weight"):
            loo_retrain(obj, theta, data.x, data.y, [2], short, x_test, y_test, progress=False, removal_weight=bad)


def test_drift_corrected_leave_one_out_is_measured_against_the_control():
    data = synthetic_classification(n=30, num_features=4, num_classes=3, seed=5)
    obj = Objective(build_model("mlp", seed=5, in_features=4, num_classes=3, depth=1, width=5), 0.01)
    spec = TrainSpec("sgd", lr=0.1, steps=40, batch_size=10, seed=1)
    theta = fit(obj, obj.initial_params(), data.x, data.y, spec, progress=False).params[0]  # far from converged
    paper = loo_retrain(obj, theta, data.x, data.y, [0, 7], spec, data.x[:3], data.y[:3], progress=False)
    corrected = paper.against_control()
    torch.testing.assert_close(corrected.actual, paper.actual - paper.drift, rtol=0, atol=1e-12)
    assert paper.drift.abs().max() > 1e-3 and torch.equal(corrected.drift, torch.zeros_like(corrected.drift))


def test_the_proximal_response_is_the_damped_influence_at_an_optimum_and_sees_non_convergence_elsewhere():
    data, obj, theta0, theta, spec = _convex_trained()
    n, m, damping = data.x.shape[0], 6, 0.3
    x_test, y_test = data.x[-3:], data.y[-3:]
    eps = 1e-3 / n
    damped = make_estimator("exact", obj, theta, data.x, data.y, damping=damping, progress=False).influences(x_test, y_test, [m])
    prox = pbrf_retrain(
        obj, theta, data.x, data.y, [m], x_test, y_test, damping=damping, fit_term="objective", epsilon=eps, tolerance=1e-14
    )
    np.testing.assert_allclose(prox.actual[0].numpy() / (n * eps), damped.predicted[:, 0].numpy(), rtol=2e-3)
    # away from the optimum the proximal response moves θ even for a vanishing removal; the PBRF does not
    early = fit(obj, theta0, data.x, data.y, spec.replace(steps=5), progress=False).params[0]
    g = obj.grad(early, data.x, data.y)
    prox0 = pbrf_retrain(obj, early, data.x, data.y, [m], x_test, y_test, damping=damping, fit_term="objective", epsilon=1e-9)
    pbrf0 = pbrf_retrain(obj, early, data.x, data.y, [m], x_test, y_test, damping=damping, epsilon=1e-9)
    h = torch.func.hessian(lambda t: obj.train_loss(t, data.x, data.y))(early)
    newton = torch.linalg.solve(h + damping * torch.eye(h.shape[0], dtype=h.dtype), g).norm()
    assert float(prox0.param_change[0]) > 0.3 * float(newton) and float(pbrf0.param_change[0]) < 1e-6


def test_exact_influence_on_the_gauss_newton_matrix():
    data, obj, theta = _trained(depth=1, steps=300)
    est = make_estimator("exact", obj, theta, data.x, data.y, damping=0.1, curvature="gauss_newton", progress=False).prepare()
    expected = _gauss_newton(obj, theta, data.x) + obj.weight_decay * torch.eye(obj.num_params, dtype=theta.dtype)
    torch.testing.assert_close(est.hessian, expected, rtol=1e-9, atol=1e-12)
    h = torch.func.hessian(lambda t: obj.train_loss(t, data.x, data.y))(theta)
    assert (est.hessian - h).abs().max() > 1e-3  # a hidden layer: the Gauss-Newton matrix is not the Hessian
    data0, obj0, theta_lin = _trained(depth=0)  # softmax regression: it is
    est0 = make_estimator("exact", obj0, theta_lin, data0.x, data0.y, curvature="gauss_newton", progress=False).prepare()
    torch.testing.assert_close(
        est0.hessian, torch.func.hessian(lambda t: obj0.train_loss(t, data0.x, data0.y))(theta_lin), rtol=1e-9, atol=1e-12
    )
    with pytest.raises(InvalidArgumentError, match="curvature"):
        make_estimator("exact", obj, theta, data.x, data.y, curvature="fisher")
