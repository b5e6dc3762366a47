"""The training objective as a pure function of a flat parameter vector.

Everything downstream (training, influence, leave-one-out retraining) sees a model only through an
:class:`Objective`: the mean per-example loss over the training set plus ``(weight_decay/2)·‖θ‖²``. The
regulariser is part of the objective, so its Hessian includes ``weight_decay·I``.

The per-example loss ``ℓ(f(x), y)`` of the model's outputs ``f(x)`` and the targets ``y`` is one of

* ``"cross_entropy"`` (the default, the paper's): softmax cross-entropy of (n, K) logits and integer labels (n,);
* ``"mse"``: half the squared error summed over the output dimensions, ``ℓ = ½·Σ_j (f_j(x) − y_j)²``, for float
  targets (n, d), or (n,) with a model of one output (whose (n, 1) outputs are then read as (n,)). The ½ makes
  the loss's Hessian in the outputs the identity, so for a linear model the Hessian of the objective is
  ``XᵀX/n + weight_decay·I`` (the ridge normal equations);
* any callable ``per_example_loss(outputs, targets) -> (n,)`` tensor, differentiable in the outputs, that
  treats the rows independently (it is evaluated on single rows for per-example gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fragile.core.stacked_mlp import feature_major_loss, stacked_mlp
from fragile.errors import InvalidArgumentError, check_compatible, check_dataset, check_finite, check_labels, check_positive

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Loss = str | PerExampleLoss

LOSSES = ("cross_entropy", "mse")
"""The losses known by name; any callable is accepted too."""


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example softmax cross-entropy of (n, K) logits and (n,) integer labels, shape (n,)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example ``½·Σ_j (f_j − y_j)²``, shape (n,), of outputs (n, d) and float targets (n, d), or of (n, 1) outputs
    and (n,) targets."""
    if targets.ndim == 1 and outputs.ndim == 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    if outputs.shape != targets.shape:
        raise InvalidArgumentError(
            f"loss='mse' needs outputs and targets of one shape; the model gives {tuple(outputs.shape)} for targets of "
            f"shape {tuple(targets.shape)}"
        )
    diff = outputs - targets
    return 0.5 * (diff * diff).reshape(diff.shape[0], -1).sum(1)


def bregman_cross_entropy(logits: torch.Tensor, logits_star: torch.Tensor) -> torch.Tensor:
    """Bregman divergence of the cross-entropy as a function of the logits, between ``logits`` and ``logits_star``
    (per row): ``logsumexp(z) − logsumexp(z*) − softmax(z*)ᵀ(z − z*)``, which is KL(softmax(z*) ‖ softmax(z)).
    The label cancels; it is zero with zero gradient at ``z = z*`` and its Hessian there is the softmax's."""
    return (
        torch.logsumexp(logits, -1)
        - torch.logsumexp(logits_star, -1)
        - (torch.softmax(logits_star, -1) * (logits - logits_star)).sum(-1)
    )


_NAMED: dict[str, PerExampleLoss] = {"cross_entropy": cross_entropy, "mse": half_squared_error}
# What check_dataset asks of the targets: class labels, float values, or anything with one row per input.
_TARGETS = {"cross_entropy": "labels", "mse": "values"}


def _checked(fn: PerExampleLoss, name: str) -> PerExampleLoss:
    """A user's per-example function, with its result's shape checked (a mean over the batch instead of one value per
    row would otherwise train silently on the wrong objective)."""

    def call(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        values = fn(outputs, targets)
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (outputs.shape[0],):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise InvalidArgumentError(
                f"{name}={fn!r} returned {got}; it must return one value per row, shape ({outputs.shape[0]},)"
            )
        return values

    return call


class Objective:
    """``L(θ) = Σ_i w_i·ℓ(z_i, θ) / Σ_i w_i + (weight_decay/2)·‖θ‖²`` for a model and a per-example loss ``ℓ``.

    Equivalently ``(1/n)·Σ_i L(z_i, θ)`` with each point's share ``L(z, θ) = ℓ(z, θ) + (weight_decay/2)·‖θ‖²``
    (Koh & Liang's convention): removing a point removes its share of the regulariser too, which is
    why :meth:`point_grads`, not :meth:`sample_grads`, enters the influence of a training point.

    The model is used as a template: its parameters are never modified. θ is the concatenation of the
    model's parameters in ``named_parameters()`` order; the regulariser covers all of them, biases
    included (stated because some codes regularise weights only).

    With ``trainable``, θ is only the parameters whose names start with one of the given prefixes (e.g.
    ``("layer4", "fc")``: the last block and the head of a ResNet); the others stay at the template's values
    and are constants of the objective, so its Hessian is the p×p block of the full Hessian for those
    parameters and the regulariser covers them alone. How influence is computed at ImageNet scale.

    Args:
        model: the architecture; its current parameters are the default starting point.
        weight_decay: coefficient of the L2 term (>= 0).
        trainable: name prefixes of the parameters that make up θ; None means every parameter that
            requires a gradient.
        loss: the per-example training loss: ``"cross_entropy"``, ``"mse"`` or a callable (module doc). The training
            objective, its gradients and Hessian, and every training point's share ``L(z_i)`` always use it.
        measurement: the test-time quantity whose change the influence of a training point predicts, a callable
            ``(outputs, targets) -> (n,)``; None means the loss itself (the paper's: the test loss). It enters
            :meth:`sample_grads` and :meth:`measurements`, that is the test points' side only.
    """

    def __init__(
        self,
        model: nn.Module,
        weight_decay: float = 0.0,
        trainable: tuple[str, ...] | None = None,
        *,
        loss: Loss = "cross_entropy",
        measurement: PerExampleLoss | None = None,
    ):
        check_positive("weight_decay", weight_decay, allow_zero=True)
        if isinstance(loss, str) and loss in _NAMED:
            self._loss = _NAMED[loss]
        elif callable(loss) and not isinstance(loss, str):
            self._loss = _checked(loss, "loss")
        else:
            raise InvalidArgumentError(
                f"loss={loss!r} is not allowed; choose one of {list(LOSSES)} or pass a callable "
                "per_example_loss(outputs, targets) -> (n,) tensor"
            )
        if measurement is not None and not callable(measurement):
            raise InvalidArgumentError(
                f"measurement={measurement!r} is not allowed; pass a callable (outputs, targets) -> (n,) "
                "tensor, or None for the loss itself"
            )
        self.loss, self.measurement = loss, measurement
        self._measure = self._loss if measurement is None else _checked(measurement, "measurement")
        self.model = model
        self.weight_decay = float(weight_decay)
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if trainable is not None:
            trainable = tuple(trainable)
            unknown = [t for t in trainable if not any(k == t or k.startswith(t + ".") for k, _ in named)]
            if not trainable or unknown:
                prefixes = sorted({k.split(".")[0] for k, _ in named})
                raise InvalidArgumentError(
                    f"trainable={list(trainable)} is not allowed: {unknown or 'empty'} names no parameter; "
                    f"top-level modules: {prefixes}"
                )
            named = [(k, p) for k, p in named if any(k == t or k.startswith(t + ".") for t in trainable)]
        self.trainable = trainable
        if not named:
            raise InvalidArgumentError("model has no trainable parameters")
        kept = {k for k, _ in named}
        # Detached, so that nothing computed from θ records a graph through the parameters held fixed.
        self._fixed = {k: p.detach() for k, p in model.named_parameters() if k not in kept}
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)
        self.dtype = named[0][1].dtype
        self._num_outputs: dict[tuple[int, ...], int | None] = {}
        self._mlp = stacked_mlp(model, self.names, self.numels, self._fixed)

    @property
    def loss_name(self) -> str:
        """``"cross_entropy"``, ``"mse"``, or ``"callable"`` for a loss given as a function."""
        return self.loss if isinstance(self.loss, str) else "callable"

    def require_loss(self, allowed: tuple[str, ...], what: str) -> None:
        """Raise unless :attr:`loss_name` is one of ``allowed``: for computations that need the loss's Hessian in the
        outputs in closed form (``what`` names the computation for the message)."""
        if self.loss_name not in allowed:
            raise InvalidArgumentError(
                f"loss={self.loss!r} is not supported by {what}, which needs the loss's Hessian in the model outputs in "
                f"closed form; use loss in {list(allowed)} or another method"
            )

    def check_data(self, x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor) -> None:
        """:func:`~fragile.errors.check_dataset` with the targets this loss takes: integer labels (n,) >= 0 for
        cross-entropy, finite float values (n,) or (n, d) for ``mse``, any tensor with one row per input for a callable;
        ``x`` finite. Labels are checked against the model's outputs by :meth:`check_model_inputs`, which needs θ.
        Cost: one pass over ``x`` and one over ``y``."""
        check_dataset(x_name, x, y_name, y, targets=_TARGETS.get(self.loss_name, "any"))

    def check_model_inputs(
        self, theta_name: str, theta: torch.Tensor, x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor
    ) -> None:
        """For data that passed :meth:`check_data` and parameters that passed :meth:`check_params`, raise unless they fit
        together: ``x`` on θ's device and, when floating point, of θ's dtype (the model's layers would refuse a mix),
        and for cross-entropy labels below the model's number of outputs (:meth:`check_label_range`).

        Cost: metadata, one pass over ``y``, and the first time for this input shape one forward pass on one row.
        """
        check_compatible(theta_name, theta, x_name, x)
        self.check_label_range(theta, x, y_name, y)

    def check_label_range(self, theta: torch.Tensor, x: torch.Tensor, y_name: str, y: torch.Tensor) -> None:
        """For cross-entropy, raise unless the labels ``y`` are below the model's number of outputs at ``theta`` for
        inputs like ``x`` (other losses: nothing to check). The one input check that runs the model, so callers make
        it last. Cost: one pass over ``y``, and the first time for this input shape one forward pass on one row."""
        if self.loss_name == "cross_entropy":
            check_labels(y_name, y, self.num_outputs(theta, x))

    def check_inputs(
        self,
        theta_name: str,
        theta: torch.Tensor,
        x_name: str,
        x: torch.Tensor,
        y_name: str,
        y: torch.Tensor,
        *,
        stacked: bool = False,
    ) -> None:
        """:meth:`check_data`, :meth:`check_params` and :meth:`check_model_inputs` in that order: every check of a
        (θ, data) pair an entry point makes before any work. Cost: theirs, about one pass over θ, ``x`` and ``y``."""
        self.check_data(x_name, x, y_name, y)
        self.check_params(theta_name, theta, stacked=stacked)
        self.check_model_inputs(theta_name, theta, x_name, x, y_name, y)

    def num_outputs(self, theta: torch.Tensor, x: torch.Tensor) -> int | None:
        """The model's outputs per row (the logits' last dimension: the classes, for cross-entropy) for inputs shaped
        like the rows of ``x``; None when its outputs are not (n, K) or it cannot run on a single row.

        A model is any module, with no attribute that says this, so it is found by a forward pass on one row of ``x``
        at ``theta`` (a (p,) vector, or the first row of a (K, p) stack), once per input shape, then remembered.
        Cost: that one forward pass, the first time.
        """
        key = tuple(x.shape[1:])
        if key not in self._num_outputs:
            t = theta[0] if theta.ndim == 2 else theta
            try:
                with torch.no_grad():
                    z = self.logits(t.detach(), x[:1])
            except (RuntimeError, ValueError):
                # A model that needs more than one row (batch norm in training mode) gets no upper-bound check, rather
                # than an error from the check itself; the computation that follows reports its own.
                z = None
            self._num_outputs[key] = int(z.shape[-1]) if isinstance(z, torch.Tensor) and z.ndim == 2 else None
        return self._num_outputs[key]

    # -- parameters -------------------------------------------------------------------------------
    def initial_params(self) -> torch.Tensor:
        """The template model's parameters as a flat vector (a copy)."""
        params = dict(self.model.named_parameters())
        return torch.cat([params[k].detach().reshape(-1) for k in self.names]).clone()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into the model's named parameter tensors (views, no copy)."""
        return {k: v.view(s) for k, v, s in zip(self.names, theta.split(self.numels), self.shapes)}

    def check_params(self, name: str, theta: torch.Tensor, *, stacked: bool = False) -> None:
        """Raise unless ``theta`` is a finite flat parameter vector (or a (K, p) stack) of this objective, of the dtype
        and on the device of the parameters held fixed (with ``trainable``), which it is combined with.
        Cost: one pass over ``theta``."""
        want = 2 if stacked else 1
        if not isinstance(theta, torch.Tensor) or theta.ndim != want or theta.shape[-1] != self.num_params:
            shape = "(K, p)" if stacked else "(p,)"
            got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
            raise InvalidArgumentError(f"{name} has shape {got}; expected {shape} with p={self.num_params}")
        if not theta.is_floating_point():
            raise InvalidArgumentError(f"{name} is {theta.dtype}; parameters must be floating point")
        check_finite(name, theta)
        fixed = next(((k, p) for k, p in self._fixed.items() if p.is_floating_point()), None)
        if fixed is not None:
            check_compatible(name, theta, f"the fixed parameter {fixed[0]}", fixed[1])

    # -- values -----------------------------------------------------------------------------------
    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model outputs at parameters ``theta`` for inputs ``x`` (batch first): the logits, for cross-entropy."""
        return functional_call(self.model, {**self._fixed, **self.unflatten(theta)}, (x,))

    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example training loss ``ℓ(z_i, θ)``, shape (n,); no regulariser."""
        return self._loss(self.logits(theta, x), y)

    def output_losses(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example training loss of model outputs (n, ·) against their targets, shape (n,); no regulariser. For code
        that runs the model itself (:mod:`fragile.core.blocked_hessian` runs it layer by layer)."""
        return self._loss(outputs, y)

    def measurements(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example measurement (by default the loss) at test points, shape (n,): the quantity whose change
        influence predicts."""
        return self._measure(self.logits(theta, x), y)

    def output_bregman(self, outputs: torch.Tensor, outputs_star: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bregman divergence of the loss in the model outputs, ``ℓ(f) − ℓ(f*) − ∂ℓ(f*)ᵀ(f − f*)``, per model and example.

        ``outputs`` are a stack of K models' outputs (K, n, ·), ``outputs_star`` (n, ·) the outputs at θ* and ``y`` the
        targets; the result is (K, n). For cross-entropy it is :func:`bregman_cross_entropy` and for ``mse``
        ``½‖f − f*‖²`` (the targets cancel in both); a callable loss is differentiated at ``outputs_star`` (one backward
        pass over the n rows per call).
        """
        if self.loss_name == "cross_entropy":
            return bregman_cross_entropy(outputs, outputs_star)
        k, n = outputs.shape[:2]
        diff = outputs - outputs_star
        if self.loss_name == "mse":
            return 0.5 * (diff * diff).reshape(k, n, -1).sum(-1)
        slope = torch.func.grad(lambda z: self._loss(z, y).sum())(outputs_star.detach())
        return self._stacked_loss(outputs, y) - self._loss(outputs_star, y) - (slope * diff).reshape(k, n, -1).sum(-1)

    def _stacked_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses of K models' outputs (K, n, ·) on the same targets, (K, n): one call on the K·n rows."""
        k = z.shape[0]
        return self._loss(z.reshape(-1, *z.shape[2:]), y.repeat(k, *([1] * (y.ndim - 1)))).view(k, -1)

    def regulariser(self, theta: torch.Tensor, weight_decay: torch.Tensor | None = None) -> torch.Tensor:
        """``(weight_decay/2)·‖θ‖²`` (per row for a stack; ``weight_decay`` (K,) overrides per row)."""
        wd = self.weight_decay if weight_decay is None else weight_decay
        return 0.5 * wd * (theta * theta).sum(-1)

    def train_loss(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The objective at one parameter vector; ``weights`` (n,) select or weight examples."""
        losses = self.sample_losses(theta, x, y)
        return _weighted_mean(losses, weights) + self.regulariser(theta)

    def stacked_train_losses(
        self,
        thetas: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor | None = None,
        weight_decay: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The objective of K independent models at once, shape (K,).

        ``thetas`` is (K, p); ``weights`` is (n,) shared or (K, n) per model; ``weight_decay`` (K,)
        gives each model its own L2 coefficient (default: the objective's). The sum of the result has the K models'
        gradients as its gradient, which is how :func:`fragile.core.train.fit` gets them from one backward pass.

        A chain of linear layers and elementwise activations (the MLP) is evaluated feature-major by
        :mod:`fragile.core.stacked_mlp`, 2–2.6× faster on the Iris networks; any other model by ``vmap`` over the
        stack. The two agree to rounding.
        """
        if self._mlp is not None and x.ndim == 2:
            z = self._mlp.logits(thetas, x)  # (K, C, n)
            loss = feature_major_loss(self.loss_name)
            losses = loss(z, y) if loss is not None else self._stacked_loss(z.transpose(1, 2), y)
        else:
            z = vmap(self.logits, in_dims=(0, None))(thetas, x)  # (K, n, C)
            losses = self._stacked_loss(z, y)
        return _weighted_mean(losses, weights) + self.regulariser(thetas, weight_decay)

    # -- derivatives ------------------------------------------------------------------------------
    def grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient of :meth:`train_loss`, shape (p,)."""
        return grad(self.train_loss)(theta, x, y, weights)

    def sample_grads(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, grad_chunk: int | None = 256) -> torch.Tensor:
        """Per-example gradients of the measurement (by default ``∇ℓ(z_i, θ)``) without the regulariser, shape (n, p):
        the test points' gradients.

        Memory: O(n·p) for the result plus ``grad_chunk`` examples' activations at a time (None: all at once).
        """
        return self._per_example_grads(self._measure, theta, x, y, grad_chunk)

    def with_weight_decay(self, weight_decay: float) -> Objective:
        """The same model, loss and measurement with another L2 coefficient."""
        return Objective(self.model, weight_decay, self.trainable, loss=self.loss, measurement=self.measurement)

    def point_grads(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, grad_chunk: int | None = 256) -> torch.Tensor:
        """Gradients of each training point's share ``∇L(z_i, θ) = ∇ℓ(z_i, θ) + weight_decay·θ``, (n, p), of the loss
        (never the measurement); memory as :meth:`sample_grads`.

        Retraining on n−1 points with the mean loss plus the same regulariser moves θ by
        ``≈ (1/(n−1))·H⁻¹∇L(z_i, θ*)``; the regulariser term is the same for every point, so it shifts
        all predictions of one test point equally (it matters for signs and parameter changes, not ranks).
        """
        return self._per_example_grads(self._loss, theta, x, y, grad_chunk) + self.weight_decay * theta

    def _per_example_grads(self, fn: PerExampleLoss, theta, x, y, grad_chunk: int | None) -> torch.Tensor:
        def one(t: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return fn(self.logits(t, xi.unsqueeze(0)), yi.unsqueeze(0))[0]

        return vmap(grad(one), in_dims=(None, 0, 0), chunk_size=grad_chunk)(theta, x, y)


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return losses.mean(-1)
    # A minibatch whose every example is weighted out contributes nothing rather than 0/0.
    total = weights.sum(-1)
    return (losses * weights).sum(-1) / torch.where(total > 0, total, torch.ones_like(total))


def check_weights(name: str, weights: torch.Tensor | None, n: int, k: int | None = None) -> None:
    """Raise unless ``weights`` is None, (n,) or — when ``k`` is given — (k, n), finite and >= 0."""
    if weights is None:
        return
    shapes = [(n,)] + ([(k, n)] if k is not None else [])
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) not in shapes:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise InvalidArgumentError(f"{name} has shape {got}; expected one of {shapes}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise InvalidArgumentError(f"{name} must be finite and >= 0")


__all__ = [
    "LOSSES",
    "Objective",
    "bregman_cross_entropy",
    "check_dataset",
    "check_weights",
    "cross_entropy",
    "half_squared_error",
]
