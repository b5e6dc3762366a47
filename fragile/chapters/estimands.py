"""Beyond the paper: what do influence functions estimate? Every estimator against every ground truth.

Bae et al. (2022) argue that damped influence functions approximate the proximal Bregman response function
(PBRF), not leave-one-out retraining, and split the gap between the two into steps. This module runs that
comparison on the paper's two smallest settings: the Iris depth sweep (docs/protocol.md#iris) and the
small-MNIST CNN (docs/protocol.md#small-mnist). Per trained model and test point:

* **estimators** (:data:`fragile.estimators.METHODS`, plus ``exact_gn``: the exact influence on the
  Gauss–Newton matrix) predict the loss change of removing every training point;
* ``top_k`` points are chosen, by |prediction| of the first estimator (the paper's protocol) or at random
  (Bae et al.'s), and their removal is measured by the five **ground truths** of :data:`GROUND_TRUTHS`;
* every estimator × ground truth is correlated over the chosen points, and the consecutive steps of Bae et
  al.'s chain (:data:`CHAIN`) are compared with each other, which splits the gap into warm start, proximity,
  non-convergence, linearisation, curvature (Hessian vs Gauss–Newton) and solver error.

One sweep job per Iris depth (its seeds train as one stack) and one per small-MNIST seed; cached by config.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from fragile.book.chapter import BEYOND_PART, Chapter, ChapterConfig
from fragile.chapters.protocol import (
    DTYPES,
    ConvergenceSettings,
    SmallMnistData,
    estimate,
    iris_split,
    run_jobs,
    small_mnist_data,
)
from fragile.chapters.results import Estimate, EstimatorFailure
from fragile.config import at_least, between, each, non_negative, one_of, optional, positive, setting, to_dict
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

    n_seeds: int = setting(2, "models per Iris depth and small-MNIST seeds", at_least(1))
    selection: str = setting(
        "top",
        "top (the top_k largest |prediction| of the first estimator, the paper's protocol) or random (Bae et al.'s)",
        one_of(SELECTIONS),
    )
    iris_depths: tuple[int, ...] = setting(
        (1, 2, 3), "hidden-layer counts of the Iris sweep (width iris_width, the paper's 5)", each(between(1, 12))
    )
    iris_width: int = setting(5, "hidden units per layer", at_least(1))
    iris_activation: str = setting("relu", "hidden activation", one_of(ACTIVATIONS))
    iris_lr: float = setting(0.3, "gradient-descent learning rate", positive)
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
        tuple(m for m in ESTIMATORS if m != "exact"),
        (
            "estimators run on small MNIST; exact (the Hessian materialised by HVPs) costs about 2 s per training image "
            "on one core, so the default leaves it out"
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
    chunk_size: int = setting(64, "leave-one-out models per training stack (memory, not numbers)", at_least(1))

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
        grad_norm: ‖∇‖ of the training objective at the end of training.
        train_seconds: wall time of its training (an Iris stack's time shared evenly by its seeds).
        train_accuracy: fraction of training points classified correctly (small MNIST; None for Iris: not measured).
        proximal, pbrf: how its proximal-response and PBRF solves went.
        points: one :class:`PointResult` per test point.
    """

    depth: int | None
    seed: int
    grad_norm: float
    train_seconds: float
    train_accuracy: float | None
    proximal: ProximalSolve
    pbrf: ProximalSolve
    points: tuple[PointResult, ...]

    @property
    def solves(self) -> dict[str, ProximalSolve]:
        """The two solves by ground-truth name, in the order they ran."""
        return {"proximal": self.proximal, "pbrf": self.pbrf}


@record
@dataclass(frozen=True)
class EstimandsResult:
    """One job: all seeds of one Iris depth, or one small-MNIST seed.

    Attributes:
        setting: ``iris/d<depth>`` or ``mnist``.
        num_params: p, the length of θ.
        n_train: training points.
        stand_in: whether the data are the offline stand-in for Koh & Liang's small MNIST (False for Iris).
        data: what the data are.
        models: its trained models (an Iris depth's seeds; the one small-MNIST model).
    """

    setting: str
    num_params: int
    n_train: int
    stand_in: bool
    data: str
    models: tuple[ModelResult, ...]

    @property
    def kind(self) -> str:
        """``Iris`` or ``small MNIST``: what the tables group the settings by."""
        return "Iris" if self.setting.startswith("iris") else "small MNIST"


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
        gen = np.random.default_rng([seed, t])
        return np.sort(gen.choice(n, size=k, replace=False))
    first = estimates[methods[0]]
    if isinstance(first, EstimatorFailure):
        raise InvalidArgumentError(f"{methods[0]} (the first estimator, which chooses the points) failed: {first.message}")
    return select_top_k(first.predicted[t], k)


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
    grad_norm: float,
    train_seconds: float,
    train_accuracy: float | None,
) -> ModelResult:
    """One model's result (the keywords as :class:`ModelResult` has them): its solves and one :class:`PointResult`
    per test point, with the predictions and ground truths over its chosen points."""
    pos = {int(i): r for r, i in enumerate(union)}
    points = []
    for j, t in enumerate(test_points):
        picked = chosen[j]
        narrowed = {
            m: e
            if isinstance(e, EstimatorFailure)
            else replace(e, predicted=e.predicted[j, picked], residuals=e.residuals[j : j + 1])
            for m, e in estimates.items()
        }
        truths = measured.truths.narrowed([pos[int(i)] for i in picked], j)
        points.append(PointResult(int(t), np.asarray(picked), float(measured.drift[j]), truths, narrowed))
    return ModelResult(depth, seed, grad_norm, train_seconds, train_accuracy, measured.proximal, measured.pbrf, tuple(points))


def run_iris_depth(cfg: EstimandsConfig, depth: int) -> EstimandsResult:
    """All seeds of one Iris depth: train (one stack), estimate, choose, the five ground truths, per seed.

    Cost: one stack of ``n_seeds`` models for ``iris_train_steps`` GD steps; per seed the estimators, a warm
    stack (``iris_retrain_steps``) and a cold stack (``iris_train_steps``) of ``iris_top_k + 1`` models and
    2·``iris_top_k`` L-BFGS solves.
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
        prepared.append((seed, t, est, chosen, _Model(theta0[r], theta, chosen, x_t, y_t)))
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
            chosen,
            est,
            depth=depth,
            seed=seed,
            grad_norm=float(trained.grad_norm[r]),
            train_seconds=train_seconds / cfg.n_seeds,
            train_accuracy=None,
        )
        for r, ((seed, t, est, chosen, _), measured) in enumerate(zip(prepared, truths))
    )
    return EstimandsResult(f"iris/d{depth}", objective.num_params, n, stand_in=False, data=IRIS_DATA, models=results)


def run_mnist_seed(cfg: EstimandsConfig, seed: int) -> EstimandsResult:
    """One small-MNIST CNN (float64): train by Adam, its ``mnist_test_points`` highest-loss test points,
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
    union = np.unique(np.concatenate(chosen))
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
    with torch.no_grad():
        accuracy = float((objective.logits(theta, x).argmax(-1) == y).double().mean())
    model = _model_result(
        measured,
        tps.tolist(),
        chosen,
        union,
        est,
        depth=None,
        seed=seed,
        grad_norm=float(trained.grad_norm[0]),
        train_seconds=train_seconds,
        train_accuracy=accuracy,
    )
    return EstimandsResult("mnist", objective.num_params, n, stand_in=data.stand_in, data=data.description, models=(model,))


# Settings of the estimators and ground truths that both kinds of job depend on.
_SHARED_FIELDS = (
    "selection",
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


# -- tables --------------------------------------------------------------------------------------------------


def _points(results: list[EstimandsResult]) -> Iterator[tuple[EstimandsResult, ModelResult, PointResult]]:
    """Every test point of every model of every job, with its job and model."""
    return ((res, model, point) for res in results for model in res.models for point in model.points)


def estimator_failures(results: list[EstimandsResult]) -> list[str]:
    """One line per (model, estimator) that failed, with why (the first 160 characters)."""
    return sorted(
        {
            f"{res.setting} seed {model.seed}: {m}: {e.message[:160]}"
            for res, model, point in _points(results)
            for m, e in point.estimates.items()
            if isinstance(e, EstimatorFailure)
        }
    )


def _finite_correlation(a: np.ndarray, b: np.ndarray, statistic: str) -> float:
    """The correlation over the points where both sides are finite (an unsolved proximal solve is NaN); NaN below 3."""
    keep = np.isfinite(a) & np.isfinite(b)
    return correlation(a[keep], b[keep], statistic) if keep.sum() >= 3 else math.nan


def grid_table(results: list[EstimandsResult], statistic: str = "spearman") -> pd.DataFrame:
    """One row per (setting, seed, test point, estimator, ground truth): the correlation over the chosen points."""
    rows = []
    for res, model, point in _points(results):
        for m, e in point.estimates.items():
            for g in GROUND_TRUTHS:
                value = (
                    math.nan
                    if isinstance(e, EstimatorFailure)
                    else _finite_correlation(e.predicted, point.truths.of(g), statistic)
                )
                rows.append(
                    {
                        "setting": res.setting,
                        "depth": model.depth,
                        "seed": model.seed,
                        "test_point": point.test_point,
                        "estimator": m,
                        "ground_truth": g,
                        statistic: value,
                    }
                )
    return pd.DataFrame(rows)


def grid_summary(grid: pd.DataFrame, setting: str, statistic: str = "spearman") -> pd.DataFrame:
    """Estimator × ground truth: "mean ± sd" over seeds and test points (and depths), for the settings starting with
    ``setting`` (``iris`` or ``mnist``)."""
    sub = grid[grid["setting"].str.startswith(setting)]
    agg = sub.groupby(["estimator", "ground_truth"])[statistic].agg(["mean", "std", "count"]).reset_index()
    agg["cell"] = [
        f"{m:.2f} ± {s:.2f}" if c > 1 else f"{m:.2f}" for m, s, c in zip(agg["mean"], agg["std"].fillna(0), agg["count"])
    ]
    table = agg.pivot(index="estimator", columns="ground_truth", values="cell")
    order = [m for m in ESTIMATORS if m in table.index]
    return table.loc[order, [g for g in GROUND_TRUTHS if g in table.columns]].rename(columns=TRUTH_NAMES)


def depth_table(grid: pd.DataFrame, estimator: str = "exact", statistic: str = "spearman") -> pd.DataFrame:
    """Iris: mean and sd over seeds of one estimator's correlation with each ground truth, per depth."""
    sub = grid[(grid["setting"].str.startswith("iris")) & (grid["estimator"] == estimator)]
    agg = sub.groupby(["depth", "ground_truth"])[statistic].agg(["mean", "std"]).reset_index()
    return agg


def depth_trend(grid: pd.DataFrame, estimator: str, truth: str, statistic: str = "spearman") -> float:
    """Spearman of (depth, mean correlation with ``truth``) over the Iris depths: negative = worse when deeper."""
    agg = depth_table(grid, estimator, statistic)
    sub = agg[agg["ground_truth"] == truth].sort_values("depth")
    if len(sub) < 3:
        return math.nan
    return correlation(sub["depth"].to_numpy(float), sub["mean"].to_numpy(float), "spearman")


def _stage(point: PointResult, name: str) -> np.ndarray | None:
    """A stage of :data:`CHAIN` on one test point's chosen points: a ground truth, or an estimator's predictions
    (None where that estimator was not run or failed)."""
    if name in GROUND_TRUTHS:
        return point.truths.of(name)
    e = point.estimates.get(name)
    return e.predicted if isinstance(e, Estimate) else None


def chain_table(results: list[EstimandsResult]) -> pd.DataFrame:
    """Bae et al.'s decomposition: for each consecutive step of :data:`CHAIN` (where both ends were computed),
    the Spearman between the two ends and their relative distance ``‖a − b‖ / ‖b‖`` over the chosen points,
    as mean ± sd per setting kind (Iris, all depths; small MNIST).

    Every stage is a loss change per removed point (removal weight 1/n), so the distances are comparable.
    """
    rows = []
    for res, _, point in _points(results):
        for a, b, what in CHAIN:
            va, vb = _stage(point, a), _stage(point, b)
            if va is None or vb is None:
                continue
            keep = np.isfinite(va) & np.isfinite(vb)
            va, vb = va[keep], vb[keep]
            denom = float(np.linalg.norm(vb))
            rows.append(
                {
                    "data": res.kind,
                    "step": f"{TRUTH_NAMES.get(a, a)} → {TRUTH_NAMES.get(b, b)}",
                    "gap": what,
                    "spearman": _finite_correlation(va, vb, "spearman"),
                    "relative_distance": float(np.linalg.norm(va - vb)) / denom if denom > 0 else math.nan,
                }
            )
    if not rows:
        return pd.DataFrame(columns=["data", "step", "gap", "spearman", "relative_distance", "models"])
    df = pd.DataFrame(rows)
    out = (
        df.groupby(["data", "step", "gap"], sort=False)
        .agg(
            spearman=("spearman", "mean"),
            spearman_sd=("spearman", "std"),
            relative_distance=("relative_distance", "median"),
            models=("spearman", "size"),
        )
        .reset_index()
    )
    return out


def solve_table(results: list[EstimandsResult]) -> pd.DataFrame:
    """How well the proximal solves went, per model: the median relative stationarity ‖∇F‖ / (ε‖∇L(z_m)‖) of the
    PBRF and proximal-response solves, and how many chosen points' solves ended above 1 (left out as unsolved)."""
    rows = [
        {
            "setting": res.setting,
            "seed": model.seed,
            "points": len(model.points[0].chosen),
            "pbrf_stationarity": model.pbrf.stationarity,
            "pbrf_unsolved": model.pbrf.unsolved,
            "proximal_stationarity": model.proximal.stationarity,
            "proximal_unsolved": model.proximal.unsolved,
        }
        for res in results
        for model in res.models
    ]
    return pd.DataFrame(rows)


def timing_table(results: list[EstimandsResult]) -> pd.DataFrame:
    """Seconds per estimator and per PBRF / proximal solve set, median over models, per setting kind."""
    rows = []
    for res, model, point in _points(results):
        for m, e in point.estimates.items():
            if isinstance(e, Estimate):
                rows.append({"data": res.kind, "method": m, "seconds": e.seconds})
        for g, solve in model.solves.items():
            rows.append({"data": res.kind, "method": TRUTH_NAMES[g], "seconds": solve.seconds})
    if not rows:
        return pd.DataFrame(columns=["data", "method", "seconds"])
    return pd.DataFrame(rows).groupby(["data", "method"], sort=False)["seconds"].median().reset_index()


# -- the claims table's column "against the PBRF" ------------------------------------------------------------


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def depth_drop(grid: pd.DataFrame, estimator: str, truth: str) -> tuple[float, int | None, int | None]:
    """How much one estimator's agreement with ``truth`` falls with depth on Iris: the mean Spearman at the shallowest
    depth minus at the deepest depth where it is defined, with those two depths (NaN and None when fewer than two
    depths have a defined correlation). A correlation is undefined when the chosen points' predictions or changes
    are all equal: a collapsed ("dead") deep ReLU network predicts the same for every point."""
    sub = grid[(grid["setting"].str.startswith("iris")) & (grid["estimator"] == estimator) & (grid["ground_truth"] == truth)]
    means = sub.dropna(subset=["spearman"]).groupby("depth")["spearman"].mean().sort_index()
    if len(means) < 2:
        return math.nan, None, None
    return float(means.iloc[0] - means.iloc[-1]), int(means.index[0]), int(means.index[-1])


def undefined_depths(grid: pd.DataFrame, estimator: str = "exact") -> list[int]:
    """Iris depths where no model gave a defined correlation for ``estimator`` (see :func:`depth_drop`)."""
    sub = grid[(grid["setting"].str.startswith("iris")) & (grid["estimator"] == estimator)]
    return sorted(int(d) for d, g in sub.groupby("depth") if g["spearman"].isna().all())


def pbrf_claims(results: list[EstimandsResult], *, iris_width: int) -> list[dict[str, Any]]:
    """The paper's claims that this chapter can re-test with the PBRF as the ground truth: each row has our number
    against the paper's ground truth (warm-start leave-one-out, as in its own chapter) and against the PBRF, for the
    same models. ``key`` matches the claim keys of the Iris and small-MNIST chapters."""
    grid = grid_table(results)
    out = []
    iris = grid[grid["setting"].str.startswith("iris")]
    if iris_width == 5 and len(iris[iris["depth"] == 1]):
        head = iris[(iris["depth"] == 1) & (iris["estimator"] == "exact")]
        warm = _mean_sd(head[head["ground_truth"] == "warm"]["spearman"])
        pbrf = _mean_sd(head[head["ground_truth"] == "pbrf"]["spearman"])
        out.append(
            {
                "key": "iris_headline_with_wd",
                "claim": "Iris, depth 1 with weight decay: exact influence, Spearman",
                "warm": warm[0],
                "pbrf": pbrf[0],
                "text": f"{pbrf[0]:.2f} ± {pbrf[1]:.2f} (warm-start LOO here: {warm[0]:.2f} ± {warm[1]:.2f})",
            }
        )
    (drop_warm, *_), (drop_pbrf, lo, hi) = depth_drop(grid, "exact", "warm"), depth_drop(grid, "exact", "pbrf")
    if math.isfinite(drop_pbrf):
        dead = undefined_depths(grid)
        out.append(
            {
                "key": "iris_depth_drop",
                "claim": f"Iris: Spearman at depth {lo} minus depth {hi} (exact influence)",
                "warm": drop_warm,
                "pbrf": drop_pbrf,
                "text": (
                    f"depth {lo} minus depth {hi}: {drop_pbrf:.2f} (warm-start LOO here: {drop_warm:.2f})"
                    + (f"; undefined at depth {', '.join(map(str, dead))} (collapsed networks)" if dead else "")
                ),
            }
        )
    mn = grid[grid["setting"] == "mnist"]
    if len(mn):
        first = next(m for m in ESTIMATORS if m in set(mn["estimator"]))
        sub = mn[mn["estimator"] == first]
        per_tp = {g: sub[sub["ground_truth"] == g]["spearman"].dropna() for g in ("warm", "pbrf")}
        if len(per_tp["pbrf"]):
            rng = {g: (float(v.min()), float(v.max())) for g, v in per_tp.items() if len(v)}
            w = rng.get("warm", (math.nan, math.nan))
            out.append(
                {
                    "key": "smnist_range",
                    "claim": f"Small MNIST: Spearman across test points ({first})",
                    "warm": w[1] - w[0],
                    "pbrf": rng["pbrf"][1] - rng["pbrf"][0],
                    "text": (
                        f"{rng['pbrf'][0]:.2f} – {rng['pbrf'][1]:.2f} with {first} (warm-start LOO here: {w[0]:.2f} – {w[1]:.2f})"
                    ),
                }
            )
    return out


def observations(results: list[EstimandsResult]) -> list[str]:
    """Computed sentences for the discussion: which ground truth each estimator agrees with best, the largest gap
    of the chain, and whether the depth effect survives against the PBRF."""
    grid = grid_table(results)
    if grid.empty:
        return []
    out = []
    for kind, mask in (("Iris", grid["setting"].str.startswith("iris")), ("small MNIST", grid["setting"] == "mnist")):
        sub = grid[mask]
        if sub.empty:
            continue
        means = sub.groupby("ground_truth")["spearman"].mean()
        best, worst = means.idxmax(), means.idxmin()
        out.append(
            f"**{kind}**: averaged over every estimator, the ground truth the estimates agree with best is the "
            f"**{TRUTH_NAMES[best]}** (mean Spearman {means[best]:.2f}), the worst the **{TRUTH_NAMES[worst]}** "
            f"({means[worst]:.2f})."
        )
    chain = chain_table(results)
    for kind, sub in chain.groupby("data", sort=False):
        sub = sub.dropna(subset=["relative_distance"])
        if len(sub):
            top = sub.loc[sub["relative_distance"].idxmax()]
            out.append(
                f"**{kind}**: the largest step of the chain is *{top['gap']}* ({top['step']}): median relative "
                f"distance {top['relative_distance']:.2f}, Spearman {top['spearman']:.2f} between its two ends."
            )
    (drop_warm, *_), (drop_pbrf, lo, hi) = depth_drop(grid, "exact", "warm"), depth_drop(grid, "exact", "pbrf")
    if math.isfinite(drop_warm) and math.isfinite(drop_pbrf):
        verdict = "survives" if drop_pbrf > 0.1 else "does not survive"
        out.append(
            f"**Depth (Iris)**: the exact influence's Spearman at depth {lo} minus depth {hi} is {drop_warm:.2f} against "
            f"warm-start leave-one-out and {drop_pbrf:.2f} against the PBRF: the depth effect {verdict} against the "
            "PBRF (rule: it survives when the drop against the PBRF is above 0.1)."
        )
    dead = undefined_depths(grid)
    if dead:
        out.append(
            f"**Depth (Iris)**: at depth {', '.join(map(str, dead))} every model's correlation is undefined: the "
            "width-5 ReLU network collapsed to predicting the same for every chosen point (its predictions tie), "
            "so neither leave-one-out nor the PBRF can be ranked against it."
        )
    return out


# -- figures -------------------------------------------------------------------------------------------------


def grid_heatmap(grid: pd.DataFrame, setting_prefix: str, *, title: str):
    """Mean Spearman of every estimator against every ground truth (over seeds, test points and, for Iris, depths)."""
    import matplotlib.pyplot as plt

    sub = grid[grid["setting"].str.startswith(setting_prefix)]
    table = sub.groupby(["estimator", "ground_truth"])["spearman"].mean().unstack()
    table = table.loc[[m for m in ESTIMATORS if m in table.index], [g for g in GROUND_TRUTHS if g in table.columns]]
    fig, ax = plt.subplots(figsize=(7.2, 0.45 * len(table) + 1.6))
    im = ax.imshow(table.to_numpy(float), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(table.to_numpy(float)):
        ax.text(
            j,
            i,
            "–" if not math.isfinite(v) else f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if math.isfinite(v) and abs(v) > 0.6 else "black",
        )
    ax.set_xticks(
        range(table.shape[1]),
        [TRUTH_NAMES[g].replace(", ", ",\n").replace(" (paper)", "\n(paper)") for g in table.columns],
        fontsize=7,
    )
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    fig.colorbar(im, ax=ax, label="mean Spearman")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def depth_figure(grid: pd.DataFrame, estimator: str = "exact"):
    """Iris: one estimator's Spearman (mean ± sd over seeds) against each ground truth, by depth."""
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
                lw=2.2 if g in ("warm", "pbrf") else 1.0,
                alpha=1.0 if g in ("warm", "pbrf") else 0.6,
            )
    ax.axvline(5.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("hidden layers (width 5)")
    ax.set_ylabel(f"Spearman of {estimator} influence")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Iris: does the depth effect survive against the PBRF? ({estimator} influence)", fontsize=10)
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
        ax.set_title(kind, fontsize=10)
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
