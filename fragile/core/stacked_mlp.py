"""A stack of K multilayer perceptrons evaluated feature-major: the fast path of
:meth:`~fragile.core.objective.Objective.stacked_train_losses` for chains of ``nn.Linear`` layers and elementwise
activations (the Iris networks of :class:`~fragile.models.small.MLP`).

Why feature-major: ``vmap`` over ``functional_call`` evaluates each model in its own (n, features) layout, so every
layer becomes a batched product of tiny matrices with the short feature axis innermost. Here the activations are
(K, features, n), with the n examples innermost, where the batched product vectorises, and the cross-entropy is
taken along the feature axis without a transpose. On the Iris networks (width 5, 149 examples, stacks of 128
models) one gradient step of a stack takes 2.1–2.6× less time (``benchmarks/loo_batched.py``). The numbers agree
with the ``vmap`` path, and with the same models in smaller stacks, to rounding, not bit for bit: the products sum
in another order, and MKL's batched product of some shapes rounds a matrix's result by its place in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fragile.errors import InvalidArgumentError

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SELU,
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Identity,
)
"""Activations applied entry by entry, so the same module serves any layout of the activations."""


@dataclass(frozen=True)
class _Affine:
    """Where one ``nn.Linear`` layer's weight (out, in) and bias (out,) sit in the flat parameter vector."""

    weight: slice
    out_features: int
    in_features: int
    bias: slice | None


@dataclass(frozen=True)
class StackedMLP:
    """The layers of a chain model as steps over a flat parameter vector: :class:`_Affine` or an activation."""

    steps: tuple[_Affine | nn.Module, ...]

    def logits(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The K models' outputs, feature-major: (K, outputs, n) for ``thetas`` (K, p) and inputs ``x`` (n, in).
        Cost: each layer one batched product of (out × in) by (in × n) matrices per model."""
        k = thetas.shape[0]
        h = x.T.contiguous()  # (in, n), shared by every model until the first product
        for step in self.steps:
            if not isinstance(step, _Affine):
                h = step(h)
                continue
            w = thetas[:, step.weight].view(k, step.out_features, step.in_features)
            if h.ndim == 2:
                h = torch.matmul(w, h)
                if step.bias is not None:
                    h = h + thetas[:, step.bias].unsqueeze(2)
            elif step.bias is not None:
                h = torch.baddbmm(thetas[:, step.bias].unsqueeze(2), w, h)
            else:
                h = torch.bmm(w, h)
        return h if h.ndim == 3 else h.expand(k, *h.shape)


def stacked_mlp(model: nn.Module, names: list[str], numels: list[int], fixed: dict[str, torch.Tensor]) -> StackedMLP | None:
    """The plan for evaluating ``model`` feature-major, or None when it is not a chain of ``nn.Linear`` layers and
    :data:`ELEMENTWISE` activations (an ``nn.Sequential``, or a model with ``sequential_layers()``), when a parameter is
    held fixed, or when the flat parameter vector (``names``, ``numels``) is not laid out layer by layer, weight before
    bias."""
    if fixed:
        return None
    if hasattr(model, "sequential_layers"):
        layers = list(model.sequential_layers())
    elif isinstance(model, nn.Sequential):
        layers = list(model)
    else:
        return None
    name_of = {id(p): k for k, p in model.named_parameters()}
    offsets = dict(zip(names, _offsets(numels)))
    expected: list[str] = []
    steps: list[_Affine | nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            weight = name_of[id(layer.weight)]
            bias = name_of[id(layer.bias)] if layer.bias is not None else None
            expected += [weight] + ([bias] if bias is not None else [])
            if weight not in offsets or (bias is not None and bias not in offsets):
                return None
            steps.append(
                _Affine(
                    _span(offsets[weight], layer.weight.numel()),
                    layer.out_features,
                    layer.in_features,
                    None if bias is None else _span(offsets[bias], layer.out_features),
                )
            )
        elif type(layer) in ELEMENTWISE:
            steps.append(layer)
        else:
            return None
    if expected != names:
        return None
    return StackedMLP(tuple(steps))


def feature_major_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The per-example loss of feature-major outputs (K, outputs, n), (K, n), for a loss known by name; None for a
    callable loss (then the outputs are transposed to the layout it takes)."""
    return {"cross_entropy": _cross_entropy, "mse": _half_squared_error}.get(name)


def _cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z, dim=1)
    return -logp.gather(1, y.view(1, 1, -1).expand(z.shape[0], 1, -1)).squeeze(1)


def _half_squared_error(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = y.view(1, 1, -1) if y.ndim == 1 else y.T.unsqueeze(0)
    if z.shape[1:] != target.shape[1:]:
        raise InvalidArgumentError(
            f"loss='mse' needs outputs and targets of one shape; the model gives {z.shape[1]} outputs for targets of "
            f"shape {tuple(y.shape)}"
        )
    diff = z - target
    return 0.5 * (diff * diff).sum(1)


def _offsets(numels: list[int]) -> list[int]:
    out, at = [], 0
    for n in numels:
        out.append(at)
        at += n
    return out


def _span(start: int, size: int) -> slice:
    return slice(start, start + size)
