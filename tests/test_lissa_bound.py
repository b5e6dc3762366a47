"""LiSSA (and Arnoldi) refuse to return a solve whose final relative residual exceeds ``max_residual``.

The growth test ``‖h_j‖ > growth_tolerance·(j+1)·‖v‖`` catches a fast divergence only: with a scale a little below
λmax/2, or an eigenvalue of H + λI a little below zero, the iterate grows geometrically at a small rate and stays under
the linear bound for many steps, and the recursion used to return finite influences whose residuals were 417 or 36.9
with only a log warning. For the full-batch recursion the residual has a closed form, which these tests check the
solver's against: ``h_D = Σ_{k<=D} M^k v`` with ``M = I − (H+λI)/s``, so ``(H+λI)·h_D/s − v = −M^{D+1}v`` and the
relative residual is ``‖M^{D+1}v‖/‖v‖``, computed here from the exact Hessian's eigendecomposition.
"""

import math
import re

import pytest
import torch

from fragile import SolverDivergedError, make_estimator
from fragile.core.curvature import hessian_matrix, hvp
from fragile.core.solvers import LissaRecursion, arnoldi_eigenpairs, lissa_ihvps
from fragile.errors import InvalidArgumentError
from fragile.estimators import ArnoldiOptions, LissaOptions

N_TEST = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these HVPs take milliseconds, and on a busy machine a parallel region waits for its threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hessian(objective, theta, data):
    h = hessian_matrix(objective, theta, data.x, data.y)
    return 0.5 * (h + h.T)


def _closed_form_residuals(h, damping, scale, depth, vs):
    """``‖M^{depth+1} v‖/‖v‖`` per row, ``M = I − (H + λI)/s``: the full-batch LiSSA residual (module doc)."""
    evals, u = torch.linalg.eigh(h)
    m = 1.0 - (evals + damping) / scale
    coeffs = vs @ u
    return (coeffs * m ** (depth + 1)).norm(dim=1) / vs.norm(dim=1)


def _reported(exc: pytest.ExceptionInfo) -> float:
    return float(re.search(r"‖/‖v‖ = ([0-9.eE+-]+)", str(exc.value)).group(1))


def _lissa(objective, theta, data, **options):
    return make_estimator("lissa", objective, theta, data.x, data.y, progress=False, **options)


# -- (a) a scale below λmax/2: the recursion diverges slowly ------------------------------------------------------
def test_a_scale_below_half_lambda_max_raises_naming_max_residual_and_the_residual(mlp_problem):
    objective, theta, data = mlp_problem
    h, damping, depth = _hessian(objective, theta, data), 0.05, 50
    lam_max = float(torch.linalg.eigvalsh(h)[-1])
    scale = 0.49 * lam_max  # below (λmax + λ)/2: |1 − (λmax + λ)/s| = 1.10, too slow for the growth test in 50 steps
    assert scale < (lam_max + damping) / 2
    g = objective.sample_grads(theta, data.x[:N_TEST], data.y[:N_TEST])
    expected = _closed_form_residuals(h, damping, scale, depth, g)

    # (d) with max_residual=None the numbers come back: finite, the growth test passed them, residuals as computed.
    loose = _lissa(objective, theta, data, damping=damping, scale=scale, depth=depth, max_residual=None)
    res = loose.influences(data.x[:N_TEST], data.y[:N_TEST])
    assert torch.isfinite(res.predicted).all()
    torch.testing.assert_close(res.residuals, expected, rtol=1e-8, atol=0)
    assert res.residuals.tolist() == pytest.approx([7.023, 17.78, 152.3], rel=1e-3)  # what the default must refuse

    strict = _lissa(objective, theta, data, damping=damping, scale=scale, depth=depth)
    assert strict.options.max_residual == 10.0
    with pytest.raises(
        SolverDivergedError, match=r"^lissa: relative residual .* of right-hand side 1 of 3 exceeds max_residual=10 "
    ) as exc:
        strict.influences(data.x[:N_TEST], data.y[:N_TEST])
    assert _reported(exc) == pytest.approx(float(expected[1]), rel=1e-5)  # row 0 (7.0) is within the bound, row 1 is not
    assert f"depth {depth} × 1 repeat(s) with scale={scale:.4g}" in str(exc.value)
    # The one-vector path applies the bound too.
    with pytest.raises(SolverDivergedError, match=r"^lissa: relative residual ‖\(H \+ damping·I\)x − v‖/‖v‖ = [0-9.]+ exceeds"):
        strict.inverse_hvp(g[2])
    assert strict.inverse_hvp(g[0]).residual == pytest.approx(float(expected[0]), rel=1e-8)  # 7.0: within the bound
    # A bound above the worst residual lets the same solve through.
    assert _lissa(objective, theta, data, damping=damping, scale=scale, depth=depth, max_residual=200.0).influences(
        data.x[:N_TEST], data.y[:N_TEST]
    ).residuals.max() == pytest.approx(float(expected.max()), rel=1e-8)


# -- (b) an indefinite H + λI: a saddle, damped too little ---------------------------------------------------------
def test_an_indefinite_hessian_raises_after_many_steps(mlp_problem):
    objective, _, data = mlp_problem
    theta0 = objective.initial_params()  # untrained: far from a minimum, H has eigenvalues down to −3.11
    h = _hessian(objective, theta0, data)
    damping, depth = 3.1, 2000
    lowest = float(torch.linalg.eigvalsh(h)[0]) + damping
    # H + λI is indefinite by a small margin, so the divergence is slow: the iterate grows by 1 + 0.0134/s a step,
    # e^3.0 over the 2,000 steps, while the growth test allows 10·2001.
    assert -0.02 < lowest < 0
    g = objective.sample_grads(theta0, data.x[:N_TEST], data.y[:N_TEST])

    loose = _lissa(objective, theta0, data, damping=damping, depth=depth, max_residual=None)
    res = loose.influences(data.x[:N_TEST], data.y[:N_TEST])  # the growth test alone passes this: numbers come back
    assert torch.isfinite(res.predicted).all()
    expected = _closed_form_residuals(h, damping, loose.scale, depth, g)
    torch.testing.assert_close(res.residuals, expected, rtol=1e-8, atol=0)
    assert res.residuals.tolist() == pytest.approx([23.04, 13.56, 4.448], rel=1e-3)

    with pytest.raises(
        SolverDivergedError, match=r"^lissa: relative residual .* of right-hand side 0 of 3 exceeds max_residual=10 "
    ) as exc:
        _lissa(objective, theta0, data, damping=damping, depth=depth).influences(data.x[:N_TEST], data.y[:N_TEST])
    assert _reported(exc) == pytest.approx(float(expected[0]), rel=1e-5)
    assert "an eigenvalue <= 0" in str(exc.value) and "max_residual=None returns the numbers" in str(exc.value)
    # The solver called directly applies the same bound, and names the first row above it.
    recursion = LissaRecursion(n=len(data), damping=damping, scale=loose.scale, depth=depth)

    def matvecs(v, idx):
        return hvp(objective, theta0, data.x, data.y, v)

    with pytest.raises(SolverDivergedError, match="right-hand side 1 of 3 exceeds max_residual=10 ") as exc:
        lissa_ihvps(matvecs, g[[2, 1, 0]], recursion)  # residuals 4.4, 13.6, 23.0
    assert _reported(exc) == pytest.approx(float(expected[1]), rel=1e-5)


# -- (c) a well-posed problem passes, far inside the bound ---------------------------------------------------------
def test_a_well_posed_problem_does_not_raise_and_matches_exact(logistic_problem):
    objective, theta, data = logistic_problem  # convex, trained to convergence by Newton
    damping, depth = 0.01, 400
    h = _hessian(objective, theta, data)
    assert float(torch.linalg.eigvalsh(h)[0]) > 0
    est = _lissa(objective, theta, data, damping=damping, depth=depth)
    res = est.influences(data.x[:N_TEST], data.y[:N_TEST])
    g = objective.sample_grads(theta, data.x[:N_TEST], data.y[:N_TEST])
    torch.testing.assert_close(res.residuals, _closed_form_residuals(h, damping, est.scale, depth, g), rtol=1e-6, atol=1e-14)
    assert float(res.residuals.max()) < 1e-5 < est.options.max_residual
    exact = make_estimator("exact", objective, theta, data.x, data.y, damping=damping, progress=False)
    ref = exact.influences(data.x[:N_TEST], data.y[:N_TEST]).predicted
    assert float((res.predicted - ref).abs().max() / ref.abs().max()) < 1e-5
    # The bound is the one given: below the achieved residual, the same solve raises naming it.
    tight = 0.5 * float(res.residuals.max())
    with pytest.raises(SolverDivergedError, match=rf"exceeds max_residual={tight:g} "):
        _lissa(objective, theta, data, damping=damping, depth=depth, max_residual=tight).influences(
            data.x[:N_TEST], data.y[:N_TEST]
        )


# -- Arnoldi reports a residual too: the same bound ----------------------------------------------------------------
def test_arnoldi_with_inaccurate_eigenpairs_raises_naming_the_residual(mlp_problem):
    objective, _, data = mlp_problem
    theta0 = objective.initial_params()
    p = objective.num_params
    # Two Arnoldi steps estimate the lowest eigenvalue as −2.50 (it is −3.11); damping just short of +2.50 makes its
    # inverse weight −100, which amplifies the Ritz vector's error into the solve.
    ritz, vecs = arnoldi_eigenpairs(lambda v: hvp(objective, theta0, data.x, data.y, v), p, iterations=2, top=2)
    damping = -float(ritz[0]) - 0.01
    kw = dict(damping=damping, rank=2, iterations=2, progress=False)
    loose = make_estimator("arnoldi", objective, theta0, data.x, data.y, max_residual=None, **kw)
    res = loose.influences(data.x[:N_TEST], data.y[:N_TEST])
    g = objective.sample_grads(theta0, data.x[:N_TEST], data.y[:N_TEST])
    x = ((g @ vecs) / (ritz + damping)) @ vecs.T
    h = _hessian(objective, theta0, data)
    expected = (x @ h + damping * x - g).norm(dim=1) / g.norm(dim=1)
    torch.testing.assert_close(res.residuals, expected, rtol=1e-8, atol=0)
    assert res.residuals.tolist() == pytest.approx([42.25, 20.51, 0.97], abs=0.01)
    with pytest.raises(
        SolverDivergedError, match=r"^arnoldi: relative residual .* exceeds max_residual=10 .*rank 2 of p=31"
    ) as exc:
        make_estimator("arnoldi", objective, theta0, data.x, data.y, **kw).influences(data.x[:N_TEST], data.y[:N_TEST])
    assert _reported(exc) == pytest.approx(float(expected[0]), rel=1e-5)


# -- the option itself ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "10", True])
def test_max_residual_must_be_finite_and_positive_or_none(bad):
    for build in (
        lambda v: LissaOptions(max_residual=v),
        lambda v: ArnoldiOptions(max_residual=v),
        lambda v: LissaRecursion(n=10, damping=0.0, scale=1.0, depth=1, max_residual=v),
    ):
        with pytest.raises(InvalidArgumentError, match="max_residual="):
            build(bad)
        assert build(None).max_residual is None and build(2.5).max_residual == 2.5
    assert "max_residual" in LissaOptions.help() and "x = 0" in LissaOptions.help()["max_residual"]
    assert math.isclose(LissaOptions().max_residual, 10.0) and math.isclose(ArnoldiOptions().max_residual, 10.0)
