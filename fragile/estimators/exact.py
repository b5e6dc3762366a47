"""Exact influence: materialise the curvature matrix, eigendecompose it, invert on the spectrum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fragile.core.curvature import Spectrum, gauss_newton_matrix, hessian_matrix
from fragile.core.solvers import Solve, relative_residual, spectral_inverse_weights
from fragile.errors import check_choice, check_int
from fragile.estimators.base import NEGATIVE_POLICIES, EstimatorOptions, SolvingEstimator, option
from fragile.estimators.registry import register

CURVATURES = ("hessian", "gauss_newton")
"""The matrices :class:`ExactInfluence` can invert: the Hessian (the paper's) or the Gauss–Newton matrix."""


@dataclass(frozen=True)
class ExactOptions(EstimatorOptions):
    """Options of :class:`ExactInfluence`."""

    negative: str = option(
        "keep",
        (
            f"policy for negative eigenvalues, one of {list(NEGATIVE_POLICIES)}: keep them as they are "
            "(the paper's practice), clip them to 0, or use their magnitudes (abs)"
        ),
    )
    vector_chunk: int = option(
        64, "Hessian rows (HVP directions) vmapped together while materialising the Hessian; an integer >= 1"
    )
    curvature: str = option(
        "hessian",
        (
            f"the matrix inverted, one of {list(CURVATURES)}: the Hessian, or the Gauss-Newton matrix "
            "(fragile.core.curvature.gauss_newton_matrix; positive semi-definite, so negative is moot)"
        ),
    )

    def __post_init__(self) -> None:
        check_choice("negative", self.negative, NEGATIVE_POLICIES)
        check_int("vector_chunk", self.vector_chunk, minimum=1)
        check_choice("curvature", self.curvature, CURVATURES)


@register
class ExactInfluence(SolvingEstimator):
    """Materialise the Hessian, eigendecompose it, invert on the spectrum.

    Materialises the p×p Hessian: O(p²) memory, p HVPs over the data and an O(p³) eigendecomposition.
    Options (:class:`ExactOptions`): ``negative`` — policy for negative eigenvalues (``keep``: as they are, the
    paper's practice; ``clip``: set to 0; ``abs``: use magnitudes); ``vector_chunk`` — HVPs vmapped together;
    ``curvature`` — ``hessian`` (the paper's) or ``gauss_newton`` (:func:`~fragile.core.curvature.gauss_newton_matrix`,
    the linearised-network curvature that the PBRF's influence uses; positive semi-definite, so ``negative`` is
    moot; cross-entropy and ``mse`` losses only). With ``gauss_newton``, ``hessian`` and the residuals refer to G,
    the matrix actually inverted.
    """

    method = "exact"
    Options = ExactOptions
    options: ExactOptions

    def _check_problem(self) -> None:
        if self.options.curvature == "gauss_newton":
            self.objective.require_loss(("cross_entropy", "mse"), "curvature='gauss_newton'")

    def _prepare(self) -> None:
        o = self.options
        if o.curvature == "gauss_newton":
            h = gauss_newton_matrix(
                self.objective, self.theta, self.x_train, data_chunk=self.data_chunk or 256, progress=self.progress
            )
        else:
            h = hessian_matrix(
                self.objective,
                self.theta,
                self.x_train,
                self.y_train,
                data_chunk=self.data_chunk,
                vector_chunk=o.vector_chunk,
                progress=self.progress,
            )
        self.hessian = 0.5 * (h + h.T)
        self.asymmetry = float((h - h.T).abs().max())
        # float64 whatever the model's dtype: the inverse amplifies eigenvalue errors by 1/(λ_i + damping)².
        evals, self.eigenvectors = torch.linalg.eigh(self.hessian.double())
        self._spectrum = Spectrum.from_eigenvalues(evals)
        self.inverse_weights = spectral_inverse_weights(evals, self.damping, o.negative, eps=torch.finfo(h.dtype).eps)

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
        return {**self.options.to_dict(), "asymmetry": self.asymmetry}

    @property
    def residual_by_design(self) -> bool:
        return self.options.negative != "keep"


__all__ = ["CURVATURES", "ExactInfluence", "ExactOptions"]
