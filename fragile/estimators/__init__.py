"""Influence estimators behind one interface (:func:`make_estimator`); swapping exact → CG → LiSSA → Arnoldi is one argument.

Importing this package registers the built-in methods, in the order of :data:`METHODS`. A new method is a module
that defines an :class:`InfluenceEstimator` subclass decorated with
:func:`~fragile.estimators.registry.register`; importing it makes it available to :func:`make_estimator`.
"""

from fragile.estimators.base import (
    ESTIMATOR_ARGUMENTS,
    NEGATIVE_POLICIES,
    EstimatorOptions,
    InfluenceEstimator,
    InfluenceResult,
    SolvingEstimator,
)
from fragile.estimators.group import group_influence
from fragile.estimators.registry import ESTIMATORS, make_estimator, methods, register

# isort: off
# The import order is the registration order, hence the order of METHODS.
from fragile.estimators.exact import CURVATURES, ExactInfluence, ExactOptions
from fragile.estimators.cg import CGInfluence, CGOptions
from fragile.estimators.lissa import LissaInfluence, LissaOptions
from fragile.estimators.arnoldi import ArnoldiInfluence, ArnoldiOptions
from fragile.estimators.grad_dot import GradientDotInfluence
from fragile.estimators.ekfac import EKFACInfluence, EKFACOptions
from fragile.estimators.tracin import TracInInfluence, TracInOptions
# isort: on

METHODS = methods()
"""The built-in methods' names: exact, cg, lissa, arnoldi, grad_dot, ekfac, tracin (:func:`methods` also lists any
registered later)."""

__all__ = [
    "CURVATURES",
    "ESTIMATORS",
    "ESTIMATOR_ARGUMENTS",
    "METHODS",
    "NEGATIVE_POLICIES",
    "ArnoldiInfluence",
    "ArnoldiOptions",
    "CGInfluence",
    "CGOptions",
    "EKFACInfluence",
    "EKFACOptions",
    "EstimatorOptions",
    "ExactInfluence",
    "ExactOptions",
    "GradientDotInfluence",
    "InfluenceEstimator",
    "InfluenceResult",
    "LissaInfluence",
    "LissaOptions",
    "SolvingEstimator",
    "TracInInfluence",
    "TracInOptions",
    "group_influence",
    "make_estimator",
    "methods",
    "register",
]
