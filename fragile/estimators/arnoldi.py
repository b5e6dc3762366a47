"""Arnoldi influence (Schioppa et al.): the inverse restricted to the top Hessian eigenpairs found by Arnoldi."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fragile.core.curvature import Spectrum
from fragile.core.solvers import (
    Solve,
    arnoldi_eigenpairs,
    check_optional_bound,
    check_residuals,
    relative_residual,
    spectral_inverse_weights,
)
from fragile.errors import InvalidArgumentError, check_choice, check_int
from fragile.estimators.base import NEGATIVE_POLICIES, EstimatorOptions, SolvingEstimator, check_optional_int, option
from fragile.estimators.registry import register


@dataclass(frozen=True)
class ArnoldiOptions(EstimatorOptions):
    """Options of :class:`ArnoldiInfluence`."""

    rank: int | None = option(None, "top eigenpairs kept; an integer in [1, p], or None for p (full rank)")
    iterations: int | None = option(
        None, "Arnoldi iterations (one HVP each); an integer in [rank, p], or None for min(p, 2·rank)"
    )
    negative: str = option("keep", f"policy for negative eigenvalues, one of {list(NEGATIVE_POLICIES)} (as for method='exact')")
    seed: int = option(0, "seed of the Arnoldi start vector; an integer >= 0")
    max_residual: float | None = option(
        10.0,
        (
            "the largest relative residual ‖(H+λI)x − v‖/‖v‖ returned as a solution; a solve above it raises "
            "SolverDivergedError. Dropping the complement of the top eigenvectors gives at most 1 (2 with negative='abs'), "
            "so more means inaccurate eigenpairs amplified by a small λ_k + λ; not applied with negative='clip', whose "
            "residual |λ_neg|/λ is large by design. A finite number > 0, or None to return every solve"
        ),
    )

    def __post_init__(self) -> None:
        check_optional_int("rank", self.rank, minimum=1)
        check_optional_int("iterations", self.iterations, minimum=1)
        if self.rank is not None and self.iterations is not None and self.iterations < self.rank:
            raise InvalidArgumentError(f"iterations={self.iterations} is not allowed; it must be >= rank={self.rank}")
        check_choice("negative", self.negative, NEGATIVE_POLICIES)
        check_int("seed", self.seed, minimum=0)
        check_optional_bound("max_residual", self.max_residual)


@register
class ArnoldiInfluence(SolvingEstimator):
    """Influence in the subspace of the top-``rank`` Hessian eigenpairs found by Arnoldi (Schioppa et al.).

    ``(H+λI)⁻¹`` is replaced by ``U diag(1/(f(λ_k)+λ)) Uᵀ`` over the top eigenvectors ``U``; the
    complement is dropped, so with ``rank < p`` this is an approximation by design and its residual
    says how much (at most 1 with exact eigenpairs: a residual above ``max_residual`` raises
    :class:`~fragile.errors.SolverDivergedError`). Cost: ``iterations`` HVPs once, then O(p·rank) per vector plus
    one HVP for its residual. Options: :class:`ArnoldiOptions`.
    """

    method = "arnoldi"
    Options = ArnoldiOptions
    options: ArnoldiOptions

    def _check_problem(self) -> None:
        o = self.options
        rank = self.p if o.rank is None else o.rank
        check_int("rank", rank, minimum=1, maximum=self.p)
        iters = min(self.p, 2 * rank) if o.iterations is None else o.iterations
        check_int("iterations", iters, minimum=rank, maximum=self.p)
        self.rank, self.iterations = rank, iters

    def _prepare(self) -> None:
        evals, self.eigenvectors = arnoldi_eigenpairs(
            self.hvp,
            self.p,
            iterations=self.iterations,
            top=self.rank,
            dtype=self.theta.dtype,
            seed=self.options.seed,
            device=self.theta.device,
        )
        self.eigenvalues = evals
        self._spectrum = Spectrum.from_eigenvalues(evals, p=self.p)
        if self.rank < self.p:
            top = self._spectrum
            self._spectrum = Spectrum(top.largest, float("nan"), -1, top.tolerance, top.eigenvalues)
        self.inverse_weights = spectral_inverse_weights(evals, self.damping, self.options.negative)

    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        self.prepare()
        x = ((v @ self.eigenvectors) * self.inverse_weights) @ self.eigenvectors.T
        residual = relative_residual(self.hvp, self.damping, x, v)
        if self.options.negative != "clip":
            check_residuals(
                "arnoldi",
                torch.tensor([residual], dtype=torch.float64),
                self.options.max_residual,
                f"rank {self.rank} of p={self.p} from {self.iterations} iterations, damping={self.damping}: the eigenpairs "
                "are inaccurate where an eigenvalue plus damping is small; raise iterations or damping",
            )
        return Solve(x, residual, self.iterations)

    @property
    def residual_by_design(self) -> bool:
        return self.options.negative != "keep" or self.rank < self.p


__all__ = ["ArnoldiInfluence", "ArnoldiOptions"]
