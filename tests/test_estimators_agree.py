"""exact, cg, lissa and arnoldi (full rank) must agree on a damped problem.

Tolerance 1e-3 relative (norm of the difference of the predicted-influence matrices over the norm of
the exact one). CG runs to a 1e-10 residual and full-rank Arnoldi is an exact eigendecomposition, so
both reach round-off; full-batch LiSSA converges geometrically at rate 1 − (λmin+λ)/scale, and the
depth below puts its truncation error far under 1e-3. Minibatch LiSSA adds sampling noise that only
averages out slowly, so it is checked against a looser bound.
"""

import pytest
import torch

from fragile import SolverDivergedError, make_estimator

DAMPING = 0.05


def _influences(problem, method, **options):
    objective, theta, data = problem
    est = make_estimator(method, objective, theta, data.x, data.y, damping=DAMPING, progress=False, **options)
    return est.influences(data.x[:2], data.y[:2], train_idxs=list(range(10))), est


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method,options", [("cg", {}), ("lissa", {"depth": 1500}), ("arnoldi", {})])
def test_methods_agree_with_exact(mlp_problem, method, options):
    exact, _ = _influences(mlp_problem, "exact")
    other, _ = _influences(mlp_problem, method, **options)
    assert _rel(other.predicted, exact.predicted) < 1e-3
    assert float(other.residuals.max()) < 1e-3
    assert float(exact.residuals.max()) < 1e-10


def test_exact_spectrum_matches_torch_hessian(mlp_problem):
    objective, theta, data = mlp_problem
    _, est = _influences(mlp_problem, "exact")
    ev = torch.linalg.eigvalsh(torch.func.hessian(objective.train_loss)(theta, data.x, data.y))
    assert est.spectrum.largest == pytest.approx(float(ev[-1]), rel=1e-9)
    assert est.spectrum.num_negative == int((ev < -est.spectrum.tolerance).sum())


def test_lissa_minibatch_is_close_but_noisy(mlp_problem):
    exact, _ = _influences(mlp_problem, "exact")
    noisy, _ = _influences(mlp_problem, "lissa", depth=600, repeats=4, batch_size=10, seed=3)
    assert _rel(noisy.predicted, exact.predicted) < 0.3


def test_low_rank_arnoldi_is_an_approximation(mlp_problem):
    exact, _ = _influences(mlp_problem, "exact")
    low, est = _influences(mlp_problem, "arnoldi", rank=3)
    assert est.eigenvectors.shape[1] == 3
    # Dropping the complement is a real approximation: visibly different, and its residual says so.
    assert _rel(low.predicted, exact.predicted) > 1e-3
    assert float(low.residuals.min()) > 1e-3


def test_lissa_divergence_raises(mlp_problem):
    with pytest.raises(SolverDivergedError, match="scale"):
        _influences(mlp_problem, "lissa", depth=500, scale=0.05)


def test_cg_refuses_indefinite_hessian(mlp_problem):
    objective, _, data = mlp_problem
    theta0 = objective.initial_params()  # untrained: saddle-like curvature
    exact = make_estimator("exact", objective, theta0, data.x, data.y, progress=False).prepare()
    assert exact.spectrum.smallest < -0.0, "precondition: the Hessian at initialisation must be indefinite"
    cg = make_estimator("cg", objective, theta0, data.x, data.y, damping=0.0, progress=False)
    with pytest.raises(SolverDivergedError, match="positive definite"):
        cg.influences(data.x[:1], data.y[:1])


def test_a_singular_damped_hessian_is_the_estimators_failure_on_that_model_not_a_bad_argument():
    from fragile import Objective, build_model, hessian_matrix
    from fragile.chapters.protocol import estimate
    from fragile.chapters.results import EstimatorFailure
    from fragile.core.solvers import spectral_inverse_weights
    from fragile.errors import InvalidArgumentError, SingularSystemError

    with pytest.raises(SingularSystemError, match="singular"):
        spectral_inverse_weights(torch.tensor([-0.25, 1.0], dtype=torch.float64), 0.25, "keep")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (30,), generator=g)
    objective = Objective(build_model("mlp", seed=0, in_features=3, num_classes=2, depth=1, width=4, activation="tanh"))
    theta = objective.initial_params() + torch.randn(objective.num_params, generator=g, dtype=torch.float64)
    smallest = float(torch.linalg.eigvalsh(hessian_matrix(objective, theta, x, y)).min())
    assert smallest < 0  # away from a minimum: the damping below cancels that eigenvalue exactly
    failed = estimate("exact", objective, theta, x, y, x[:2], y[:2], damping=-smallest, progress=False)
    assert isinstance(failed, EstimatorFailure) and "singular" in failed.message
    with pytest.raises(InvalidArgumentError):  # a bad argument is still the caller's mistake
        estimate("exact", objective, theta, x, y, x[:2], y[:2], damping=-1.0, progress=False)
