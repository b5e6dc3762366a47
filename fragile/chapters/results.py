"""What the shared protocol's steps return: frozen, typed values that jobs hand back and the cache stores.

Every type here is a payload record (:func:`fragile.run.payload.record`): a job result built from them is stored as
JSON and ``.npz`` and rebuilt by these constructors, never unpickled. An estimator that failed on its problem is an
:class:`EstimatorFailure`, a value of its own type beside :class:`Estimate`; both answer ``failed``, so a chapter
tests ``e.failed`` rather than looking for a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

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
    """

    train_loss: float
    train_accuracy: float
    test_accuracy: float
    grad_norm: float
    seconds: float


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
