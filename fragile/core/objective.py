"""The training objective as a pure function of a flat parameter vector.

Everything downstream (training, influence, leave-one-out retraining) sees a model only through an
:class:`Objective`: the mean cross-entropy over the training set plus ``(weight_decay/2)·‖θ‖²``. The
regulariser is part of the objective, so its Hessian includes ``weight_decay·I``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fragile.errors import InvalidArgumentError, check_dataset, check_positive


class Objective:
    """``L(θ) = Σ_i w_i·ℓ(z_i, θ) / Σ_i w_i + (weight_decay/2)·‖θ‖²`` for a model and cross-entropy ``ℓ``.

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
    """

    def __init__(self, model: nn.Module, weight_decay: float = 0.0, trainable: tuple[str, ...] | None = None):
        check_positive("weight_decay", weight_decay, allow_zero=True)
        self.model = model
        self.weight_decay = float(weight_decay)
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if trainable is not None:
            trainable = tuple(trainable)
            unknown = [t for t in trainable if not any(k == t or k.startswith(t + ".") for k, _ in named)]
            if not trainable or unknown:
                prefixes = sorted({k.split(".")[0] for k, _ in named})
                raise InvalidArgumentError(
                    f"trainable={list(trainable)} is not allowed: {unknown or 'empty'} names no parameter; top-level modules: {prefixes}"
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

    # -- parameters -------------------------------------------------------------------------------
    def initial_params(self) -> torch.Tensor:
        """The template model's parameters as a flat vector (a copy)."""
        params = dict(self.model.named_parameters())
        return torch.cat([params[k].detach().reshape(-1) for k in self.names]).clone()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into the model's named parameter tensors (views, no copy)."""
        return {k: v.view(s) for k, v, s in zip(self.names, theta.split(self.numels), self.shapes)}

    def check_params(self, name: str, theta: torch.Tensor, *, stacked: bool = False) -> None:
        """Raise unless ``theta`` is a flat parameter vector (or a (K, p) stack) of this objective."""
        want = 2 if stacked else 1
        if not isinstance(theta, torch.Tensor) or theta.ndim != want or theta.shape[-1] != self.num_params:
            shape = "(K, p)" if stacked else "(p,)"
            got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
            raise InvalidArgumentError(f"{name} has shape {got}; expected {shape} with p={self.num_params}")

    # -- values -----------------------------------------------------------------------------------
    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model outputs at parameters ``theta`` for inputs ``x`` (batch first)."""
        return functional_call(self.model, {**self._fixed, **self.unflatten(theta)}, (x,))

    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy ``ℓ(z_i, θ)``, shape (n,); no regulariser."""
        return F.cross_entropy(self.logits(theta, x), y, reduction="none")

    def regulariser(self, theta: torch.Tensor, weight_decay: torch.Tensor | None = None) -> torch.Tensor:
        """``(weight_decay/2)·‖θ‖²`` (per row for a stack; ``weight_decay`` (K,) overrides per row)."""
        wd = self.weight_decay if weight_decay is None else weight_decay
        return 0.5 * wd * (theta * theta).sum(-1)

    def train_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
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
        gives each model its own L2 coefficient (default: the objective's). The forward pass is
        vmapped over the stack; the sum of the result has the K models' gradients as its gradient,
        which is how :func:`stacked_grads` gets them from one backward pass.
        """
        k = thetas.shape[0]
        z = vmap(self.logits, in_dims=(0, None))(thetas, x)  # (K, n, C)
        losses = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.repeat(k), reduction="none").view(k, -1)
        return _weighted_mean(losses, weights) + self.regulariser(thetas, weight_decay)

    # -- derivatives ------------------------------------------------------------------------------
    def grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient of :meth:`train_loss`, shape (p,)."""
        return grad(self.train_loss)(theta, x, y, weights)

    def stacked_grads(
        self,
        thetas: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor | None = None,
        weight_decay: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients and values of K models' objectives: ((K, p), (K,)). One forward and one backward."""
        thetas = thetas.detach().requires_grad_(True)
        with torch.enable_grad():
            values = self.stacked_train_losses(thetas, x, y, weights, weight_decay)
            (g,) = torch.autograd.grad(values.sum(), thetas)
        return g, values.detach()

    def sample_grads(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = 256) -> torch.Tensor:
        """Per-example gradients ``∇ℓ(z_i, θ)`` without the regulariser, shape (n, p) (test-loss gradients).

        Memory: O(n·p) for the result plus ``chunk_size`` examples' activations at a time.
        """

        def one(t: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.logits(t, xi.unsqueeze(0)), yi.unsqueeze(0))

        return vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(theta, x, y)

    def with_weight_decay(self, weight_decay: float) -> "Objective":
        """The same model and loss with another L2 coefficient."""
        return Objective(self.model, weight_decay, self.trainable)

    def point_grads(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = 256) -> torch.Tensor:
        """Gradients of each training point's share ``∇L(z_i, θ) = ∇ℓ(z_i, θ) + weight_decay·θ``, (n, p).

        Retraining on n−1 points with the mean loss plus the same regulariser moves θ by
        ``≈ (1/(n−1))·H⁻¹∇L(z_i, θ*)``; the regulariser term is the same for every point, so it shifts
        all predictions of one test point equally (it matters for signs and parameter changes, not ranks).
        """
        return self.sample_grads(theta, x, y, chunk_size) + self.weight_decay * theta


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


__all__ = ["Objective", "check_weights", "check_dataset"]
