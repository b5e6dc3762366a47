"""Exceptions raised by fragile, and the argument checks that raise them before any work starts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


class FragileError(Exception):
    """Base class of every error fragile raises on purpose."""


class InvalidArgumentError(FragileError, ValueError):
    """An argument is out of its allowed range; the message names it and says what is allowed."""


class SolverDivergedError(FragileError, RuntimeError):
    """An iterative inverse-HVP solver diverged or broke down; its numbers are never returned."""


class SingularSystemError(FragileError, ArithmeticError):
    """The damped curvature matrix of this model is singular to working precision (a damped eigenvalue within
    round-off of zero), so its inverse, and any influence through it, is undefined: a property of the problem and
    the damping, reported like a solver's failure; a larger damping (or another negative-eigenvalue policy) avoids it."""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise InvalidArgumentError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (or >= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgumentError(f"{name}={value!r} is not allowed; it must be a finite number {bound}")


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> None:
    """Raise unless ``value`` is an int within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name}={value!r} is not allowed; it must be an integer")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name}={value} is not allowed; it must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(f"{name}={value} is not allowed; it must be <= {maximum}")


TARGET_KINDS = ("labels", "values", "any")


def check_dataset(
    x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor, *, targets: str = "labels", num_outputs: int | None = None
) -> None:
    """Raise unless ``x`` and ``y`` are non-empty tensors with one target per row of ``x``, ``x`` finite.

    ``targets`` says what ``y`` must hold: ``"labels"`` — integer class labels, 1-D, in ``[0, num_outputs)``
    (cross-entropy; only ``>= 0`` when ``num_outputs`` is None); ``"values"`` — finite floats, (n,) or (n, d)
    (regression); ``"any"`` — any tensor whose first dimension is n (a user's loss, which owns its targets' values).
    ``x`` and ``y`` must be on one device.

    Cost: one pass over ``x`` (finiteness) and one over ``y`` (label range or finiteness), before any work.
    """
    check_choice("targets", targets, TARGET_KINDS)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InvalidArgumentError(f"{x_name} and {y_name} must be torch tensors")
    if x.ndim < 1 or x.shape[0] == 0:
        raise InvalidArgumentError(f"{x_name} is empty; it needs at least one row")
    check_compatible(y_name, y, x_name, x, dtype=False)
    if targets == "labels":
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise InvalidArgumentError(
                f"{y_name} has shape {tuple(y.shape)} but {x_name} has {x.shape[0]} rows; "
                f"{y_name} must be 1-D with one label per row of {x_name}"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise InvalidArgumentError(
                f"{y_name} has dtype {y.dtype}; class labels must be integers (float targets need loss='mse' or a callable loss)"
            )
        check_finite(x_name, x)
        check_labels(y_name, y, num_outputs)
        return
    if y.ndim < 1 or y.shape[0] != x.shape[0] or (targets == "values" and y.ndim > 2):
        allowed = "(n,) or (n, d)" if targets == "values" else "(n, ...)"
        raise InvalidArgumentError(
            f"{y_name} has shape {tuple(y.shape)} but {x_name} has {x.shape[0]} rows; {y_name} must be {allowed} with one "
            f"target per row of {x_name}"
        )
    if targets == "values" and not y.is_floating_point():
        raise InvalidArgumentError(f"{y_name} has dtype {y.dtype}; regression targets must be floating point")
    check_finite(x_name, x)
    if targets == "values":
        # A user's loss ("any") owns the meaning of its targets (NaN may mark a missing value there); regression
        # targets enter the loss as numbers, and one NaN makes every gradient NaN.
        check_finite(y_name, y)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise unless every entry of ``t`` is finite (integer and boolean tensors always are).

    Cost: one pass over ``t`` (``torch.isfinite(t).all()``, one device-to-host sync); the count of bad entries is
    taken only when it raises.
    """
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InvalidArgumentError(
            f"{name} contains NaN or inf ({bad} of {t.numel()} values); influence and training need finite inputs"
        )


def check_labels(name: str, y: torch.Tensor, num_outputs: int | None = None) -> None:
    """Raise unless the integer class labels ``y`` lie in ``[0, num_outputs)`` (``[0, ∞)`` when ``num_outputs`` is None).

    Cost: one pass over ``y`` (its min and max).
    """
    if y.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0:
        raise InvalidArgumentError(f"{name} has negative labels (min {lo}); class labels must be >= 0")
    if num_outputs is not None and hi >= num_outputs:
        raise InvalidArgumentError(
            f"{name} has labels up to {hi} but the model has {num_outputs} outputs; class labels must be in [0, {num_outputs})"
        )


def check_compatible(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, *, dtype: bool = True) -> None:
    """Raise unless ``a`` and ``b`` are on one device and, with ``dtype`` and both floating point, of one dtype.

    Integer tensors (class labels, token ids) may sit beside any floating dtype; only their device must match.
    Cost: none beyond reading the two tensors' metadata.
    """
    if a.device != b.device:
        raise InvalidArgumentError(f"{a_name} is on {a.device} but {b_name} is on {b.device}; put both on the same device")
    if dtype and a.is_floating_point() and b.is_floating_point() and a.dtype != b.dtype:
        raise InvalidArgumentError(f"{a_name} is {a.dtype} but {b_name} is {b.dtype}; give both the same dtype")


def check_indices(name: str, idxs: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """Return ``idxs`` as a 1-D long tensor; raise if empty, repeated or outside ``[0, n)``."""
    t = torch.as_tensor(idxs, dtype=torch.long).reshape(-1) if len(idxs) else torch.empty(0, dtype=torch.long)
    if t.numel() == 0:
        raise InvalidArgumentError(f"{name} is empty; give at least one index in [0, {n})")
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise InvalidArgumentError(f"{name} has indices outside [0, {n}): min {int(t.min())}, max {int(t.max())}")
    if torch.unique(t).numel() != t.numel():
        raise InvalidArgumentError(f"{name} has repeated indices; each index may appear once")
    return t
