"""The estimators by method name: :func:`register` (a class decorator), :data:`ESTIMATORS` and :func:`make_estimator`.

A method's module defines its :class:`~fragile.estimators.base.InfluenceEstimator` subclass (and its options
dataclass) and decorates the class with :func:`register`; importing the module is all it takes to make the
method available to :func:`make_estimator`. :mod:`fragile.estimators` imports the built-in ones.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

import torch

from fragile.core.objective import Objective
from fragile.errors import InvalidArgumentError, check_choice
from fragile.estimators.base import ESTIMATOR_ARGUMENTS, EstimatorOptions, InfluenceEstimator

ESTIMATORS: dict[str, type[InfluenceEstimator]] = {}
"""The registered estimator classes by method name, in registration order."""

E = TypeVar("E", bound=type[InfluenceEstimator])


def register(cls: E) -> E:
    """Class decorator: make ``cls`` the estimator of ``cls.method``. Registering a second class under a taken
    name raises (two modules claiming one method is a mistake, not an override)."""
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"{cls.__name__} has no method name; set the class attribute method = '...'")
    if ESTIMATORS.get(name, cls) is not cls:
        raise InvalidArgumentError(f"method={name!r} is already registered by {ESTIMATORS[name].__name__}")
    ESTIMATORS[name] = cls
    return cls


def methods() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(ESTIMATORS)


def option_names(method: str) -> tuple[str, ...]:
    """The option fields of ``method`` (its options dataclass's field names; empty for a method without options)."""
    options = ESTIMATORS[method].Options
    return () if options is None else tuple(f.name for f in fields(options))


def make_estimator(
    method: str,
    objective: Objective,
    theta: torch.Tensor,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    options: EstimatorOptions | None = None,
    **kwargs: Any,
) -> InfluenceEstimator:
    """Build the estimator named ``method`` (one of :func:`methods`).

    Keyword arguments are those of :class:`~fragile.estimators.base.InfluenceEstimator` (``damping``,
    ``data_chunk``, ``grad_chunk``, ``progress``) plus the method's options, given either one by one as keywords
    (``rtol=1e-8``) or together as ``options=`` an instance of the method's options dataclass (e.g.
    :class:`~fragile.estimators.cg.CGOptions`), not both. Everything is checked before any work: an unknown
    keyword is refused naming it and listing the allowed ones.
    """
    check_choice("method", method, methods())
    cls = ESTIMATORS[method]
    own = option_names(method)
    unknown = sorted(set(kwargs) - set(ESTIMATOR_ARGUMENTS) - set(own))
    if unknown:
        raise InvalidArgumentError(
            f"unknown option(s) {unknown} for method={method!r}; allowed: {sorted((*ESTIMATOR_ARGUMENTS, *own))}"
        )
    given = {k: kwargs.pop(k) for k in own if k in kwargs}
    if given:
        if options is not None:
            raise InvalidArgumentError(
                f"options= and the option keywords {sorted(given)} were both given for method={method!r}; give one of them"
            )
        options = cls.Options(**given)
    return cls(objective, theta, x_train, y_train, options=options, **kwargs)


__all__ = ["ESTIMATORS", "make_estimator", "methods", "option_names", "register"]
