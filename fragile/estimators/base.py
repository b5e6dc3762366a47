"""Influence estimators behind one interface: swapping exact → CG → LiSSA → Arnoldi is one argument.

Sign convention (design.md §4): ``predicted[t, i]`` is the predicted change of test point ``t``'s loss
when training point ``i`` is removed,

    predicted[t, i] = +(1/n) · ∇ℓ(z_t)ᵀ (H + λI)⁻¹ ∇L(z_i),

with ``H`` the Hessian of the mean training objective (weight decay included), ``λ`` the damping,
``ℓ(z_t)`` the test loss (no regulariser) and ``L(z_i) = ℓ(z_i) + (weight_decay/2)‖θ‖²`` a training
point's share of the objective (see :meth:`~fragile.core.objective.Objective.point_grads`). Positive means that removing the point raises
the test loss. The predicted parameter change on removal is ``+(1/n)(H+λI)⁻¹∇L(z_i)``.

Example:
    >>> est = make_estimator("cg", objective, theta, x_train, y_train, damping=0.01)  # doctest: +SKIP
    >>> result = est.influences(x_test, y_test)                                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fragile.core.curvature import Spectrum, gauss_newton_matrix, hessian_matrix, hvp, top_eigenvalue
from fragile.errors import InvalidArgumentError, check_choice, check_dataset, check_indices, check_int, check_positive
from fragile.core.objective import Objective
from fragile.core.solvers import (Solve, arnoldi_eigenpairs, cg_solve, cg_solve_many, lissa_ihvp, lissa_ihvps, relative_residual,
                             solve_in_chunks, spectral_inverse_weights)

log = logging.getLogger(__name__)

NEGATIVE_POLICIES = ("keep", "clip", "abs")
CURVATURES = ("hessian", "gauss_newton")


@dataclass
class InfluenceResult:
    """Predicted test-loss changes for removing each of ``train_idxs``.

    Attributes:
        predicted: (n_test, k) predicted change of each test loss when each training point is removed.
        train_idxs: (k,) the training indices, in column order.
        method: estimator name.
        damping: λ used.
        residuals: (n_test,) relative residual of each inverse-HVP solve (0 up to round-off for exact).
        spectrum: what the estimator learned of the Hessian spectrum, if anything.
        seconds: wall time of the call, preparation included.
    """

    predicted: torch.Tensor
    train_idxs: torch.Tensor
    method: str
    damping: float
    residuals: torch.Tensor
    spectrum: Spectrum | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class InfluenceEstimator(ABC):
    """Common interface of the influence estimators.

    Subclasses implement :meth:`_prepare` (one-off work such as materialising the Hessian) and
    :meth:`inverse_hvp`. Arguments are checked when the estimator is built, before any work.

    Args:
        objective: the training objective the model was trained on.
        theta: trained parameters θ*, (p,).
        x_train, y_train: the full training set the objective averages over.
        damping: λ >= 0 added to the Hessian.
        data_chunk: rows per HVP chunk (bounds activation memory); None = all at once.
        grad_chunk: examples per vmapped per-sample-gradient chunk.
        progress: show progress bars.
    """

    method: ClassVar[str]
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        objective: Objective,
        theta: torch.Tensor,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        *,
        damping: float = 0.0,
        data_chunk: int | None = None,
        grad_chunk: int | None = 256,
        progress: bool = True,
        **options: Any,
    ):
        check_dataset("x_train", x_train, "y_train", y_train)
        objective.check_params("theta", theta)
        check_positive("damping", damping, allow_zero=True)
        if data_chunk is not None:
            check_int("data_chunk", data_chunk, minimum=1)
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise InvalidArgumentError(
                f"unknown option(s) {unknown} for method={self.method!r}; allowed: {sorted(self.OPTIONS)}"
            )
        self.options = {**self.OPTIONS, **options}
        self.objective, self.theta = objective, theta.detach()
        self.x_train, self.y_train = x_train, y_train
        self.n, self.p = x_train.shape[0], objective.num_params
        self.damping = float(damping)
        self.data_chunk, self.grad_chunk, self.progress = data_chunk, grad_chunk, progress
        self._prepared = False
        self._spectrum: Spectrum | None = None
        self._check_options()

    def _check_options(self) -> None:
        """Validate method options (subclasses extend)."""

    @property
    def residual_by_design(self) -> bool:
        """True when the method solves a modified system on purpose (a negative-eigenvalue policy, a truncated
        spectrum), so its residual against ``H + λI`` measures the modification, not a solver failure."""
        return False

    # -- building blocks --------------------------------------------------------------------------
    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """Exact ``H v`` over the whole training set."""
        return hvp(self.objective, self.theta, self.x_train, self.y_train, v, data_chunk=self.data_chunk)

    def prepare(self) -> "InfluenceEstimator":
        """Do the method's one-off work (idempotent)."""
        if not self._prepared:
            self._prepare()
            self._prepared = True
        return self

    def _prepare(self) -> None:
        pass

    @property
    def spectrum(self) -> Spectrum | None:
        """What the method knows of the Hessian spectrum (after :meth:`prepare`)."""
        return self._spectrum

    @abstractmethod
    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        """Solve ``(H + λI) x = v`` for one vector (p,)."""

    def inverse_hvps(self, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve for each row of ``vs`` (m, p); returns the solutions (m, p) and residuals (m,)."""
        self.prepare()
        solves = [self.inverse_hvp(v) for v in vs]
        return torch.stack([s.x for s in solves]), torch.tensor([s.residual for s in solves], dtype=vs.dtype)

    # -- public API -------------------------------------------------------------------------------
    def train_gradients(self, train_idxs: torch.Tensor) -> torch.Tensor:
        """Gradients ``∇L(z_i)`` of the given training points' shares of the objective, (k, p)."""
        return self.objective.point_grads(self.theta, self.x_train[train_idxs], self.y_train[train_idxs], self.grad_chunk)

    def influences(
        self, x_test: torch.Tensor, y_test: torch.Tensor, train_idxs: Sequence[int] | torch.Tensor | None = None
    ) -> InfluenceResult:
        """Predicted change of each test loss when each training point is removed (sign: module doc).

        One inverse-HVP solve per test point, then the k training gradients ``grad_chunk`` at a time, each
        chunk dotted with the solutions and dropped: memory O(grad_chunk·p), never (k, p). Cost is dominated
        by the solves and by the k per-example gradients.

        Args:
            x_test, y_test: test inputs (same feature shape as ``x_train``) and labels.
            train_idxs: training points to score; None means all of them.
        """
        idxs = self._check_query(x_test, y_test, train_idxs)
        start = time.perf_counter()
        self.prepare()
        g_test = self.objective.sample_grads(self.theta, x_test, y_test, self.grad_chunk)
        s_test, residuals = self.inverse_hvps(g_test)
        predicted = self.train_scores(s_test, idxs)
        worst = float(residuals.max())
        if worst > 1e-3 and not self.residual_by_design:
            log.warning("%s: inverse-HVP relative residual up to %.3g (see InfluenceResult.residuals)", self.method, worst)
        return InfluenceResult(
            predicted, idxs, self.method, self.damping, residuals, self._spectrum, time.perf_counter() - start, self._details()
        )

    def _check_query(self, x_test: torch.Tensor, y_test: torch.Tensor, train_idxs) -> torch.Tensor:
        """Check an :meth:`influences` call's arguments before any work; returns the training indices to score."""
        check_dataset("x_test", x_test, "y_test", y_test)
        if tuple(x_test.shape[1:]) != tuple(self.x_train.shape[1:]):
            raise InvalidArgumentError(
                f"x_test rows have shape {tuple(x_test.shape[1:])} but x_train rows have {tuple(self.x_train.shape[1:])}"
            )
        return torch.arange(self.n) if train_idxs is None else check_indices("train_idxs", train_idxs, self.n)

    def train_scores(self, solutions: torch.Tensor, train_idxs: torch.Tensor) -> torch.Tensor:
        """``(1/n)·solutionsᵀ∇L(z_i)`` for each row of ``solutions`` (m, p) and training index: (m, k) on the CPU.

        The training gradients are taken ``grad_chunk`` at a time, dotted and dropped: memory O(grad_chunk·p).
        """
        step = self.grad_chunk or train_idxs.numel()
        return torch.cat([
            (solutions @ self.train_gradients(train_idxs[i : i + step]).T).cpu() for i in range(0, train_idxs.numel(), step)
        ], dim=1) / self.n

    def predicted_param_changes(self, train_idxs: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Predicted ``θ₋ᵢ − θ*`` for each index: ``(1/n)(H+λI)⁻¹∇L(z_i)``, shape (k, p). One solve per point."""
        idxs = check_indices("train_idxs", train_idxs, self.n)
        self.prepare()
        x, _ = self.inverse_hvps(self.train_gradients(idxs))
        return x / self.n

    def _details(self) -> dict[str, Any]:
        return dict(self.options)


class ExactInfluence(InfluenceEstimator):
    """Materialise the Hessian, eigendecompose it, invert on the spectrum.

    Materialises the p×p Hessian: O(p²) memory, p HVPs over the data and an O(p³) eigendecomposition.
    Options: ``negative`` — policy for negative eigenvalues (``keep``: as they are, the paper's practice;
    ``clip``: set to 0; ``abs``: use magnitudes); ``vector_chunk`` — HVPs vmapped together; ``curvature`` —
    ``hessian`` (the paper's) or ``gauss_newton`` (:func:`~fragile.core.curvature.gauss_newton_matrix`, the
    linearised-network curvature that the PBRF's influence uses; positive semi-definite, so ``negative`` is moot).
    With ``gauss_newton``, ``hessian`` and the residuals refer to G, the matrix actually inverted.
    """

    method = "exact"
    OPTIONS = {"negative": "keep", "vector_chunk": 64, "curvature": "hessian"}

    def _check_options(self) -> None:
        check_choice("negative", self.options["negative"], NEGATIVE_POLICIES)
        check_int("vector_chunk", self.options["vector_chunk"], minimum=1)
        check_choice("curvature", self.options["curvature"], CURVATURES)

    def _prepare(self) -> None:
        if self.options["curvature"] == "gauss_newton":
            h = gauss_newton_matrix(self.objective, self.theta, self.x_train, data_chunk=self.data_chunk or 256,
                                    progress=self.progress)
        else:
            h = hessian_matrix(
                self.objective, self.theta, self.x_train, self.y_train,
                data_chunk=self.data_chunk, vector_chunk=self.options["vector_chunk"], progress=self.progress,
            )
        self.hessian = 0.5 * (h + h.T)
        self.asymmetry = float((h - h.T).abs().max())
        # float64 whatever the model's dtype: the inverse amplifies eigenvalue errors by 1/(λ_i + damping)².
        evals, self.eigenvectors = torch.linalg.eigh(self.hessian.double())
        self._spectrum = Spectrum.from_eigenvalues(evals)
        self.inverse_weights = spectral_inverse_weights(evals, self.damping, self.options["negative"], eps=torch.finfo(h.dtype).eps)

    def _apply(self, vs: torch.Tensor) -> torch.Tensor:
        return (((vs.double() @ self.eigenvectors) * self.inverse_weights) @ self.eigenvectors.T).to(vs.dtype)

    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        self.prepare()
        x = self._apply(v)
        return Solve(x, relative_residual(lambda z: self.hessian @ z, self.damping, x, v), 0)

    def inverse_hvps(self, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.prepare()
        xs = self._apply(vs)
        r = (xs @ self.hessian + self.damping * xs - vs).norm(dim=1) / vs.norm(dim=1).clamp_min(torch.finfo(vs.dtype).tiny)
        return xs, r  # against the true H: nonzero by design under the 'clip' and 'abs' policies

    def _details(self) -> dict[str, Any]:
        return {**self.options, "asymmetry": self.asymmetry}

    @property
    def residual_by_design(self) -> bool:
        return self.options["negative"] != "keep"


class CGInfluence(InfluenceEstimator):
    """Conjugate gradient on ``H + λI`` with exact HVPs; needs ``H + λI`` positive definite.

    :meth:`inverse_hvps` (hence :meth:`influences`) solves ``vector_chunk`` right-hand sides together
    (:func:`~fragile.core.solvers.cg_solve_many`): each keeps its own step lengths and stops at its own convergence,
    and every iteration is one HVP vmapped over the chunk's unconverged rows. Cost: up to ``max_iter`` such HVPs
    over the data per chunk (about as many vector-HVPs as one at a time, in fewer, cheaper-per-vector calls);
    memory O(vector_chunk·p) for the iterates plus ``vector_chunk`` times one HVP's activations.
    Options: ``rtol`` (relative residual to stop at), ``max_iter`` (default 2p), ``vector_chunk`` (right-hand
    sides solved together; 8 keeps memory near one HVP's while taking most of the batching's gain on the
    small-MNIST CNN).
    """

    method = "cg"
    OPTIONS = {"rtol": 1e-10, "max_iter": None, "vector_chunk": 8}

    def _check_options(self) -> None:
        check_positive("rtol", self.options["rtol"])
        if self.options["max_iter"] is not None:
            check_int("max_iter", self.options["max_iter"], minimum=1)
        check_int("vector_chunk", self.options["vector_chunk"], minimum=1)

    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        return cg_solve(self.hvp, v, damping=self.damping, rtol=self.options["rtol"], max_iter=self.options["max_iter"])

    def inverse_hvps(self, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.prepare()
        o = self.options
        solves = solve_in_chunks(
            lambda chunk: cg_solve_many(self.hvp, chunk, damping=self.damping, rtol=o["rtol"], max_iter=o["max_iter"]),
            vs, o["vector_chunk"],
        )
        return solves.x, solves.residuals.cpu()  # residuals on the CPU, as the one-at-a-time path returned them


class LissaInfluence(InfluenceEstimator):
    """Koh & Liang's stochastic estimator (LiSSA): a truncated Neumann series with minibatch HVPs.

    :meth:`inverse_hvps` (hence :meth:`influences`) runs ``vector_chunk`` right-hand sides' recursions together
    (:func:`~fragile.core.solvers.lissa_ihvps`): the same minibatches, in the same seeded order, as each would draw
    alone, with one HVP vmapped over the chunk per step. Cost: ``depth·repeats`` such HVPs per chunk; memory
    O(vector_chunk·p) for the iterates plus ``vector_chunk`` times one minibatch HVP's activations.
    Options: ``depth``, ``repeats``, ``batch_size`` (None = full batch, deterministic), ``scale`` (None: set to
    ``scale_margin·(λmax + λ)`` with λmax from power iteration on HVPs), ``scale_margin``, ``power_rtol``
    (the power iteration stops when λmax changes by less than this, relative; the margin makes 1e-3 enough for
    the scale, and it saves most of the iteration's full-data HVPs), ``seed``, ``growth_tolerance`` (divergence test),
    ``vector_chunk`` (right-hand sides run together; 8 as for CG). Divergence raises :class:`~fragile.errors.SolverDivergedError`.
    """

    method = "lissa"
    OPTIONS = {"depth": 5000, "repeats": 1, "batch_size": None, "scale": None, "scale_margin": 1.5, "power_rtol": 1e-6, "seed": 0,
               "growth_tolerance": 10.0, "vector_chunk": 8}

    def _check_options(self) -> None:
        o = self.options
        check_int("depth", o["depth"], minimum=1)
        check_int("repeats", o["repeats"], minimum=1)
        if o["batch_size"] is not None:
            check_int("batch_size", o["batch_size"], minimum=1, maximum=self.n)
        if o["scale"] is not None:
            check_positive("scale", o["scale"])
        check_positive("scale_margin", o["scale_margin"])
        check_positive("power_rtol", o["power_rtol"])
        check_int("seed", o["seed"], minimum=0)
        check_positive("growth_tolerance", o["growth_tolerance"])
        check_int("vector_chunk", o["vector_chunk"], minimum=1)

    def _prepare(self) -> None:
        lam = top_eigenvalue(self.hvp, self.p, dtype=self.theta.dtype, rtol=self.options["power_rtol"], seed=self.options["seed"],
                             device=self.theta.device)
        self._spectrum = Spectrum(lam, float("nan"), -1, 0.0)
        scale = self.options["scale"]
        self.scale = float(scale) if scale is not None else self.options["scale_margin"] * (abs(lam) + self.damping)
        log.info("lissa: λmax=%.4g, scale=%.4g", lam, self.scale)

    def _batch_hvp(self, v: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """``H_b v`` on the minibatch ``idx`` (None: all data); ``v`` (p,) or (m, p), vmapped by :func:`hvp`."""
        if idx is None:
            return self.hvp(v)
        return hvp(self.objective, self.theta, self.x_train[idx], self.y_train[idx], v, data_chunk=self.data_chunk)

    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        self.prepare()
        o = self.options
        return lissa_ihvp(
            self._batch_hvp, v, n=self.n, damping=self.damping, scale=self.scale, depth=o["depth"], repeats=o["repeats"],
            batch_size=o["batch_size"], seed=o["seed"], growth_tolerance=o["growth_tolerance"], exact_matvec=self.hvp,
        )

    def inverse_hvps(self, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.prepare()
        o = self.options
        solves = solve_in_chunks(
            lambda chunk: lissa_ihvps(
                self._batch_hvp, chunk, n=self.n, damping=self.damping, scale=self.scale, depth=o["depth"], repeats=o["repeats"],
                batch_size=o["batch_size"], seed=o["seed"], growth_tolerance=o["growth_tolerance"], exact_matvec=self.hvp,
            ),
            vs, o["vector_chunk"],
        )
        return solves.x, solves.residuals.cpu()  # residuals on the CPU, as the one-at-a-time path returned them

    def _details(self) -> dict[str, Any]:
        return {**self.options, "scale_used": getattr(self, "scale", None)}


class ArnoldiInfluence(InfluenceEstimator):
    """Influence in the subspace of the top-``rank`` Hessian eigenpairs found by Arnoldi (Schioppa et al.).

    ``(H+λI)⁻¹`` is replaced by ``U diag(1/(f(λ_k)+λ)) Uᵀ`` over the top eigenvectors ``U``; the
    complement is dropped, so with ``rank < p`` this is an approximation by design and its residual
    says how much. Cost: ``iterations`` HVPs once, then O(p·rank) per vector. Options: ``rank``
    (default p: full rank), ``iterations`` (default ``min(p, 2·rank)``), ``negative``, ``seed``.
    """

    method = "arnoldi"
    OPTIONS = {"rank": None, "iterations": None, "negative": "keep", "seed": 0}

    def _check_options(self) -> None:
        o = self.options
        rank = self.p if o["rank"] is None else o["rank"]
        check_int("rank", rank, minimum=1, maximum=self.p)
        iters = min(self.p, 2 * rank) if o["iterations"] is None else o["iterations"]
        check_int("iterations", iters, minimum=rank, maximum=self.p)
        check_choice("negative", o["negative"], NEGATIVE_POLICIES)
        check_int("seed", o["seed"], minimum=0)
        self.rank, self.iterations = rank, iters

    def _prepare(self) -> None:
        evals, self.eigenvectors = arnoldi_eigenpairs(
            self.hvp, self.p, iterations=self.iterations, top=self.rank, dtype=self.theta.dtype, seed=self.options["seed"],
            device=self.theta.device,
        )
        self.eigenvalues = evals
        self._spectrum = Spectrum.from_eigenvalues(evals, p=self.p)
        if self.rank < self.p:
            self._spectrum = Spectrum(self._spectrum.largest, float("nan"), -1, self._spectrum.tolerance, self._spectrum.eigenvalues)
        self.inverse_weights = spectral_inverse_weights(evals, self.damping, self.options["negative"])

    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        self.prepare()
        x = ((v @ self.eigenvectors) * self.inverse_weights) @ self.eigenvectors.T
        return Solve(x, relative_residual(self.hvp, self.damping, x, v), self.iterations)

    @property
    def residual_by_design(self) -> bool:
        return self.options["negative"] != "keep" or self.rank < self.p


class GradientDotInfluence(InfluenceEstimator):
    """Plain gradient dot products: the identity in place of ``(H + λI)⁻¹``, so
    ``predicted[t, i] = (1/n)·∇ℓ(z_t)ᵀ∇L(z_i)`` (a baseline, and TracIn at a single checkpoint with unit step).

    No solve: cost is the per-example gradients. The residual against ``H + λI`` (one HVP per test point) is large
    by design; it says how far the identity is from the damped Hessian.
    """

    method = "grad_dot"

    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        return Solve(v.clone(), relative_residual(self.hvp, self.damping, v, v), 0)

    @property
    def residual_by_design(self) -> bool:
        return True


# ekfac and tracin import InfluenceEstimator from here, so they are imported once it exists (at the top: an import cycle).
from fragile.estimators.ekfac import EKFACInfluence
from fragile.estimators.tracin import TracInInfluence

ESTIMATORS: dict[str, type[InfluenceEstimator]] = {
    cls.method: cls for cls in (
        ExactInfluence, CGInfluence, LissaInfluence, ArnoldiInfluence, GradientDotInfluence, EKFACInfluence, TracInInfluence,
    )
}
METHODS = tuple(ESTIMATORS)


def make_estimator(
    method: str, objective: Objective, theta: torch.Tensor, x_train: torch.Tensor, y_train: torch.Tensor, **kwargs: Any
) -> InfluenceEstimator:
    """Build the estimator named ``method`` (one of :data:`METHODS`); keyword arguments as in
    :class:`InfluenceEstimator` plus the method's own options. Everything is checked before work."""
    check_choice("method", method, METHODS)
    return ESTIMATORS[method](objective, theta, x_train, y_train, **kwargs)


def group_influence(predicted: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Predicted test-loss change for removing each group of training points, to first order: the sum of
    its members' influences (how the paper's appendix predicts group removal). (n_test, n) → (n_test, G).

    ``predicted`` has one column per training point (an :class:`InfluenceResult` over all of them). The
    first-order sum ignores how removing one member changes the others' influence; for large groups that
    interaction is what group-retraining measures against it.
    """
    if not isinstance(predicted, torch.Tensor) or predicted.ndim != 2:
        raise InvalidArgumentError("predicted must be a (n_test, n) tensor: one column per training point")
    if not groups:
        raise InvalidArgumentError("groups is empty; give at least one group of training indices")
    n = predicted.shape[1]
    return torch.stack([predicted[:, check_indices(f"groups[{g}]", grp, n)].sum(dim=1) for g, grp in enumerate(groups)], dim=1)
