"""What the shared protocol's steps return: frozen, typed values that jobs hand back and the cache stores.

Every type here is a payload record (:func:`fragile.run.payload.record`): a job result built from them is stored as
JSON and ``.npz`` and rebuilt by these constructors, never unpickled. An estimator that failed on its problem is an
:class:`EstimatorFailure`, a value of its own type beside :class:`Estimate`; both answer ``failed``, so a chapter
tests ``e.failed`` rather than looking for a key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fragile.core.convergence import Convergence, ConvergenceCriteria, classify_convergence
from fragile.run.payload import record


@record
@dataclass(frozen=True)
class Fit:
    """A trained model's diagnostics at θ*.

    Attributes:
        train_loss: mean training loss (without the weight-decay term).
        train_accuracy, test_accuracy: fraction of correctly classified training and test points.
        grad_norm: ‖∇‖ of the full training objective (weight decay included) at the end of training.
        seconds: wall time of the training.
        majority_share: the training set's most common class's share (what a constant predictor scores).
        prediction_spread: the largest per-class standard deviation of the predicted probabilities across the
            training inputs (:func:`~fragile.core.convergence.prediction_spread`; 0 for a constant predictor).
        loss_rise: how far the training loss rose at the end (:func:`~fragile.core.convergence.loss_rise` of the
            per-step, minibatch, losses).
    """

    train_loss: float
    train_accuracy: float
    test_accuracy: float
    grad_norm: float
    seconds: float
    majority_share: float
    prediction_spread: float
    loss_rise: float

    def convergence(
        self, criteria: ConvergenceCriteria, *, lr_times_lambda_max: float = math.nan, full_batch_gd: bool = False
    ) -> Convergence:
        """This model's convergence class (:func:`~fragile.core.convergence.classify_convergence`)."""
        return classify_convergence(
            grad_norm=self.grad_norm,
            train_accuracy=self.train_accuracy,
            majority_share=self.majority_share,
            prediction_spread=self.prediction_spread,
            lr_times_lambda_max=lr_times_lambda_max,
            full_batch_gd=full_batch_gd,
            loss_rise=self.loss_rise,
            criteria=criteria,
        )


@record
@dataclass(frozen=True)
class Estimate:
    """One estimator's predictions on the chosen test points.

    Attributes:
        method: the estimator's registry name.
        predicted: (n_test, n) predicted change of each test loss when each training point is removed.
        residuals: (n_test,) relative residual of each inverse-HVP solve (0 for a direct solve, NaN where none).
        seconds: wall time of the estimator, set-up included.
        lambda_max: the largest Hessian eigenvalue the method learned, where it learned one.
        scale: LiSSA's scale, where the method is LiSSA.
        eigenvalues: the exact Hessian's eigenvalues, ascending, where they were asked for.
        asymmetry: the exact Hessian's relative asymmetry before symmetrisation, with ``eigenvalues``.
    """

    failed: ClassVar[bool] = False

    method: str
    predicted: np.ndarray
    residuals: np.ndarray
    seconds: float
    lambda_max: float | None = None
    scale: float | None = None
    eigenvalues: np.ndarray | None = None
    asymmetry: float | None = None


@record
@dataclass(frozen=True)
class EstimatorFailure:
    """An estimator that failed on its problem (LiSSA diverging, CG on an indefinite H + λI), with why."""

    failed: ClassVar[bool] = True

    method: str
    message: str


@record
@dataclass(frozen=True)
class Agreement:
    """Predicted against actual changes over the same training points."""

    spearman: float
    pearson: float
