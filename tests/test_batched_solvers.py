"""Batched CG and LiSSA (all right-hand sides together, one vmapped HVP per iteration) against one at a time.

The reference is the one-vector code as it was before batching (commit 7054d4f), copied below (verbatim but for
the names and LiSSA's shortened error message), so the batched solvers are checked against the previous behaviour
rather than against themselves with m = 1. Where the arithmetic is identical (LiSSA given an HVP applied row by row)
the results are bitwise equal; with the vmapped HVP, which may sum in another order than a single one, they agree
to 1e-10 relative on the float64 tanh MLP. The right-hand sides differ in difficulty (a Hessian eigenvector
converges in one CG step, a mix of three eigenvectors in three, a gradient in many, a zero vector in none), so CG's
rows stop at different iterations and leave the batch one by one.
"""

import math

import pytest
import torch

from fragile import (
    Objective,
    SolverDivergedError,
    TrainSpec,
    build_model,
    fit,
    make_estimator,
    synthetic_classification,
)
from fragile.core.curvature import hessian_matrix, hvp
from fragile.core.solvers import (
    LissaRecursion,
    cg_solve,
    cg_solve_many,
    lissa_ihvps,
    relative_residual,
    solve_in_chunks,
)
from fragile.errors import InvalidArgumentError

DAMPING = 0.05
RTOL = 1e-10  # batched vs one at a time, relative (round-off of the HVP's summation order)
# CG is compared converged to float64's floor, where both runs lie within rtol·cond(H + λI) ≈ 3e-11 of the solution.
# Part-way, CG's iterates are themselves sensitive to round-off: perturbing the one-at-a-time run's HVP by one unit
# in the last place moves its iterate by up to 1.6e-8 at rtol 1e-6 (measured), so comparing there at 1e-10 would
# test round-off luck, not the algorithm. (Truncated at 4 steps, there is too little amplification to matter.)
CG_RTOL = 1e-12


# -- the one-vector solvers as they were before batching (commit 7054d4f), verbatim but for the names --------------
def _cg_reference(matvec, v, *, damping=0.0, rtol=1e-10, max_iter=None):
    p = v.numel()
    max_iter = 2 * p if max_iter is None else max_iter

    def a(z):
        return matvec(z) + damping * z

    x = torch.zeros_like(v)
    r = v.clone()
    d = r.clone()
    rs = float(r @ r)
    target = (rtol * float(v.norm())) ** 2
    it = 0
    while it < max_iter and rs > target:
        ad = a(d)
        curv = float(d @ ad)
        if not curv > 0 or not math.isfinite(curv):
            raise SolverDivergedError(
                f"cg: H + damping·I is not positive definite (curvature {curv:.3g} along a search direction, "
                f"iteration {it}); increase damping (now {damping}) or use method='exact' with a negative-eigenvalue policy"
            )
        alpha = rs / curv
        x = x + alpha * d
        r = r - alpha * ad
        rs_new = float(r @ r)
        d = r + (rs_new / rs) * d
        rs = rs_new
        it += 1
    return x, relative_residual(matvec, damping, x, v), it


def _lissa_reference(
    batch_matvec, v, *, n, damping, scale, depth, repeats=1, batch_size=None, seed=0, growth_tolerance=10.0, exact_matvec=None
):
    gen = torch.Generator().manual_seed(seed)
    v_norm = float(v.norm())
    total = torch.zeros_like(v)
    for rep in range(repeats):
        h = v.clone()
        for j in range(1, depth + 1):
            idx = None if batch_size is None else torch.randint(0, n, (batch_size,), generator=gen)
            h = v + h - (batch_matvec(h, idx) + damping * h) / scale
            h_norm = float(h.norm())
            if not math.isfinite(h_norm) or h_norm > growth_tolerance * (j + 1) * max(v_norm, 1e-300):
                raise SolverDivergedError(f"lissa diverged at recursion step {j} of repeat {rep}")
        total += h / scale
    x = total / repeats
    matvec = exact_matvec if exact_matvec is not None else (lambda z: batch_matvec(z, None))
    return x, relative_residual(matvec, damping, x, v), depth * repeats


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module. These HVPs are tiny (a few ms), and with torch's default of one thread per
    core, on a machine that other jobs keep busy, each parallel region waits for a descheduled thread: measured 4 ms
    per HVP on one thread against 130 ms on two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mlp(one_thread):
    """conftest's mlp_problem (a 1-hidden-layer tanh MLP, weight decay 0.01), built here on one thread and trained for
    600 gradient-descent steps instead of 1,500: enough for H + 0.05·I to be positive definite (checked in ``setup``)."""
    data = synthetic_classification(30, num_features=3, num_classes=3, noise=1.5, seed=2)
    model = build_model("mlp", seed=0, in_features=3, num_classes=3, depth=1, width=4, activation="tanh")
    objective = Objective(model, weight_decay=0.01)
    theta = fit(objective, objective.initial_params(), data.x, data.y, TrainSpec(lr=0.5, steps=600), progress=False).params[0]
    return objective, theta, data


@pytest.fixture(scope="module")
def setup(mlp):
    """The MLP's HVP, its damped Hessian's eigenvectors, and right-hand sides of graded difficulty."""
    objective, theta, data = mlp
    x, y = data.x, data.y

    def matvec(v):
        return hvp(objective, theta, x, y, v)

    def batch_matvec(v, idx):
        return matvec(v) if idx is None else hvp(objective, theta, x[idx], y[idx], v)

    h = hessian_matrix(objective, theta, x, y)
    evals, evecs = torch.linalg.eigh(0.5 * (h + h.T))
    assert float(evals[0]) + DAMPING > 0, "precondition: H + damping·I positive definite at the trained θ"
    g = objective.sample_grads(theta, x[:3], y[:3])
    vs = torch.stack(
        [
            g[0],  # a test gradient: many iterations
            3.0 * evecs[:, -1],  # one eigenvector: CG converges in one step
            evecs[:, [-1, -5, -9]].sum(dim=1),  # three eigenvectors: three steps
            torch.zeros_like(g[0]),  # nothing to solve: zero steps, x = 0
            g[1] - 2.0 * g[2],  # another gradient
        ]
    )
    return objective, theta, data, matvec, batch_matvec, vs, evals, evecs


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# -- CG ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_iter", [None, 4])
def test_cg_batched_equals_one_at_a_time(setup, max_iter):
    *_, matvec, _, vs, _, _ = setup
    sizes = []

    def counting(v):  # records how many rows each batched HVP carries (converged rows must leave the batch)
        sizes.append(v.shape[0])
        return matvec(v)

    batched = cg_solve_many(counting, vs, damping=DAMPING, rtol=CG_RTOL, max_iter=max_iter)
    its = batched.iterations.tolist()
    for i, v in enumerate(vs):
        x, residual, iterations = _cg_reference(matvec, v, damping=DAMPING, rtol=CG_RTOL, max_iter=max_iter)
        one = cg_solve(matvec, v, damping=DAMPING, rtol=CG_RTOL, max_iter=max_iter)  # the one-vector entry point
        if iterations == 0:
            assert its[i] == one.iterations == 0 and not bool(batched.x[i].any()) and float(batched.residuals[i]) == 0.0
            continue
        # The same stopping rule: the same count, or one apart where a row's residual crosses the threshold within
        # round-off (a vmapped HVP sums in another order than a single one).
        assert abs(its[i] - iterations) <= 1 and abs(one.iterations - iterations) <= 1, i
        assert _rel(batched.x[i], x) <= RTOL and _rel(one.x, x) <= RTOL, i
        if max_iter is None:
            assert float(batched.residuals[i]) < 1e-11 and residual < 1e-11, i
        else:
            assert float(batched.residuals[i]) == pytest.approx(residual, rel=1e-6)
    if max_iter is None:
        assert its[1] == 1 and its[2] == 3 and its[3] == 0 and its[0] > 10 and its[4] > 10, its  # graded, as built
    else:
        assert its == [4, 1, 3, 0, 4], its  # truncated rows return their iterate; the residual says so
        assert float(batched.residuals[0]) > 1e-6
    # One batched HVP per iteration over the rows still running, then one over all rows for the residuals.
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True) and sizes[-1] == len(vs)
    assert sum(sizes[:-1]) == sum(its) and len(sizes) - 1 == max(its)


def test_cg_negative_curvature_names_the_row(setup):
    *_, matvec, _, _, evals, evecs = setup
    # Without damping, shifted so that exactly the lowest eigenvalue is negative: row 0 (top eigenvector) converges
    # at once and is frozen, row 1 (bottom eigenvector) meets negative curvature at its first step.
    shift = 0.5 * float(evals[0] + evals[1])

    def shifted(v):
        return matvec(v) - shift * v

    vs = torch.stack([evecs[:, -1], evecs[:, 0]])
    with pytest.raises(SolverDivergedError, match=r"not positive definite .*right-hand side 1 of 2, iteration 0\)"):
        cg_solve_many(shifted, vs)
    # One vector: the same message as before batching.
    with pytest.raises(SolverDivergedError) as new:
        cg_solve(shifted, evecs[:, 0])
    with pytest.raises(SolverDivergedError) as old:
        _cg_reference(shifted, evecs[:, 0])
    assert str(new.value) == str(old.value)


def test_cg_estimator_refuses_indefinite_hessian_batched(mlp):
    objective, _, data = mlp
    theta0 = objective.initial_params()  # untrained: saddle-like curvature (as tests/test_estimators_agree.py)
    cg = make_estimator("cg", objective, theta0, data.x, data.y, damping=0.0, progress=False)
    with pytest.raises(SolverDivergedError, match="positive definite"):
        cg.influences(data.x[:4], data.y[:4])


# -- LiSSA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"depth": 40},  # full batch: deterministic
        {"depth": 15, "repeats": 2, "batch_size": 7, "seed": 3},  # minibatches: the same draws for every row
    ],
)
def test_lissa_batched_equals_one_at_a_time(setup, options):
    _, _, data, matvec, batch_matvec, vs, evals, _ = setup
    scale = 1.5 * (float(evals[-1]) + DAMPING)
    common = dict(n=len(data), damping=DAMPING, scale=scale, exact_matvec=matvec, **options)
    drawn_batched, drawn_single = [], []

    def recording(into):
        def mv(v, idx):
            into.append(None if idx is None else idx.clone())
            return batch_matvec(v, idx)

        return mv

    recursion = LissaRecursion(**{k: v for k, v in common.items() if k != "exact_matvec"})
    batched = lissa_ihvps(recording(drawn_batched), vs, recursion, exact_matvec=matvec)
    steps = options["depth"] * options.get("repeats", 1)
    assert batched.iterations.tolist() == [steps] * len(vs)
    for i, v in enumerate(vs):
        drawn_single.clear()
        x, residual, _ = _lissa_reference(recording(drawn_single), v, **common)
        if i == 3:  # the zero right-hand side stays exactly zero
            assert torch.equal(batched.x[i], x) and not bool(x.any())
            continue
        assert _rel(batched.x[i], x) <= RTOL, i
        assert float(batched.residuals[i]) == pytest.approx(residual, rel=1e-8)
        # Each row saw the minibatches a one-row run draws, in the same order.
        assert len(drawn_single) == len(drawn_batched) == steps
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(drawn_batched, drawn_single))
        if i == 0:
            one = lissa_ihvps(batch_matvec, v.unsqueeze(0), recursion, exact_matvec=matvec)[0]  # a batch of one
            assert _rel(one.x, x) <= RTOL and one.iterations == steps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_size", [None, 7])
def test_lissa_bitwise_where_the_arithmetic_is_identical(setup, dtype, batch_size):
    """With an HVP applied row by row (each row a fresh copy, as a one-row run's iterate is: MKL's reductions depend on
    alignment), LiSSA's batched recursion does per row exactly what the one-row run does: bitwise equal."""
    objective, theta, data, *_ = setup
    vs = setup[5].to(dtype)
    model = build_model("mlp", seed=0, in_features=3, num_classes=3, depth=1, width=4, activation="tanh", dtype=dtype)
    obj, th, x, y = Objective(model, weight_decay=objective.weight_decay), theta.to(dtype), data.x.to(dtype), data.y

    def one(v, idx):
        return hvp(obj, th, x if idx is None else x[idx], y if idx is None else y[idx], v)

    def rowwise(vs_, idx):
        return torch.stack([one(v.clone(), idx) for v in vs_])

    common = {"n": len(data), "damping": DAMPING, "scale": 2.5, "depth": 12, "repeats": 2, "batch_size": batch_size, "seed": 5}
    batched = lissa_ihvps(rowwise, vs, LissaRecursion(**common))
    for i, v in enumerate(vs):
        x_ref, residual, _ = _lissa_reference(one, v.clone(), **common)
        assert torch.equal(batched.x[i], x_ref), i
        assert float(batched.residuals[i]) == pytest.approx(residual, rel=1e-5 if dtype == torch.float32 else 1e-12, abs=1e-30)


def test_lissa_divergence_names_the_row(setup):
    _, _, data, _, batch_matvec, vs, evals, _ = setup
    diverging = LissaRecursion(n=len(data), damping=DAMPING, scale=0.2 * float(evals[-1]), depth=300)
    with pytest.raises(
        SolverDivergedError, match=r"lissa diverged at recursion step \d+ of repeat 0 of right-hand side \d of 5 .*scale"
    ):
        lissa_ihvps(batch_matvec, vs, diverging)
    with pytest.raises(SolverDivergedError, match=r"lissa diverged at recursion step \d+ of repeat 0 \(‖h‖=.*scale"):
        lissa_ihvps(batch_matvec, vs[:1], diverging)


# -- the estimators ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options",
    [
        ("cg", {"rtol": CG_RTOL}),
        ("lissa", {"depth": 25, "power_rtol": 1e-3}),
        ("lissa", {"depth": 10, "batch_size": 9, "repeats": 2, "seed": 1, "power_rtol": 1e-3}),
    ],
)
def test_influences_unchanged(mlp, method, options):
    objective, theta, data = mlp
    x_test, y_test, idxs = data.x[:5], data.y[:5], torch.arange(12)
    results = []
    for chunk in (8, 2):  # all five test points together, and in chunks of 2, 2 and 1: chunking changes nothing
        est = make_estimator(
            method, objective, theta, data.x, data.y, damping=DAMPING, progress=False, vector_chunk=chunk, **options
        )
        results.append(est.influences(x_test, y_test, train_idxs=idxs))
    res = results[0]
    assert _rel(results[1].predicted, res.predicted) <= RTOL
    torch.testing.assert_close(results[1].residuals, res.residuals, rtol=1e-6, atol=1e-11)  # CG's are round-off, < 1e-11
    # The previous per-vector path: one inverse_hvp per test gradient, then the same scores.
    g_test = objective.sample_grads(theta, x_test, y_test)
    solves = [est.inverse_hvp(g) for g in g_test]
    looped = est.train_scores(torch.stack([s.x for s in solves]), idxs)
    assert _rel(res.predicted, looped) <= RTOL
    torch.testing.assert_close(
        res.residuals, torch.tensor([s.residual for s in solves], dtype=g_test.dtype), rtol=1e-6, atol=1e-11
    )
    # ... and the code before batching, called directly.
    if method == "cg":
        before = [_cg_reference(est.hvp, g, damping=DAMPING, rtol=options["rtol"])[0] for g in g_test]
    else:
        o = est.options
        before = [
            _lissa_reference(
                est._batch_hvp,
                g,
                n=est.n,
                damping=DAMPING,
                scale=est.scale,
                depth=o.depth,
                repeats=o.repeats,
                batch_size=o.batch_size,
                seed=o.seed,
                exact_matvec=est.hvp,
            )[0]
            for g in g_test
        ]
    assert _rel(res.predicted, est.train_scores(torch.stack(before), idxs)) <= RTOL
    assert res.residuals.device.type == "cpu" and res.residuals.dtype == g_test.dtype


# -- arguments --------------------------------------------------------------------------------------------------
def test_arguments_are_checked(setup, mlp):
    *_, matvec, batch_matvec, vs, _, _ = setup
    with pytest.raises(InvalidArgumentError, match="vs has shape"):
        cg_solve_many(matvec, vs[0])
    with pytest.raises(InvalidArgumentError, match="vs has shape"):
        lissa_ihvps(batch_matvec, vs[:0], LissaRecursion(n=30, damping=0.0, scale=1.0, depth=1))
    with pytest.raises(InvalidArgumentError, match="vector_chunk"):
        solve_in_chunks(lambda c: cg_solve_many(matvec, c), vs, 0)
    objective, theta, data = mlp
    for method in ("cg", "lissa"):
        with pytest.raises(InvalidArgumentError, match="vector_chunk"):
            make_estimator(method, objective, theta, data.x, data.y, vector_chunk=0, progress=False)
