"""fragile: the executable edition of "Influence Functions in Deep Learning Are Fragile" (Basu, Pope & Feizi, ICLR 2021).

The pieces, in the order data flows through them: :mod:`fragile.data.datasets`, :mod:`fragile.models.small`,
:mod:`fragile.core.objective`, :mod:`fragile.core.train`, :mod:`fragile.estimators` (estimators),
:mod:`fragile.core.ground_truth` (leave-one-out retraining) and :mod:`fragile.core.metrics`.
"""

from fragile.core.curvature import Spectrum, hessian_matrix, hvp, top_eigenvalue
from fragile.core.ground_truth import LOOResult, LOOTask, loo_retrain, loo_retrain_many, loo_retrain_sequential
from fragile.core.metrics import aggregate_over_seeds, bootstrap_ci, correlation, correlations, spearman_over
from fragile.core.objective import Objective
from fragile.core.selection import Selection
from fragile.core.train import ConvergenceReport, TrainResult, TrainSpec, convergence_report, fit
from fragile.data.datasets import Dataset, load_iris, load_mnist_digits, synthetic_classification
from fragile.errors import FragileError, InvalidArgumentError, SolverDivergedError
from fragile.estimators import METHODS, InfluenceEstimator, InfluenceResult, make_estimator
from fragile.models.small import MLP, KohLiangCNN, build_model, count_parameters

__version__ = "0.1.0"

__all__ = [
    "ConvergenceReport",
    "Dataset",
    "FragileError",
    "InfluenceEstimator",
    "InfluenceResult",
    "InvalidArgumentError",
    "KohLiangCNN",
    "LOOResult",
    "LOOTask",
    "METHODS",
    "MLP",
    "Objective",
    "Selection",
    "SolverDivergedError",
    "Spectrum",
    "TrainResult",
    "TrainSpec",
    "aggregate_over_seeds",
    "bootstrap_ci",
    "build_model",
    "convergence_report",
    "correlation",
    "correlations",
    "count_parameters",
    "fit",
    "hessian_matrix",
    "hvp",
    "load_iris",
    "loo_retrain",
    "load_mnist_digits",
    "loo_retrain_many",
    "loo_retrain_sequential",
    "make_estimator",
    "spearman_over",
    "synthetic_classification",
    "top_eigenvalue",
    "__version__",
]
