"""Iterative solvers for ``(H + λI) x = v`` and for the top of a symmetric spectrum, from matvecs alone.

Each solver returns its relative residual ``‖(H+λI)x − v‖/‖v‖`` computed with an exact matvec after
it stops, so a caller can always tell a converged solve from a truncated one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fragile.errors import InvalidArgumentError, SolverDivergedError, check_int, check_positive

log = logging.getLogger(__name__)

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Solve:
    """A solution ``x`` of ``(H+λI)x = v`` with its relative residual and iteration count."""

    x: torch.Tensor
    residual: float
    iterations: int


def relative_residual(matvec: MatVec, damping: float, x: torch.Tensor, v: torch.Tensor) -> float:
    """``‖(H+λI)x − v‖ / ‖v‖`` with one exact matvec."""
    r = matvec(x) + damping * x - v
    return float(r.norm() / v.norm().clamp_min(torch.finfo(v.dtype).tiny))


def cg_solve(matvec: MatVec, v: torch.Tensor, *, damping: float = 0.0, rtol: float = 1e-10, max_iter: int | None = None) -> Solve:
    """Conjugate gradient on ``H + λI``.

    Assumes ``H + λI`` is symmetric positive definite; a direction of non-positive curvature
    (``dᵀ(H+λI)d <= 0``) means it is not, and raises :class:`SolverDivergedError` naming the damping
    rather than returning a meaningless iterate. Cost: one matvec per iteration, at most
    ``max_iter`` (default ``2·p``) iterations.
    """
    check_positive("damping", damping, allow_zero=True)
    check_positive("rtol", rtol)
    p = v.numel()
    max_iter = 2 * p if max_iter is None else max_iter
    check_int("max_iter", max_iter, minimum=1)

    def a(z: torch.Tensor) -> torch.Tensor:
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
    return Solve(x, relative_residual(matvec, damping, x, v), it)


def lissa_ihvp(
    batch_matvec: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    v: torch.Tensor,
    *,
    n: int,
    damping: float,
    scale: float,
    depth: int,
    repeats: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    growth_tolerance: float = 10.0,
    exact_matvec: MatVec | None = None,
) -> Solve:
    """The stochastic Neumann-series inverse HVP of Agarwal et al. (LiSSA) as used by Koh & Liang.

    Recursion: ``h₀ = v``, ``h_j = v + h_{j−1} − (H_b + λI) h_{j−1} / s`` with ``H_b`` the Hessian on a
    random minibatch; ``x = h_depth / s`` is averaged over ``repeats``. Its fixed point is
    ``(H+λI)⁻¹v``; it converges when every eigenvalue of ``H+λI`` lies in ``(0, 2s)``.

    Divergence is detected, not returned: a non-finite iterate, or ``‖h_j‖ > growth_tolerance·(j+1)·‖v‖``
    (a convergent recursion satisfies ``‖h_j‖ <= (j+1)‖v‖``), raises :class:`SolverDivergedError`.

    Args:
        batch_matvec: ``(vector, index tensor or None) -> H_b·vector`` for a minibatch (None = all data).
        v: right-hand side, (p,).
        n: number of training points the minibatches are drawn from.
        damping: λ >= 0.
        scale: s > 0; should exceed ``λmax(H+λI)/2`` and is usually set just above ``λmax``.
        depth: recursion steps per repeat.
        repeats: independent recursions averaged.
        batch_size: examples per Hessian sample; None uses the full batch (deterministic).
        seed: seed of the minibatch draws.
        exact_matvec: full-data ``H·x`` for the residual (defaults to ``batch_matvec(x, None)``).

    Cost: ``depth·repeats`` minibatch HVPs.
    """
    check_positive("damping", damping, allow_zero=True)
    check_positive("scale", scale)
    check_int("depth", depth, minimum=1)
    check_int("repeats", repeats, minimum=1)
    if batch_size is not None:
        check_int("batch_size", batch_size, minimum=1, maximum=n)
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
                raise SolverDivergedError(
                    f"lissa diverged at recursion step {j} of repeat {rep} (‖h‖={h_norm:.3g}, ‖v‖={v_norm:.3g}): "
                    f"scale={scale:.4g} must exceed about half the largest eigenvalue of H + damping·I and every "
                    f"eigenvalue must be positive; raise scale or damping (now {damping})"
                )
        total += h / scale
    x = total / repeats
    matvec = exact_matvec if exact_matvec is not None else (lambda z: batch_matvec(z, None))
    return Solve(x, relative_residual(matvec, damping, x, v), depth * repeats)


def arnoldi_eigenpairs(
    matvec: MatVec, p: int, *, iterations: int, top: int, dtype: torch.dtype = torch.float64, seed: int = 0,
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


def spectral_inverse_weights(eigenvalues: torch.Tensor, damping: float, negative: str, *, eps: float | None = None) -> torch.Tensor:
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
        raise InvalidArgumentError(
            f"H + damping·I is singular (an eigenvalue of {float(d[d.abs().argmin()]):.3g} after damping {damping}); "
            "increase damping"
        )
    return 1.0 / d
