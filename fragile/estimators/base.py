"""The influence estimators' common interface, their result, and the base of their typed options.

Sign convention: ``predicted[t, i]`` is the predicted change of test point ``t``'s loss (more generally its
measurement, :class:`~fragile.core.objective.Objective`) when training point ``i`` is removed,

    predicted[t, i] = +(1/n) · ∇ℓ(z_t)ᵀ (H + λI)⁻¹ ∇L(z_i),

with ``H`` the Hessian of the mean training objective (weight decay included), ``λ`` the damping,
``ℓ(z_t)`` the test loss (no regulariser) and ``L(z_i) = ℓ(z_i) + (weight_decay/2)‖θ‖²`` a training
point's share of the objective (see :meth:`~fragile.core.objective.Objective.point_grads`). Positive means that
removing the point raises the test loss. The predicted parameter change on removal is ``+(1/n)(H+λI)⁻¹∇L(z_i)``.

Three chunk sizes bound memory; each has one meaning wherever it appears (estimators, curvature, solvers):

* ``data_chunk``: training examples per pass of a curvature product (an HVP, the Gauss–Newton matrix, EK-FAC's
  factors): bounds the activations kept for one pass. None: all n at once.
* ``grad_chunk``: examples per vmapped per-example-gradient call (training and test gradients): bounds the
  O(grad_chunk·p) gradients and their activations alive at once. None: all at once.
* ``vector_chunk``: vectors handled together, each a right-hand side of the solve or a direction of an HVP,
  vmapped into one batched HVP: bounds O(vector_chunk·p) iterates plus ``vector_chunk`` HVPs' activations.

Estimators are built by :func:`fragile.estimators.make_estimator` and registered by name in
:mod:`fragile.estimators.registry`; this module holds what they share.

Example:
    >>> est = make_estimator("cg", objective, theta, x_train, y_train, damping=0.01)  # doctest: +SKIP
    >>> result = est.influences(x_test, y_test)                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from fragile.core.curvature import Spectrum, hvp
from fragile.core.objective import Objective
from fragile.core.solvers import Solve
from fragile.errors import InvalidArgumentError, check_compatible, check_indices, check_int, check_positive

log = logging.getLogger(__name__)

NEGATIVE_POLICIES = ("keep", "clip", "abs")
"""What a spectral method does with negative Hessian eigenvalues: ``keep`` them (the paper's practice), ``clip``
them to 0, or use their ``abs`` magnitudes."""

ESTIMATOR_ARGUMENTS = ("damping", "data_chunk", "grad_chunk", "progress")
"""The keyword arguments every estimator takes besides its method's options (:class:`InfluenceEstimator`)."""


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
        details: the method's options (:meth:`EstimatorOptions.to_dict`) and what it measured on the way.
    """

    predicted: torch.Tensor
    train_idxs: torch.Tensor
    method: str
    damping: float
    residuals: torch.Tensor
    spectrum: Spectrum | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # A tensor enters a job key by its content: shape, dtype and a digest of its bytes.
        data = value.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."), "sha256": digest}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class EstimatorOptions:
    """Base of the methods' option dataclasses.

    Each subclass is a frozen dataclass whose fields are declared with :func:`option` (a default and a help text:
    meaning and allowed range) and whose ``__post_init__`` checks every range that does not depend on the problem,
    raising :class:`~fragile.errors.InvalidArgumentError` naming the field; checks against the problem (sizes n and
    p) are made by the estimator's constructor.
    """

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, JSON-friendly (a tensor as its shape, dtype and SHA-256), in field order: for job keys."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each field's help text, by name."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


def option(default: Any, help_text: str) -> Any:
    """A field of an :class:`EstimatorOptions` dataclass: its default and its help text (meaning and allowed range),
    kept in the field's metadata, where :meth:`EstimatorOptions.help` reads it back."""
    return field(default=default, metadata={"help": help_text})


def check_optional_int(name: str, value: Any, *, minimum: int) -> None:
    """Raise unless ``value`` is None or an int >= ``minimum``."""
    if value is not None:
        check_int(name, value, minimum=minimum)


class InfluenceEstimator(ABC):
    """Common interface of the influence estimators: checked construction, training gradients and scores, and
    :meth:`influences`.

    Subclasses set :attr:`method` and :attr:`Options` (their :class:`EstimatorOptions` dataclass, or None when the
    method has none), implement :meth:`_predict` and optionally :meth:`_prepare` (one-off work) and
    :meth:`_check_problem` (option checks that need n or p). Everything is checked when the estimator is built,
    before any work (:meth:`~fragile.core.objective.Objective.check_inputs`'s checks: finite θ and data, labels in
    ``[0, outputs)``, one dtype and device; about one pass over each plus one forward pass on one row, made after the
    method's own checks).

    Args:
        objective: the training objective the model was trained on.
        theta: trained parameters θ*, (p,), finite, of the training inputs' dtype and device.
        x_train, y_train: the full training set the objective averages over.
        options: an instance of the method's :attr:`Options`; None: its defaults.
        damping: λ >= 0 added to the Hessian.
        data_chunk: training examples per HVP pass (module doc); None = all at once.
        grad_chunk: examples per vmapped per-example-gradient call (module doc); None = all at once.
        progress: show progress bars.
    """

    method: ClassVar[str]
    Options: ClassVar[type[EstimatorOptions] | None] = None

    def __init__(
        self,
        objective: Objective,
        theta: torch.Tensor,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        *,
        options: EstimatorOptions | None = None,
        damping: float = 0.0,
        data_chunk: int | None = None,
        grad_chunk: int | None = 256,
        progress: bool = True,
    ):
        objective.check_data("x_train", x_train, "y_train", y_train)
        objective.check_params("theta", theta)
        check_compatible("theta", theta, "x_train", x_train)
        check_positive("damping", damping, allow_zero=True)
        check_optional_int("data_chunk", data_chunk, minimum=1)
        check_optional_int("grad_chunk", grad_chunk, minimum=1)
        self.options = self._resolve_options(options)
        self.objective, self.theta = objective, theta.detach()
        self.x_train, self.y_train = x_train, y_train
        self.n, self.p = x_train.shape[0], objective.num_params
        self.damping = float(damping)
        self.data_chunk, self.grad_chunk, self.progress = data_chunk, grad_chunk, progress
        self._prepared = False
        self._spectrum: Spectrum | None = None
        self._check_problem()
        # Last: it runs the model on one row, and a model the method refuses (EK-FAC's layers) must not run at all.
        objective.check_label_range(theta, x_train, "y_train", y_train)

    @classmethod
    def _resolve_options(cls, options: EstimatorOptions | None) -> EstimatorOptions | None:
        if cls.Options is None:
            if options is not None:
                raise InvalidArgumentError(f"method={cls.method!r} takes no options; got options={options!r}")
            return None
        if options is None:
            return cls.Options()
        if not isinstance(options, cls.Options):
            raise InvalidArgumentError(
                f"options={options!r} is not allowed for method={cls.method!r}; give a {cls.Options.__name__} (or None)"
            )
        return options

    def _check_problem(self) -> None:  # noqa: B027 - an optional hook: most methods check nothing against the problem
        """Check the options against the problem (n, p, the model), at construction (subclasses extend)."""

    @property
    def residual_by_design(self) -> bool:
        """True when the method solves a modified system on purpose (a negative-eigenvalue policy, a truncated
        spectrum), so its residual against ``H + λI`` measures the modification, not a solver failure."""
        return False

    def prepare(self) -> InfluenceEstimator:
        """Do the method's one-off work (idempotent)."""
        if not self._prepared:
            self._prepare()
            self._prepared = True
        return self

    def _prepare(self) -> None:  # noqa: B027 - an optional hook: not every method has one-off work
        """The method's one-off work, run once by :meth:`prepare` (subclasses extend)."""

    @property
    def spectrum(self) -> Spectrum | None:
        """What the method knows of the Hessian spectrum (after :meth:`prepare`)."""
        return self._spectrum

    # -- public API -------------------------------------------------------------------------------
    def train_gradients(self, train_idxs: torch.Tensor) -> torch.Tensor:
        """Gradients ``∇L(z_i)`` of the given training points' shares of the objective, (k, p)."""
        return self.objective.point_grads(self.theta, self.x_train[train_idxs], self.y_train[train_idxs], self.grad_chunk)

    def train_scores(self, solutions: torch.Tensor, train_idxs: torch.Tensor) -> torch.Tensor:
        """``(1/n)·solutionsᵀ∇L(z_i)`` for each row of ``solutions`` (m, p) and training index: (m, k) on the CPU.

        The training gradients are taken ``grad_chunk`` at a time, dotted and dropped: memory O(grad_chunk·p).
        """
        step = self.grad_chunk or train_idxs.numel()
        return (
            torch.cat(
                [
                    (solutions @ self.train_gradients(train_idxs[i : i + step]).T).cpu()
                    for i in range(0, train_idxs.numel(), step)
                ],
                dim=1,
            )
            / self.n
        )

    def influences(
        self, x_test: torch.Tensor, y_test: torch.Tensor, train_idxs: Sequence[int] | torch.Tensor | None = None
    ) -> InfluenceResult:
        """Predicted change of each test loss when each training point is removed (sign: module doc).

        The training gradients are taken ``grad_chunk`` at a time, each chunk dotted with the test side and
        dropped: memory O(grad_chunk·p), never (k, p). The method's cost is stated by its class.

        Args:
            x_test, y_test: test inputs (same feature shape as ``x_train``) and targets.
            train_idxs: training points to score; None means all of them.
        """
        idxs = self._check_query(x_test, y_test, train_idxs)
        start = time.perf_counter()
        self.prepare()
        predicted, residuals = self._predict(x_test, y_test, idxs)
        worst = float(residuals.max())
        if worst > 1e-3 and not self.residual_by_design:
            log.warning("%s: inverse-HVP relative residual up to %.3g (see InfluenceResult.residuals)", self.method, worst)
        return InfluenceResult(
            predicted, idxs, self.method, self.damping, residuals, self._spectrum, time.perf_counter() - start, self._details()
        )

    @abstractmethod
    def _predict(self, x_test: torch.Tensor, y_test: torch.Tensor, train_idxs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (n_test, k) predictions on the CPU and the (n_test,) residuals, after :meth:`prepare`."""

    def _check_query(self, x_test: torch.Tensor, y_test: torch.Tensor, train_idxs) -> torch.Tensor:
        """Check an :meth:`influences` call's arguments before any work (shapes, finite values, labels within the
        model's outputs, θ's dtype and device: one pass over ``x_test`` and ``y_test``); returns the training indices
        to score."""
        self.objective.check_data("x_test", x_test, "y_test", y_test)
        if tuple(x_test.shape[1:]) != tuple(self.x_train.shape[1:]):
            raise InvalidArgumentError(
                f"x_test rows have shape {tuple(x_test.shape[1:])} but x_train rows have {tuple(self.x_train.shape[1:])}"
            )
        self.objective.check_model_inputs("theta", self.theta, "x_test", x_test, "y_test", y_test)
        return torch.arange(self.n) if train_idxs is None else check_indices("train_idxs", train_idxs, self.n)

    def _details(self) -> dict[str, Any]:
        return {} if self.options is None else self.options.to_dict()


class SolvingEstimator(InfluenceEstimator):
    """An estimator that applies (an approximation of) ``(H + λI)⁻¹`` to the test gradients: exact, CG, LiSSA,
    Arnoldi, EK-FAC.

    Subclasses implement :meth:`inverse_hvp` and may batch :meth:`inverse_hvps`. :meth:`influences` makes one
    inverse-HVP solve per test point, then the k training gradients: its cost is dominated by the solves and
    by the k per-example gradients.
    """

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """Exact ``H v`` over the whole training set, ``data_chunk`` examples per pass; ``v`` (p,) or (m, p)."""
        return hvp(self.objective, self.theta, self.x_train, self.y_train, v, data_chunk=self.data_chunk)

    @abstractmethod
    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        """Solve ``(H + λI) x = v`` for one vector (p,)."""

    def inverse_hvps(self, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve for each row of ``vs`` (m, p); returns the solutions (m, p) and residuals (m,)."""
        self.prepare()
        solves = [self.inverse_hvp(v) for v in vs]
        return torch.stack([s.x for s in solves]), torch.tensor([s.residual for s in solves], dtype=vs.dtype)

    def predicted_param_changes(self, train_idxs: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Predicted ``θ₋ᵢ − θ*`` for each index: ``(1/n)(H+λI)⁻¹∇L(z_i)``, shape (k, p). One solve per point."""
        idxs = check_indices("train_idxs", train_idxs, self.n)
        self.prepare()
        x, _ = self.inverse_hvps(self.train_gradients(idxs))
        return x / self.n

    def _predict(self, x_test: torch.Tensor, y_test: torch.Tensor, train_idxs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_test = self.objective.sample_grads(self.theta, x_test, y_test, self.grad_chunk)
        s_test, residuals = self.inverse_hvps(g_test)
        return self.train_scores(s_test, train_idxs), residuals


__all__ = [
    "ESTIMATOR_ARGUMENTS",
    "EstimatorOptions",
    "InfluenceEstimator",
    "InfluenceResult",
    "NEGATIVE_POLICIES",
    "SolvingEstimator",
    "check_optional_int",
]
