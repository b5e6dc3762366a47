"""Second-order information of an :class:`~fragile.core.objective.Objective`: Hessian-vector products, the
materialised Hessian and its spectrum, and the largest eigenvalue from HVPs alone."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, jacrev, jvp, vmap

from fragile.core.blocked_hessian import NotAChainError, layer_blocked_hessian
from fragile.core.objective import Objective
from fragile.errors import InvalidArgumentError, check_int

log = logging.getLogger(__name__)

# torch's own forward-mode decompositions call the deprecated torch.jit.script on the first jvp of a
# convolution; nothing a user can act on, and it would otherwise appear in every chapter run in-process.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

MatVec = Callable[[torch.Tensor], torch.Tensor]


def _chunks(n: int, size: int | None):
    size = n if size is None else size
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def hvp(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    *,
    data_chunk: int | None = None,
) -> torch.Tensor:
    """Exact Hessian-vector product ``H v`` of the mean training objective (regulariser included).

    Forward-over-reverse (``jvp`` of ``grad``): about the cost of two gradient evaluations per vector.
    ``v`` may be (p,) or a batch (m, p), which is vmapped. The data are processed ``data_chunk`` rows at
    a time to bound activation memory; chunk sums are weighted by chunk size, so the result does not
    depend on the chunking up to round-off.
    """
    n = x.shape[0]
    data_grad = grad(lambda t, xc, yc: objective.sample_losses(t, xc, yc).mean())

    def one(vec: torch.Tensor) -> torch.Tensor:
        out = objective.weight_decay * vec
        for sl in _chunks(n, data_chunk):
            _, hv = jvp(lambda t, sl=sl: data_grad(t, x[sl], y[sl]), (theta,), (vec,))
            out = out + hv * ((sl.stop - sl.start) / n)
        return out

    if v.ndim == 1:
        return one(v)
    return vmap(one)(v)


def hessian_matrix(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_chunk: int | None = None,
    vector_chunk: int | None = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Materialise the p×p Hessian of the mean training objective.

    When the model is a chain of layers (an ``nn.Sequential``, or a model with ``sequential_layers()``, such as
    :class:`~fragile.models.small.MLP` and :class:`~fragile.models.small.KohLiangCNN`), by
    :func:`~fragile.core.blocked_hessian.layer_blocked_hessian`: each block row by forward-over-reverse through the
    layers above it only, the blocks below the diagonal by symmetry, with ``data_chunk`` and ``vector_chunk`` as caps
    on each call's images and tangents (the same numbers up to round-off; ``benchmarks/exact_hessian.py`` times both). Any
    other model: p HVPs (:func:`hvp`, ``vector_chunk`` of them vmapped together, ``data_chunk`` images per pass) over
    the whole data set, one block of rows at a time, returned as computed (not symmetrised). Either way the blocks
    computed directly keep their round-off asymmetry, a check of the computation. Cost: p HVP-equivalents over the
    data (restricted to the layers ≥ each parameter's for a chain); memory O(p²) for the result.
    """
    from tqdm.auto import tqdm

    try:
        return layer_blocked_hessian(objective, theta, x, y, data_chunk=data_chunk, vector_chunk=vector_chunk, progress=progress)
    except NotAChainError as exc:
        log.debug("Hessian by HVPs through the whole model: %s", exc)
    p = objective.num_params
    eye = torch.eye(p, dtype=theta.dtype, device=theta.device)
    rows = []
    blocks = list(_chunks(p, vector_chunk))
    for sl in tqdm(blocks, desc="Hessian rows", disable=not progress, leave=False):
        rows.append(hvp(objective, theta, x, y, eye[sl], data_chunk=data_chunk))
    return torch.cat(rows, dim=0)


def gauss_newton_matrix(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    *,
    data_chunk: int | None = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Materialise the Gauss–Newton matrix of the mean training objective (regulariser included),

        G = (1/n) Σ_i J_iᵀ Λ_i J_i + weight_decay · I,

    with ``J_i`` the Jacobian of example i's outputs and ``Λ_i`` the loss's Hessian in them: the Hessian with the
    network linearised in its parameters. For softmax cross-entropy ``Λ_i = diag p_i − p_i p_iᵀ`` with ``p_i`` the
    softmax (G is then also the true Fisher); for ``loss="mse"`` (½ the squared error) ``Λ_i = I``. It is positive
    semi-definite, and the Hessian of the PBRF's objective at θ* (:func:`fragile.core.ground_truth.pbrf_retrain`).
    ``diag p − ppᵀ = AᵀA`` with ``A = diag(√p) − √p pᵀ`` (as Σp = 1), so G is accumulated as a sum of
    ``BᵀB`` over chunks of ``B = A J`` (``B = J`` for mse). Cost: one Jacobian (C vector-Jacobian products, C
    outputs) per example and O(n·C·p²) for the products; memory O(p² + data_chunk·C·p).

    Raises:
        InvalidArgumentError: for a callable loss (its ``Λ_i`` has no closed form here), before any work.
    """
    from tqdm.auto import tqdm

    objective.require_loss(("cross_entropy", "mse"), "the Gauss-Newton matrix")
    n, p = x.shape[0], objective.num_params
    jac = vmap(jacrev(lambda t, xi: objective.logits(t, xi.unsqueeze(0))[0]), in_dims=(None, 0))
    g = objective.weight_decay * torch.eye(p, dtype=theta.dtype, device=theta.device)
    for sl in tqdm(list(_chunks(n, data_chunk)), desc="Gauss-Newton", disable=not progress, leave=False):
        j = jac(theta.detach(), x[sl])  # (c, C, p)
        if objective.loss_name == "mse":
            b = j.reshape(-1, p)
        else:
            with torch.no_grad():
                prob = torch.softmax(objective.logits(theta, x[sl]), -1)
            root = prob.sqrt()
            a = torch.diag_embed(root) - root[:, :, None] * prob[:, None, :]
            b = torch.bmm(a, j).reshape(-1, p)
        g = g + (b.T @ b) / n
    return g


@dataclass(frozen=True)
class Spectrum:
    """Summary of a Hessian spectrum.

    Attributes:
        largest: largest (algebraic) eigenvalue.
        smallest: smallest (algebraic) eigenvalue, or NaN when only the top was computed.
        num_negative: count of eigenvalues below ``-tolerance``; -1 when unknown.
        tolerance: the threshold used, ``p·eps·max|λ|`` (the usual numerical-rank tolerance).
        eigenvalues: all computed eigenvalues in ascending order, or None.
    """

    largest: float
    smallest: float
    num_negative: int
    tolerance: float
    eigenvalues: torch.Tensor | None = None

    @classmethod
    def from_eigenvalues(cls, eigenvalues: torch.Tensor, p: int | None = None) -> Spectrum:
        ev = torch.sort(eigenvalues.detach()).values
        p = ev.numel() if p is None else p
        tol = p * torch.finfo(ev.dtype).eps * float(ev.abs().max())
        return cls(float(ev[-1]), float(ev[0]), int((ev < -tol).sum()), tol, ev)

    def as_dict(self) -> dict[str, float | int]:
        """The scalar fields, for JSON summaries."""
        return {
            "largest": self.largest,
            "smallest": self.smallest,
            "num_negative": self.num_negative,
            "tolerance": self.tolerance,
        }


def top_eigenvalue(
    matvec: MatVec,
    p: int,
    *,
    dtype: torch.dtype = torch.float64,
    iters: int = 200,
    rtol: float = 1e-6,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> float:
    """Largest algebraic eigenvalue of a symmetric operator by power iteration on ``matvec``.

    Power iteration finds the eigenvalue of largest magnitude; when that one is negative, a second
    run on the shifted operator ``A − μI`` finds the top of the spectrum. Cost: at most ``2·iters``
    matvecs; stops when the Rayleigh quotient changes by less than ``rtol`` relative.
    """
    check_int("iters", iters, minimum=1)
    gen = torch.Generator().manual_seed(seed)

    def power(op: MatVec) -> float:
        v = torch.randn(p, generator=gen, dtype=dtype).to(device)  # drawn on the CPU: the same start on every device
        v = v / v.norm()
        lam = 0.0
        for i in range(iters):
            w = op(v)
            new = float(v @ w)
            norm = float(w.norm())
            if norm == 0.0 or not math.isfinite(norm):
                return new
            v = w / norm
            if i > 0 and abs(new - lam) <= rtol * max(abs(new), 1e-30):
                return new
            lam = new
        log.debug("power iteration stopped after %d iterations without reaching rtol=%g", iters, rtol)
        return lam

    mu = power(matvec)
    if mu >= 0:
        return mu
    shifted = power(lambda v: matvec(v) - mu * v)
    return shifted + mu


def objective_top_eigenvalue(
    objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, data_chunk: int | None = None, **kwargs
) -> float:
    """Largest Hessian eigenvalue of the training objective from HVPs (no p×p matrix)."""
    if x.shape[0] == 0:
        raise InvalidArgumentError("x is empty")
    return top_eigenvalue(
        lambda v: hvp(objective, theta, x, y, v, data_chunk=data_chunk),
        objective.num_params,
        dtype=theta.dtype,
        device=theta.device,
        **kwargs,
    )
