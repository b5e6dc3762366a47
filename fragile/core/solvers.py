"""Iterative solvers for ``(H + λI) x = v`` and for the top of a symmetric spectrum, from matvecs alone.

Each solver returns its relative residual ``‖(H+λI)x − v‖/‖v‖`` computed with an exact matvec after
it stops, so a caller can always tell a converged solve from a truncated one.

CG and LiSSA come batched (:func:`cg_solve_many`, :func:`lissa_ihvps`): the m right-hand sides run their own
recursions side by side, with one batched matvec per iteration for all of them (a vmapped HVP costs less per
vector than m separate ones: fewer calls and larger kernels). The one-vector :func:`cg_solve` is the batched
solver with m = 1; LiSSA takes one vector as a (1, p) batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fragile.errors import InvalidArgumentError, SingularSystemError, SolverDivergedError, check_int, check_positive

log = logging.getLogger(__name__)

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Solve:
    """A solution ``x`` of ``(H+λI)x = v`` with its relative residual and iteration count."""

    x: torch.Tensor
    residual: float
    iterations: int


@dataclass
class Solves:
    """Solutions of ``(H+λI)x_i = v_i`` for the rows of a batch, each with its relative residual and iteration count.

    Attributes:
        x: (m, p) solutions, row i solving right-hand side i.
        residuals: (m,) relative residuals ``‖(H+λI)x_i − v_i‖/‖v_i‖``, in the right-hand sides' dtype.
        iterations: (m,) iterations each row took (a column frozen at convergence stops counting).
    """

    x: torch.Tensor
    residuals: torch.Tensor
    iterations: torch.Tensor

    def __getitem__(self, i: int) -> Solve:
        return Solve(self.x[i], float(self.residuals[i]), int(self.iterations[i]))


def relative_residual(matvec: MatVec, damping: float, x: torch.Tensor, v: torch.Tensor) -> float:
    """``‖(H+λI)x − v‖ / ‖v‖`` with one exact matvec."""
    r = matvec(x) + damping * x - v
    return float(r.norm() / v.norm().clamp_min(torch.finfo(v.dtype).tiny))


def relative_residuals(matvecs: MatVec, damping: float, xs: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """Row-wise ``‖(H+λI)x_i − v_i‖ / ‖v_i‖`` for (m, p) ``xs`` and ``vs``, with one batched matvec ``(m, p) → (m, p)``.

    The same quantity as :func:`relative_residual` row by row; returned as an (m,) tensor in ``vs``'s dtype.
    """
    r = matvecs(xs) + damping * xs - vs
    return r.norm(dim=1) / vs.norm(dim=1).clamp_min(torch.finfo(vs.dtype).tiny)


def _single(matvec: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A one-vector matvec ``(p,) → (p,)`` as a batched one on a (1, p) batch, so that any callable a user passes to the
    one-vector solvers keeps working without having to accept a batch."""
    return lambda z, *rest: matvec(z[0], *rest).unsqueeze(0)


def _check_rhs(name: str, vs: torch.Tensor) -> None:
    if not isinstance(vs, torch.Tensor) or vs.ndim != 2 or vs.shape[0] == 0 or vs.shape[1] == 0:
        shape = tuple(vs.shape) if isinstance(vs, torch.Tensor) else type(vs).__name__
        raise InvalidArgumentError(f"{name} has shape {shape}; it must be a non-empty (m, p) tensor, one right-hand side per row")


def _first_bad_row(bad: torch.Tensor) -> int | None:
    """The first row a (k,) mask flags, or None when it flags none: the row a batched solver names when it raises."""
    return int(torch.nonzero(bad)[0]) if bool(bad.any()) else None


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Summed in the iterates' dtype, then float64 for the step lengths: CG formed α and β from Python floats before it
    # was batched, and a float32 quotient of two float32 sums would round them once more for nothing.
    return (a * b).sum(dim=1).double()


def solve_in_chunks(solve: Callable[[torch.Tensor], Solves], vs: torch.Tensor, vector_chunk: int) -> Solves:
    """Run a batched solver (e.g. a partial :func:`cg_solve_many`) on ``vector_chunk`` rows of ``vs`` (m, p) at a time and
    join the results in row order.

    The rows of a batched solve are independent (CG) or share only their seeded minibatch draws, which every call
    repeats from the seed (LiSSA), so chunking changes no result; it bounds memory to ``vector_chunk`` rows' iterates
    and one matvec vmapped over ``vector_chunk`` vectors.
    """
    _check_rhs("vs", vs)
    check_int("vector_chunk", vector_chunk, minimum=1)
    parts = [solve(vs[i : i + vector_chunk]) for i in range(0, vs.shape[0], vector_chunk)]
    return Solves(*(torch.cat([getattr(s, f) for s in parts]) for f in ("x", "residuals", "iterations")))


def cg_solve(matvec: MatVec, v: torch.Tensor, *, damping: float = 0.0, rtol: float = 1e-10, max_iter: int | None = None) -> Solve:
    """Conjugate gradient on ``H + λI`` for one right-hand side ``v`` (p,): :func:`cg_solve_many` with m = 1.

    ``matvec`` maps (p,) to (p,). Cost: one matvec per iteration, at most ``max_iter`` (default ``2·p``)
    iterations, plus one for the residual; memory O(p).
    """
    return cg_solve_many(_single(matvec), v.unsqueeze(0), damping=damping, rtol=rtol, max_iter=max_iter)[0]


def cg_solve_many(
    matvecs: MatVec, vs: torch.Tensor, *, damping: float = 0.0, rtol: float = 1e-10, max_iter: int | None = None
) -> Solves:
    """Conjugate gradient on ``H + λI`` for the m rows of ``vs`` (m, p) together.

    Each row runs its own CG recursion (its own step lengths α and β) and stops on its own when its residual
    ``‖r_i‖ <= rtol·‖v_i‖``; a converged row is frozen and leaves the batch, so it costs no more matvecs and
    its iterate is the one a one-at-a-time solve returns (up to the round-off of a batched matvec, which can move
    the step at which a row crosses ``rtol`` by one). Each iteration makes one batched matvec
    ``matvecs(D)`` on the (k, p) search directions of the k rows still running (e.g.
    :func:`fragile.core.curvature.hvp`, which vmaps a batch): one call for all rows instead of one per row.

    Assumes ``H + λI`` is symmetric positive definite; a direction of non-positive curvature
    (``dᵀ(H+λI)d <= 0``) in any running row means it is not, and raises :class:`SolverDivergedError` naming the
    row and the damping rather than returning a meaningless iterate.

    Args:
        matvecs: ``(k, p) → (k, p)``, ``H`` applied to each row.
        vs: (m, p) right-hand sides.
        damping: λ >= 0.
        rtol: relative residual at which a row stops.
        max_iter: iterations at most (default ``2·p``); rows not converged by then are returned as they are,
            and their residuals say so.

    Returns:
        :class:`Solves` with each row's residual from one exact batched matvec after the iteration stops.

    Cost: at most ``max_iter`` batched matvecs (each over the rows still running) plus one for the residuals.
    Memory: O(m·p) per iterate (x, r, d and the matvec's output), plus what one batched matvec needs.
    """
    check_positive("damping", damping, allow_zero=True)
    check_positive("rtol", rtol)
    _check_rhs("vs", vs)
    m, p = vs.shape
    max_iter = 2 * p if max_iter is None else max_iter
    check_int("max_iter", max_iter, minimum=1)

    x = torch.zeros_like(vs)
    r = vs.clone()
    d = r.clone()
    rs = _rowdot(r, r)
    target = (rtol * vs.norm(dim=1).double()) ** 2
    iterations = torch.zeros(m, dtype=torch.long, device=vs.device)
    running = torch.nonzero(rs > target).squeeze(1)  # rows not yet converged (a zero or non-finite v never runs)
    it = 0
    while it < max_iter and running.numel():
        dk = d[running]
        ad = matvecs(dk) + damping * dk
        curv = _rowdot(dk, ad)
        k = _first_bad_row(~(curv > 0) | ~torch.isfinite(curv))
        if k is not None:
            row = f"right-hand side {int(running[k])} of {m}, " if m > 1 else ""
            raise SolverDivergedError(
                f"cg: H + damping·I is not positive definite (curvature {float(curv[k]):.3g} along a search direction, "
                f"{row}iteration {it}); increase damping (now {damping}) or use method='exact' with a negative-eigenvalue policy"
            )
        rs_k = rs[running]
        alpha = (rs_k / curv).to(vs.dtype).unsqueeze(1)
        x[running] = x[running] + alpha * dk
        r_k = r[running] - alpha * ad
        rs_new = _rowdot(r_k, r_k)
        d[running] = r_k + (rs_new / rs_k).to(vs.dtype).unsqueeze(1) * dk
        r[running] = r_k
        rs[running] = rs_new
        iterations[running] += 1
        it += 1
        running = running[rs_new > target[running]]
    return Solves(x, relative_residuals(matvecs, damping, x, vs), iterations)


@dataclass(frozen=True)
class LissaRecursion:
    """The settings of a LiSSA recursion (:func:`lissa_ihvps`), checked at construction.

    Attributes:
        n: number of training points the minibatches are drawn from.
        damping: λ >= 0.
        scale: s > 0; should exceed ``λmax(H+λI)/2`` and is usually set just above ``λmax``.
        depth: recursion steps per repeat.
        repeats: independent recursions averaged.
        batch_size: examples per Hessian sample, at most ``n``; None uses the full batch (deterministic).
        seed: seed of the minibatch draws.
        growth_tolerance: the divergence test's factor (:func:`lissa_ihvps`).
        max_residual: the largest final relative residual ``‖(H+λI)x − v‖/‖v‖`` returned as a solution
            (:func:`lissa_ihvps`); a finite number > 0, or None to return every solve. The default 10 is a solve ten
            times worse than returning x = 0 (whose residual is 1).
    """

    n: int
    damping: float
    scale: float
    depth: int
    repeats: int = 1
    batch_size: int | None = None
    seed: int = 0
    growth_tolerance: float = 10.0
    max_residual: float | None = 10.0

    def __post_init__(self) -> None:
        check_positive("damping", self.damping, allow_zero=True)
        check_positive("scale", self.scale)
        check_int("depth", self.depth, minimum=1)
        check_int("repeats", self.repeats, minimum=1)
        check_positive("growth_tolerance", self.growth_tolerance)
        check_optional_bound("max_residual", self.max_residual)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1, maximum=self.n)


def lissa_ihvps(
    batch_matvecs: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    vs: torch.Tensor,
    recursion: LissaRecursion,
    *,
    exact_matvec: MatVec | None = None,
) -> Solves:
    """The stochastic Neumann-series inverse HVP of Agarwal et al. (LiSSA) as used by Koh & Liang, for the m rows
    of ``vs`` together.

    Recursion, per row: ``h₀ = v``, ``h_j = v + h_{j−1} − (H_b + λI) h_{j−1} / s`` with ``H_b`` the Hessian on a
    random minibatch; ``x = h_depth / s`` is averaged over ``repeats``. Its fixed point is
    ``(H+λI)⁻¹v``; it converges when every eigenvalue of ``H+λI`` lies in ``(0, 2s)``.

    All rows take the same minibatch at each step, drawn from one generator seeded with ``seed`` in the same
    order as a one-row run draws them, so each row's result is the one a run of that row alone returns
    (up to the round-off of a batched matvec); each step makes one batched call ``batch_matvecs(h, idx)`` on
    the (m, p) iterates (e.g. :func:`fragile.core.curvature.hvp`, which vmaps a batch) instead of m calls.

    Divergence is detected, not returned: a non-finite iterate, or ``‖h_j‖ > growth_tolerance·(j+1)·‖v‖``
    in any row (a convergent recursion satisfies ``‖h_j‖ <= (j+1)‖v‖``), raises :class:`SolverDivergedError`
    naming the row. The growth test misses a slow divergence (a scale a little below ``λmax/2``, an eigenvalue of
    ``H+λI`` a little below 0: the iterate grows geometrically but stays under the linear bound for many steps), so
    the final relative residual is checked too: one above ``max_residual`` in any row raises
    :class:`SolverDivergedError` naming the row, its residual and the bound (``max_residual=None`` returns it).

    Args:
        batch_matvecs: ``((m, p) iterates, index tensor or None) -> H_b`` applied to each row, for a minibatch
            (None = all data).
        vs: (m, p) right-hand sides.
        recursion: n, damping λ, scale s, depth, repeats, batch size, seed and the divergence test's factor.
        exact_matvec: full-data ``(m, p) → (m, p)`` matvec for the residuals (defaults to ``batch_matvecs(x, None)``).

    Returns:
        :class:`Solves`; every row's iteration count is ``depth·repeats``.

    Cost: ``depth·repeats`` batched minibatch matvecs plus one full-data batched matvec for the residuals.
    Memory: O(m·p) per iterate (v, h, the running sum and the matvec's output), plus what one batched matvec needs.
    """
    _check_rhs("vs", vs)
    r = recursion
    n, damping, scale, depth, repeats, batch_size = r.n, r.damping, r.scale, r.depth, r.repeats, r.batch_size
    m = vs.shape[0]
    gen = torch.Generator().manual_seed(r.seed)
    # Norms in float64, as the one-row test takes them (Python floats): the floor 1e-300 is 0 in float32.
    v_norm = vs.norm(dim=1).double()
    v_floor = v_norm.clamp_min(1e-300)
    total = torch.zeros_like(vs)
    for rep in range(repeats):
        h = vs.clone()
        for j in range(1, depth + 1):
            idx = None if batch_size is None else torch.randint(0, n, (batch_size,), generator=gen)
            h = vs + h - (batch_matvecs(h, idx) + damping * h) / scale
            h_norm = h.norm(dim=1).double()
            k = _first_bad_row(~torch.isfinite(h_norm) | (h_norm > r.growth_tolerance * (j + 1) * v_floor))
            if k is not None:
                row = f" of right-hand side {k} of {m}" if m > 1 else ""
                raise SolverDivergedError(
                    f"lissa diverged at recursion step {j} of repeat {rep}{row} (‖h‖={float(h_norm[k]):.3g}, "
                    f"‖v‖={float(v_norm[k]):.3g}): scale={scale:.4g} must exceed about half the largest eigenvalue of "
                    f"H + damping·I and every eigenvalue must be positive; raise scale or damping (now {damping})"
                )
        total += h / scale
    x = total / repeats
    matvecs = exact_matvec if exact_matvec is not None else (lambda z: batch_matvecs(z, None))
    residuals = relative_residuals(matvecs, damping, x, vs)
    check_residuals(
        "lissa",
        residuals,
        r.max_residual,
        f"after depth {depth} × {repeats} repeat(s) with scale={scale:.4g}, damping={damping}: the recursion diverges "
        "slowly (scale below about half the largest eigenvalue of H + damping·I, or an eigenvalue <= 0) or has not "
        "converged; raise scale, damping or depth",
    )
    return Solves(x, residuals, torch.full((m,), depth * repeats, dtype=torch.long, device=vs.device))


def check_optional_bound(name: str, value: float | None) -> None:
    """Raise unless ``value`` is None or a finite number > 0: a residual bound (None: no bound)."""
    if value is not None:
        check_positive(name, value)


def check_residuals(solver: str, residuals: torch.Tensor, max_residual: float | None, advice: str) -> None:
    """Raise :class:`SolverDivergedError` if any relative residual (m,) exceeds ``max_residual`` or is not finite,
    naming the solver, the row, its residual and the bound, then ``advice``; None checks nothing. Cost: one pass
    over the m residuals."""
    if max_residual is None:
        return
    k = _first_bad_row(~(residuals <= max_residual))
    if k is None:
        return
    m = residuals.numel()
    row = f" of right-hand side {k} of {m}" if m > 1 else ""
    worst = float(residuals[k])
    raise SolverDivergedError(
        f"{solver}: relative residual ‖(H + damping·I)x − v‖/‖v‖ = {worst:.6g}{row} exceeds max_residual={max_residual:g} "
        f"({advice}; max_residual=None returns the numbers)"
    )


def arnoldi_eigenpairs(
    matvec: MatVec,
    p: int,
    *,
    iterations: int,
    top: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpairs (by magnitude) of a symmetric operator by Arnoldi iteration (Schioppa et al. 2022).

    Builds an orthonormal Krylov basis with full re-orthogonalisation (twice, for stability), then
    diagonalises the projected matrix. When the Krylov space becomes invariant before ``iterations``
    steps, it continues from a fresh random vector orthogonal to the basis, so ``iterations = top = p``
    recovers the full eigendecomposition.

    Returns:
        ``(eigenvalues (top,), eigenvectors (p, top))``, eigenvalues by decreasing magnitude.

    Cost: ``iterations`` matvecs; memory O(iterations·p).
    """
    check_int("iterations", iterations, minimum=1, maximum=p)
    check_int("top", top, minimum=1, maximum=iterations)
    gen = torch.Generator().manual_seed(seed)
    q = torch.zeros(iterations + 1, p, dtype=dtype, device=device)
    h = torch.zeros(iterations + 1, iterations, dtype=dtype, device=device)
    start = torch.randn(p, generator=gen, dtype=dtype).to(device)  # drawn on the CPU: the same start on every device
    q[0] = start / start.norm()
    scale_ref = 0.0
    for k in range(iterations):
        w = matvec(q[k])
        for _ in range(2):
            coeffs = q[: k + 1] @ w
            w = w - coeffs @ q[: k + 1]
            h[: k + 1, k] += coeffs
        beta = float(w.norm())
        scale_ref = max(scale_ref, float(h[: k + 1, k].abs().max()))
        if k + 1 == iterations:
            break
        if beta <= 1e-10 * max(scale_ref, 1e-300):
            # Invariant subspace found: restart in the orthogonal complement; h[k+1, k] stays 0.
            w = torch.randn(p, generator=gen, dtype=dtype).to(device)
            for _ in range(2):
                w = w - (q[: k + 1] @ w) @ q[: k + 1]
            q[k + 1] = w / w.norm()
        else:
            h[k + 1, k] = beta
            q[k + 1] = w / beta
    t = h[:iterations, :iterations]
    evals, evecs = torch.linalg.eigh(0.5 * (t + t.T))
    order = torch.argsort(evals.abs(), descending=True)[:top]
    return evals[order], q[:iterations].T @ evecs[:, order]


def spectral_inverse_weights(
    eigenvalues: torch.Tensor, damping: float, negative: str, *, eps: float | None = None
) -> torch.Tensor:
    """``1 / (f(λ_i) + damping)`` for a negative-eigenvalue policy ``f``.

    Policies: ``"keep"`` uses the eigenvalues as they are (the paper's practice: damping only);
    ``"clip"`` replaces negative eigenvalues by 0; ``"abs"`` uses their magnitude. A damped
    eigenvalue within the eigenvalues' own round-off of zero (``√p·eps·max|λ|``, with ``eps`` the machine
    precision the matrix was computed in; default: the eigenvalues' dtype) makes the inverse undefined
    and raises.
    """
    if negative == "keep":
        f = eigenvalues
    elif negative == "clip":
        f = eigenvalues.clamp_min(0.0)
    elif negative == "abs":
        f = eigenvalues.abs()
    else:
        raise InvalidArgumentError(f"negative={negative!r} is not allowed; choose one of ['keep', 'clip', 'abs']")
    d = f + damping
    eps = torch.finfo(d.dtype).eps if eps is None else eps
    tol = math.sqrt(d.numel()) * eps * float(eigenvalues.abs().max().clamp_min(1.0))
    if bool((d.abs() <= tol).any()):
        raise SingularSystemError(
            f"H + damping·I is singular (an eigenvalue of {float(d[d.abs().argmin()]):.3g} after damping {damping}); "
            "increase damping"
        )
    return 1.0 / d
