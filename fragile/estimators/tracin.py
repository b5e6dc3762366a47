"""TracIn (Pruthi et al. 2020, TracInCP): influence as gradient agreement summed over training checkpoints.

    predicted[t, i] = (1/n) · Σ_k η_k · ∇ℓ(z_t; θ_k) · ∇L(z_i; θ_k),

over saved parameters ``θ_k`` with step sizes ``η_k``, where ``ℓ(z_t)`` is the test loss and
``L(z_i) = ℓ(z_i) + (weight_decay/2)‖θ‖²`` the training point's share of the objective (as for every estimator
in :mod:`fragile.estimators.base`). With one checkpoint at θ* and unit step it is
:class:`~fragile.estimators.grad_dot.GradientDotInfluence` exactly.

Why these conventions. Full-batch gradient descent on ``L(θ) = (1/n)·Σ_i L(z_i; θ)`` takes the step
``θ_{k+1} − θ_k = −η_k·(1/n)·Σ_i ∇L(z_i; θ_k)``, so to first order in the step the test loss changes by
``L_test(θ_{k+1}) − L_test(θ_k) = −Σ_i (1/n)·η_k·∇ℓ(z_t; θ_k)·∇L(z_i; θ_k)``. With checkpoints taken *before*
every step (``θ_0 … θ_{T−1}``, i.e. ``fit(checkpoint_every=1).checkpoints[:-1]``) the predictions telescope:
``Σ_i predicted[t, i] = L_test(θ_0) − L_test(θ_T) + O(Σ_k η_k²)``. Each point's term is the part of the test
loss's decrease its own share of the objective (its loss *and* its 1/n share of the regulariser) caused, so a
positive value says that training on the point lowered the test loss: removing it would raise it, the sign
of the other estimators. With checkpoints every ``e`` steps of a constant rate ``lr``, ``η_k = e·lr`` stands for
the e steps each checkpoint represents (TracInCP's approximation); for minibatch training it estimates the
same sum in expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fragile.errors import InvalidArgumentError
from fragile.estimators.base import EstimatorOptions, InfluenceEstimator, option
from fragile.estimators.registry import register


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field has no single truth value
class TracInOptions(EstimatorOptions):
    """Options of :class:`TracInInfluence`."""

    checkpoints: torch.Tensor | None = option(
        None,
        (
            "required: a (C, p) tensor of saved parameter vectors θ_k, C >= 1, finite "
            "(one model of a TrainResult.checkpoints stack: result.checkpoints[:, k])"
        ),
    )
    lrs: tuple[float, ...] | None = option(
        None,
        (
            "C step sizes η_k, finite and > 0, one per checkpoint (a sequence or a 1-D tensor, whose values are used as "
            "stored: a float32 tensor gives 0.3 as 0.30000001); None means all 1.0. Kept as a tuple of floats"
        ),
    )

    def __post_init__(self) -> None:
        ck = self.checkpoints
        if ck is None:
            raise InvalidArgumentError(
                "checkpoints is required for method='tracin': a (C, p) tensor of saved parameters, e.g. "
                "fit(..., checkpoint_every=e).checkpoints[:, 0]"
            )
        if not isinstance(ck, torch.Tensor) or ck.ndim != 2 or ck.shape[0] < 1:
            got = tuple(ck.shape) if isinstance(ck, torch.Tensor) else type(ck).__name__
            raise InvalidArgumentError(f"checkpoints has shape {got}; expected (C, p) with C >= 1")
        if not bool(torch.isfinite(ck).all()):
            raise InvalidArgumentError("checkpoints has non-finite entries")
        c = ck.shape[0]
        if self.lrs is None:
            return
        try:
            lrs = [float(v) for v in (self.lrs.reshape(-1).tolist() if isinstance(self.lrs, torch.Tensor) else self.lrs)]
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"lrs={self.lrs!r} is not allowed; give {c} step sizes > 0, one per checkpoint") from exc
        if len(lrs) != c or not all(math.isfinite(v) and v > 0 for v in lrs):
            raise InvalidArgumentError(
                f"lrs has {len(lrs)} values {lrs[:5]}…; expected {c} finite step sizes > 0, one per checkpoint"
            )
        object.__setattr__(self, "lrs", tuple(lrs))  # the dataclass is frozen; this one normalisation happens here, once


@register
class TracInInfluence(InfluenceEstimator):
    """TracInCP over saved checkpoints (see the module doc for the formula and its sign).

    Options: :class:`TracInOptions` (``checkpoints``, required, and ``lrs``).

    ``theta`` (θ*) is used only by the base class's checks: TracIn evaluates gradients at the checkpoints alone,
    so pass θ* among them to include it. ``damping`` is ignored: there is no Hessian. TracIn solves no system:
    it has no inverse HVP, and :meth:`influences` reports NaN residuals (:attr:`residual_by_design` is True).

    Cost: per checkpoint, the test gradients and the k training gradients (``grad_chunk`` at a time, dotted
    and dropped): C·(n_test + k) per-example gradients, memory O((n_test + grad_chunk)·p).
    """

    method = "tracin"
    Options = TracInOptions
    options: TracInOptions

    def _check_problem(self) -> None:
        ck = self.options.checkpoints
        if ck.shape[1] != self.p:
            raise InvalidArgumentError(f"checkpoints has shape {tuple(ck.shape)}; expected (C, p) with C >= 1 and p={self.p}")
        self.checkpoints = ck.detach().to(device=self.theta.device, dtype=self.theta.dtype)
        self.lrs = list(self.options.lrs) if self.options.lrs is not None else [1.0] * ck.shape[0]

    @property
    def residual_by_design(self) -> bool:
        return True

    def _predict(self, x_test: torch.Tensor, y_test: torch.Tensor, train_idxs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        predicted = None
        for theta_k, lr in zip(self.checkpoints, self.lrs):
            term = lr * self._scores(theta_k, x_test, y_test, train_idxs)
            predicted = term if predicted is None else predicted + term
        return predicted, torch.full((x_test.shape[0],), float("nan"), dtype=predicted.dtype)

    def _scores(self, theta: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
        """``(1/n)·∇ℓ(z_t; θ)·∇L(z_i; θ)`` at one checkpoint, (n_test, k) on the CPU; the same chunked products as
        :meth:`~fragile.estimators.base.InfluenceEstimator.train_scores`, at ``theta`` instead of θ*."""
        g_test = self.objective.sample_grads(theta, x_test, y_test, self.grad_chunk)
        step = self.grad_chunk or idxs.numel()
        return (
            torch.cat(
                [
                    (
                        g_test @ self.objective.point_grads(theta, self.x_train[chunk], self.y_train[chunk], self.grad_chunk).T
                    ).cpu()
                    for chunk in (idxs[i : i + step] for i in range(0, idxs.numel(), step))
                ],
                dim=1,
            )
            / self.n
        )

    def _details(self) -> dict[str, Any]:
        return {"num_checkpoints": int(self.checkpoints.shape[0]), "lrs": list(self.lrs)}


__all__ = ["TracInInfluence", "TracInOptions"]
