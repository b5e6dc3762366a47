"""Did training reach the optimum influence functions assume? One class per trained model, from cheap diagnostics.

Influence functions linearise around a minimum. A model that is not at one is not evidence about the estimator: a
claim about architecture (depth, width, curvature) is decided on the converged models, with the count per class
beside it. The classes, tested in this order (the first that applies wins):

* **collapsed**: the network predicts (nearly) the same thing for every training input: its training accuracy is no
  better than always answering the majority class, or its predicted class probabilities hardly vary across the
  training inputs (the largest per-class standard deviation below ``constant_spread``). A constant softmax predictor
  has the Hessian spectrum of its output bias alone (for three balanced classes λmax = 1/3 + weight decay), with no
  negative eigenvalue and nothing for a removal to change: the estimator's agreement there measures nothing.
* **unstable**: full-batch gradient descent past its stability limit (``lr·λmax ≥ stability_limit``, 2 for gradient
  descent on a quadratic), or a training loss that rose at the end (:func:`loss_rise`: the mean of the last 5 % of
  steps above the lowest such window mean by more than ``rise_tolerance``, relative).
* **not converged**: ``‖∇J(θ*)‖`` above ``grad_tolerance``.
* **converged**: none of these.

Cost: nothing beyond what a chapter records (the gradient norm, λmax, the loss trajectory, the predictions on the
training set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fragile.errors import InvalidArgumentError, check_positive


class ConvergenceClass(StrEnum):
    """How a trained model ended, from best to worst for an influence estimate."""

    CONVERGED = "converged"
    NOT_CONVERGED = "not converged"
    UNSTABLE = "unstable"
    COLLAPSED = "collapsed"


@dataclass(frozen=True)
class ConvergenceCriteria:
    """The thresholds of :func:`classify_convergence`, fixed before any model is classified.

    Attributes:
        grad_tolerance: ‖∇J(θ*)‖ above this is *not converged*.
        stability_limit: lr·λmax at or above this is *unstable* for full-batch gradient descent (2: the step at
            which gradient descent on a quadratic stops converging).
        rise_tolerance: a final loss window above the lowest window by more than this share is *unstable*.
        constant_spread: predicted probabilities whose largest per-class standard deviation across training inputs
            is below this are a constant predictor: *collapsed*.
    """

    grad_tolerance: float = 1e-3
    stability_limit: float = 2.0
    rise_tolerance: float = 0.05
    constant_spread: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("grad_tolerance", "stability_limit", "rise_tolerance", "constant_spread"):
            check_positive(name, getattr(self, name))


@dataclass(frozen=True)
class Convergence:
    """One model's class and the reason, with the diagnostics it was decided on.

    Attributes:
        kind: the :class:`ConvergenceClass`.
        reason: why, in words, with the numbers ("lr·λmax = 2.02 ≥ 2").
    """

    kind: ConvergenceClass
    reason: str

    @property
    def converged(self) -> bool:
        return self.kind is ConvergenceClass.CONVERGED


def loss_rise(losses: np.ndarray, window: float = 0.05) -> float:
    """How far the mean of the last ``window`` share of ``losses`` (one value per step) lies above the lowest mean
    of any such window, relative to that lowest mean: 0 for a loss that never rose at the end."""
    if not 0 < window <= 0.5:
        raise InvalidArgumentError(f"window={window!r} is not allowed; it must be in (0, 0.5]")
    losses = np.asarray(losses, dtype=float).ravel()
    width = max(1, int(round(window * losses.size)))
    if losses.size < 2 * width:
        return 0.0
    means = np.convolve(losses, np.ones(width) / width, mode="valid")
    lowest, last = float(means.min()), float(means[-1])
    return (last - lowest) / max(abs(lowest), np.finfo(float).tiny)


def classify_convergence(
    *,
    grad_norm: float,
    train_accuracy: float,
    majority_share: float,
    prediction_spread: float,
    lr_times_lambda_max: float = math.nan,
    full_batch_gd: bool = False,
    loss_rise: float = 0.0,
    criteria: ConvergenceCriteria = ConvergenceCriteria(),
) -> Convergence:
    """The :class:`Convergence` of one trained model (classes and order in the module's docstring).

    Args:
        grad_norm: ‖∇J(θ*)‖ of the full training objective.
        train_accuracy: share of training points classified correctly.
        majority_share: share of the training set's most common class (what a constant predictor scores).
        prediction_spread: the largest, over classes, standard deviation across training inputs of the predicted
            probability (:func:`prediction_spread`).
        lr_times_lambda_max: lr·λmax; tested against the stability limit only for full-batch gradient descent.
        full_batch_gd: whether the model was trained by full-batch gradient descent.
        loss_rise: how far the training loss rose at the end (:func:`loss_rise`; 0 when not recorded).
        criteria: the thresholds.
    """
    for name, value in (("train_accuracy", train_accuracy), ("majority_share", majority_share)):
        if not 0 <= value <= 1:
            raise InvalidArgumentError(f"{name}={value!r} is not allowed; it must be a share in [0, 1]")
    if not (prediction_spread >= 0 and grad_norm >= 0):
        raise InvalidArgumentError("prediction_spread and grad_norm must be numbers >= 0")
    if train_accuracy <= majority_share + 1e-12:
        return Convergence(
            ConvergenceClass.COLLAPSED,
            f"training accuracy {train_accuracy:.3f} is no better than the majority class's share {majority_share:.3f}",
        )
    if prediction_spread < criteria.constant_spread:
        return Convergence(
            ConvergenceClass.COLLAPSED,
            f"predictions hardly vary across training inputs (spread {prediction_spread:.2g} < {criteria.constant_spread:g})",
        )
    if full_batch_gd and lr_times_lambda_max >= criteria.stability_limit:
        return Convergence(
            ConvergenceClass.UNSTABLE, f"lr·λmax = {lr_times_lambda_max:.3g} ≥ {criteria.stability_limit:g} (gradient descent)"
        )
    if loss_rise > criteria.rise_tolerance:
        return Convergence(ConvergenceClass.UNSTABLE, f"the training loss rose {loss_rise:.1%} at the end")
    if not grad_norm <= criteria.grad_tolerance:
        return Convergence(ConvergenceClass.NOT_CONVERGED, f"‖∇‖ = {grad_norm:.2g} > {criteria.grad_tolerance:g}")
    return Convergence(ConvergenceClass.CONVERGED, f"‖∇‖ = {grad_norm:.2g} ≤ {criteria.grad_tolerance:g}")


def prediction_spread(logits: np.ndarray) -> float:
    """The largest, over classes, standard deviation across inputs of the softmax probabilities of ``logits`` (n, C):
    0 for a constant predictor."""
    z = np.asarray(logits, dtype=float)
    if z.ndim != 2 or z.shape[0] < 2:
        raise InvalidArgumentError(f"logits must be (n, C) with n >= 2; got shape {z.shape}")
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return float(p.std(axis=0).max())


def majority_share(labels: np.ndarray) -> float:
    """The share of the most common label: the accuracy of always answering it."""
    y = np.asarray(labels).ravel()
    if y.size == 0:
        raise InvalidArgumentError("labels is empty")
    return float(np.bincount(y.astype(np.int64)).max() / y.size)


__all__ = [
    "Convergence",
    "ConvergenceClass",
    "ConvergenceCriteria",
    "classify_convergence",
    "loss_rise",
    "majority_share",
    "prediction_spread",
]
