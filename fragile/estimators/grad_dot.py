"""Plain gradient dot products: the identity in place of ``(H + λI)⁻¹`` (a baseline, and TracIn at θ* with unit step)."""

from __future__ import annotations

import torch

from fragile.core.curvature import hvp
from fragile.core.solvers import relative_residual
from fragile.estimators.base import InfluenceEstimator
from fragile.estimators.registry import register


@register
class GradientDotInfluence(InfluenceEstimator):
    """Plain gradient dot products: ``predicted[t, i] = (1/n)·∇ℓ(z_t)ᵀ∇L(z_i)``, the identity in place of
    ``(H + λI)⁻¹`` (a baseline, and TracIn at a single checkpoint with unit step). No options.

    No solve: cost is the per-example gradients, plus one HVP per test point for the reported residual of the
    identity against ``H + λI``; it is large by design, and says how far the identity is from the damped Hessian.
    """

    method = "grad_dot"

    @property
    def residual_by_design(self) -> bool:
        return True

    def _predict(self, x_test: torch.Tensor, y_test: torch.Tensor, train_idxs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_test = self.objective.sample_grads(self.theta, x_test, y_test, self.grad_chunk)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return hvp(self.objective, self.theta, self.x_train, self.y_train, v, data_chunk=self.data_chunk)

        # One HVP per test point, as a solver's residual is computed, so that the residuals keep their bits.
        residuals = torch.tensor([relative_residual(matvec, self.damping, g, g) for g in g_test], dtype=g_test.dtype)
        return self.train_scores(g_test, train_idxs), residuals


__all__ = ["GradientDotInfluence"]
