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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fragile.book.chapter import BEYOND_PART, Chapter, ChapterConfig
from fragile.chapters.protocol import DTYPES, SmallMnistData, estimate, iris_split, run_jobs, small_mnist_data
from fragile.config import to_dict
from fragile.core.ground_truth import LOOTask, loo_retrain_many, pbrf_retrain, proximal_response
from fragile.core.metrics import correlation
from fragile.core.objective import Objective
from fragile.core.selection import highest_loss, select_top_k
from fragile.core.train import TrainSpec, fit
from fragile.data.datasets import Dataset
from fragile.errors import InvalidArgumentError, check_choice, check_int, check_positive
from fragile.estimators import METHODS
from fragile.models.small import build_model
from fragile.run.sweep import Job, SweepReport

log = logging.getLogger(__name__)

# The Iris chapter's default split: this chapter's Iris models see the same training and test flowers.
IRIS_TEST_FRACTION = 0.2
IRIS_SPLIT_SEED = 0
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
class EstimandsConfig(ChapterConfig):
    """Every value the chapter depends on.

    Attributes:
        (the common fields of :class:`~fragile.book.chapter.ChapterConfig`; the CPU only: the models are small)
        n_seeds: models per Iris depth and small-MNIST seeds.
        selection: ``top`` (the ``top_k`` largest |prediction| of the first estimator, the paper's protocol)
            or ``random`` (Bae et al.'s).
        iris_depths: hidden-layer counts of the Iris sweep (width ``iris_width``, the paper's 5).
        iris_width, iris_activation, iris_lr, iris_train_steps, iris_retrain_steps, iris_weight_decay,
            iris_damping, iris_top_k: the Iris networks, full-batch GD, as in the Iris chapter.
        iris_estimators: estimators run on Iris; the first chooses the points under ``top``.
        mnist_n_train, mnist_n_test, mnist_lr, mnist_batch_size, mnist_train_steps, mnist_retrain_steps,
            mnist_weight_decay, mnist_damping, mnist_top_k: the small-MNIST CNN (Adam), as in its chapter.
        mnist_test_points: test points per small-MNIST model: the highest-loss ones.
        mnist_dtype: the CNN's precision: ``float32`` halves the cost; ``float64`` lets the PBRF and proximal solves
            reach a smaller gradient (the chapter reports how far they got).
        mnist_estimators: estimators run on small MNIST; ``exact`` (the Hessian materialised by HVPs)
            costs about 2 s per training image on one core, so the default leaves it out.
        lissa_depth, lissa_batch_size: LiSSA's recursion depth and minibatch (None: full batch).
        cg_max_iter: CG iteration cap. arnoldi_rank: Arnoldi's kept eigenpairs.
        tracin_checkpoints: checkpoints of the training kept for TracIn (evenly spaced, the last is θ*).
        pbrf_max_iter: L-BFGS iterations per PBRF / proximal-response solve.
        chunk_size: leave-one-out models per training stack.
    """

    n_seeds: int = 2
    selection: str = "top"
    iris_depths: tuple[int, ...] = (1, 2, 3)
    iris_width: int = 5
    iris_activation: str = "relu"
    iris_lr: float = 0.3
    iris_train_steps: int = 4000
    iris_retrain_steps: int = 1000
    iris_weight_decay: float = 0.001
    iris_damping: float = 0.01
    iris_top_k: int = 20
    iris_estimators: tuple[str, ...] = ESTIMATORS
    mnist_n_train: int = 60
    mnist_n_test: int = 500
    mnist_lr: float = 0.003
    mnist_batch_size: int = 30
    mnist_train_steps: int = 500
    mnist_retrain_steps: int = 100
    mnist_weight_decay: float = 0.001
    mnist_damping: float = 0.01
    mnist_top_k: int = 8
    mnist_dtype: str = "float32"
    mnist_test_points: int = 1
    mnist_estimators: tuple[str, ...] = tuple(m for m in ESTIMATORS if m != "exact")
    lissa_depth: int = 50
    lissa_batch_size: int | None = None
    cg_max_iter: int = 200
    arnoldi_rank: int = 20
    tracin_checkpoints: int = 10
    pbrf_max_iter: int = 100
    chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("mnist_dtype", self.mnist_dtype, ("float32", "float64"))
        if not self.iris_depths and not self.mnist_test_points:
            raise InvalidArgumentError("iris_depths is empty and mnist_test_points is 0: nothing to run")
        for d in self.iris_depths:
            check_int("iris_depths", d, minimum=1, maximum=12)
        for name in (
            "iris_width",
            "iris_train_steps",
            "iris_retrain_steps",
            "iris_top_k",
            "mnist_batch_size",
            "mnist_train_steps",
            "mnist_retrain_steps",
            "mnist_top_k",
            "lissa_depth",
            "cg_max_iter",
            "arnoldi_rank",
            "tracin_checkpoints",
            "pbrf_max_iter",
            "chunk_size",
        ):
            check_int(name, getattr(self, name), minimum=1)
        check_int("mnist_test_points", self.mnist_test_points, minimum=0)
        check_int("mnist_n_train", self.mnist_n_train, minimum=20)
        check_int("mnist_n_test", self.mnist_n_test, minimum=10)
        if self.lissa_batch_size is not None:
            check_int("lissa_batch_size", self.lissa_batch_size, minimum=1)
        for name in ("iris_lr", "mnist_lr"):
            check_positive(name, getattr(self, name))
        for name in ("iris_weight_decay", "iris_damping", "mnist_weight_decay", "mnist_damping"):
            check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("iris_estimators", "mnist_estimators"):
            methods = getattr(self, name)
            if not methods:
                raise InvalidArgumentError(f"{name} is empty; choose from {list(ESTIMATORS)}")
            for m in methods:
                check_choice(name, m, ESTIMATORS)
        # The PBRF's proximity is weight decay + damping: with both 0 its objective has no minimum.
        if self.iris_weight_decay + self.iris_damping <= 0 or self.mnist_weight_decay + self.mnist_damping <= 0:
            raise InvalidArgumentError("weight decay + damping must be > 0 for each data set (the PBRF's proximity term)")

    def iris_data(self) -> tuple[Dataset, Dataset]:
        """The Iris chapter's split (its default test fraction and split seed)."""
        return iris_split(IRIS_TEST_FRACTION, IRIS_SPLIT_SEED)

    def mnist_data(self) -> SmallMnistData:
        """The small-MNIST digits as the small-MNIST chapter takes them offline (its default split seed)."""
        return small_mnist_data(
            data_root="",
            download=False,
            n_train=self.mnist_n_train,
            n_test=self.mnist_n_test,
            split_seed=0,
            dtype=DTYPES[self.mnist_dtype],
        )


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


def _estimates(cfg, methods, objective, theta, x, y, x_test, y_test, damping, checkpoints, lr_per_checkpoint) -> dict:
    """Every estimator's predictions (n_test, n), seconds and worst solve residual; a failed solver is reported, not hidden."""
    out = {}
    for m in methods:
        name, kwargs = _estimator_kwargs(cfg, m, damping, checkpoints, lr_per_checkpoint)
        res = estimate(name, objective, theta, x, y, x_test, y_test, **kwargs)
        if "failed" in res:
            out[m] = res
            continue
        out[m] = {
            "predicted": res["predicted"],
            "seconds": res["seconds"],
            "residual": float(res["residuals"].max()) if res["residuals"].size else math.nan,
        }
    return out


def _choose(cfg, k, estimates, methods, t, n, seed) -> np.ndarray:
    if cfg.selection == "random":
        gen = np.random.default_rng([seed, t])
        return np.sort(gen.choice(n, size=k, replace=False))
    first = estimates[methods[0]]
    if "failed" in first:
        raise InvalidArgumentError(f"{methods[0]} (the first estimator, which chooses the points) failed: {first['failed']}")
    return select_top_k(first["predicted"][t], k)


@dataclass(frozen=True)
class _Model:
    """One trained model's share of the ground-truth work."""

    theta0: torch.Tensor
    theta: torch.Tensor
    union: np.ndarray
    x_test: torch.Tensor
    y_test: torch.Tensor


def _truths(objective, models: list[_Model], x, y, damping, retrain, train, pbrf_max_iter, chunk_size) -> list[dict]:
    """The five ground truths for the removal of each point of each model's ``union``: (len(union), n_test) arrays.

    The warm starts of all models train as one batched stack, the cold starts as another (their own lengths).
    """
    warm = loo_retrain_many(
        objective,
        [LOOTask(m.theta, torch.as_tensor(m.union), m.x_test, m.y_test) for m in models],
        x,
        y,
        retrain,
        chunk_size=chunk_size,
        progress=False,
    )
    cold = loo_retrain_many(
        objective,
        [LOOTask(m.theta0, torch.as_tensor(m.union), m.x_test, m.y_test) for m in models],
        x,
        y,
        train,
        chunk_size=chunk_size,
        progress=False,
    )
    out = []
    n = x.shape[0]
    for m, w, c in zip(models, warm, cold):
        # ‖∇F‖ at the returned solution against the size of the removal's own pull ε‖∇L(z_m)‖: how well it was solved
        pull = objective.point_grads(m.theta, x[torch.as_tensor(m.union)], y[torch.as_tensor(m.union)]).norm(dim=1) / n
        seconds = {}
        start = time.perf_counter()
        prox = proximal_response(objective, m.theta, x, y, m.union, m.x_test, m.y_test, damping=damping, max_iter=pbrf_max_iter)
        seconds["proximal"] = time.perf_counter() - start
        start = time.perf_counter()
        pbrf = pbrf_retrain(objective, m.theta, x, y, m.union, m.x_test, m.y_test, damping=damping, max_iter=pbrf_max_iter)
        seconds["pbrf"] = time.perf_counter() - start
        stationarity = {"proximal": (prox.objective_grad_norm / pull).numpy(), "pbrf": (pbrf.objective_grad_norm / pull).numpy()}
        solved = {g: v <= UNSOLVED for g, v in stationarity.items()}
        out.append(
            {
                "warm": w.actual.double().numpy(),
                "warm_corrected": w.actual_vs_control.double().numpy(),
                "cold": c.actual_vs_control.double().numpy(),
                # a solve that ended far from a stationary point (the objective can be unbounded below for deep ReLU
                # networks, and L-BFGS may leave θ*'s basin) measures nothing: left out, and counted in the chapter
                "proximal": np.where(solved["proximal"][:, None], prox.actual.double().numpy(), np.nan),
                "pbrf": np.where(solved["pbrf"][:, None], pbrf.actual.double().numpy(), np.nan),
                "drift": w.drift.double().numpy(),
                "pbrf_stationarity": float(np.median(stationarity["pbrf"])),
                "proximal_stationarity": float(np.median(stationarity["proximal"])),
                "unsolved": {g: int((~v).sum()) for g, v in solved.items()},
                "seconds": seconds,
            }
        )
    return out


def _rows(setting, seed, test_points, chosen, union, estimates, truths) -> list[dict[str, Any]]:
    """One record per test point: predictions and ground truths over its chosen points."""
    pos = {int(i): r for r, i in enumerate(union)}
    records = []
    for j, t in enumerate(test_points):
        rows = [pos[int(i)] for i in chosen[j]]
        rec = {
            "setting": setting,
            "seed": seed,
            "test_point": int(t),
            "chosen": np.asarray(chosen[j]),
            "truths": {g: truths[g][rows, j] for g in GROUND_TRUTHS},
            "drift": float(truths["drift"][j]),
            "estimates": {
                m: (e if "failed" in e else {**e, "predicted": e["predicted"][j, chosen[j]]}) for m, e in estimates.items()
            },
        }
        records.append(rec)
    return records


def run_iris_depth(cfg: EstimandsConfig, depth: int) -> dict[str, Any]:
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
    records = []
    for r, ((seed, t, est, chosen, _), tr) in enumerate(zip(prepared, truths)):
        for rec in _rows(f"iris/d{depth}", seed, [t], [chosen], chosen, est, tr):
            rec.update(
                depth=depth,
                grad_norm=float(trained.grad_norm[r]),
                train_seconds=train_seconds / cfg.n_seeds,
                truth_seconds=tr["seconds"],
                pbrf_stationarity=tr["pbrf_stationarity"],
                proximal_stationarity=tr["proximal_stationarity"],
                unsolved=tr["unsolved"],
            )
            records.append(rec)
    return {"setting": f"iris/d{depth}", "depth": depth, "num_params": objective.num_params, "n_train": n, "records": records}


def run_mnist_seed(cfg: EstimandsConfig, seed: int) -> dict[str, Any]:
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
    truths = _truths(
        objective,
        [_Model(theta0, theta, union, x_t, y_t)],
        x,
        y,
        cfg.mnist_damping,
        spec.replace(steps=cfg.mnist_retrain_steps),
        spec,
        cfg.pbrf_max_iter,
        cfg.chunk_size,
    )[0]
    with torch.no_grad():
        accuracy = float((objective.logits(theta, x).argmax(-1) == y).double().mean())
    records = _rows("mnist", seed, tps.tolist(), chosen, union, est, truths)
    for rec in records:
        rec.update(
            depth=None,
            grad_norm=float(trained.grad_norm[0]),
            train_seconds=train_seconds,
            truth_seconds=truths["seconds"],
            pbrf_stationarity=truths["pbrf_stationarity"],
            proximal_stationarity=truths["proximal_stationarity"],
            unsolved=truths["unsolved"],
            train_accuracy=accuracy,
        )
    return {
        "setting": "mnist",
        "seed": seed,
        "num_params": objective.num_params,
        "n_train": n,
        "records": records,
        "stand_in": data.stand_in,
        "data": data.description,
    }


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


def iris_job(depth: int, **fields: Any) -> dict[str, Any]:
    """Sweep job: :func:`run_iris_depth` for the fields :func:`study_jobs` keyed it by."""
    return run_iris_depth(EstimandsConfig(**fields), depth)


def mnist_job(model_seed: int, **fields: Any) -> dict[str, Any]:
    """Sweep job: :func:`run_mnist_seed` for the fields :func:`study_jobs` keyed it by."""
    return run_mnist_seed(EstimandsConfig(**fields), model_seed)


def study_jobs(cfg: EstimandsConfig) -> list[Job]:
    """One job per Iris depth and one per small-MNIST seed, each keyed by everything its numbers depend on."""
    jobs = [Job(f"estimands/iris-d{d}", iris_job, {**_key(cfg, "iris"), "depth": d}, cost=10 * d) for d in cfg.iris_depths]
    if cfg.mnist_test_points:
        jobs += [Job(f"estimands/mnist-s{s}", mnist_job, {**_key(cfg, "mnist"), "model_seed": s}, cost=100) for s in cfg.seeds]
    return jobs


def run_study(cfg: EstimandsConfig, *, progress: bool = True, client=None) -> tuple[list[dict[str, Any]], SweepReport]:
    """Every job through the sweep layer; returns the finished jobs' results (in job order) and the report."""
    return run_jobs(cfg, study_jobs(cfg), progress=progress, client=client)


# -- tables --------------------------------------------------------------------------------------------------


def _records(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rec for res in results for rec in res["records"]]


def _finite_correlation(a: np.ndarray, b: np.ndarray, statistic: str) -> float:
    """The correlation over the points where both sides are finite (an unsolved proximal solve is NaN); NaN below 3."""
    keep = np.isfinite(a) & np.isfinite(b)
    return correlation(a[keep], b[keep], statistic) if keep.sum() >= 3 else math.nan


def grid_table(results: list[dict[str, Any]], statistic: str = "spearman") -> pd.DataFrame:
    """One row per (setting, seed, test point, estimator, ground truth): the correlation over the chosen points."""
    rows = []
    for rec in _records(results):
        for m, e in rec["estimates"].items():
            for g in GROUND_TRUTHS:
                value = math.nan if "failed" in e else _finite_correlation(e["predicted"], rec["truths"][g], statistic)
                rows.append(
                    {
                        "setting": rec["setting"],
                        "depth": rec["depth"],
                        "seed": rec["seed"],
                        "test_point": rec["test_point"],
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


def _stage(rec: dict[str, Any], name: str) -> np.ndarray | None:
    if name in rec["truths"]:
        return rec["truths"][name]
    e = rec["estimates"].get(name)
    return None if e is None or "failed" in e else e["predicted"]


def chain_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """Bae et al.'s decomposition: for each consecutive step of :data:`CHAIN` (where both ends were computed),
    the Spearman between the two ends and their relative distance ``‖a − b‖ / ‖b‖`` over the chosen points,
    as mean ± sd per setting kind (Iris, all depths; small MNIST).

    Every stage is a loss change per removed point (removal weight 1/n), so the distances are comparable.
    """
    rows = []
    for rec in _records(results):
        kind = "Iris" if rec["setting"].startswith("iris") else "small MNIST"
        for a, b, what in CHAIN:
            va, vb = _stage(rec, a), _stage(rec, b)
            if va is None or vb is None:
                continue
            keep = np.isfinite(va) & np.isfinite(vb)
            va, vb = va[keep], vb[keep]
            denom = float(np.linalg.norm(vb))
            rows.append(
                {
                    "data": kind,
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


def solve_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """How well the proximal solves went, per model: the median relative stationarity ‖∇F‖ / (ε‖∇L(z_m)‖) of the
    PBRF and proximal-response solves, and how many chosen points' solves ended above 1 (left out as unsolved)."""
    rows = []
    for res in results:
        seen = set()
        for rec in res["records"]:
            if (rec["setting"], rec["seed"]) in seen:
                continue
            seen.add((rec["setting"], rec["seed"]))
            rows.append(
                {
                    "setting": rec["setting"],
                    "seed": rec["seed"],
                    "points": len(rec["chosen"]),
                    "pbrf_stationarity": rec["pbrf_stationarity"],
                    "pbrf_unsolved": rec["unsolved"]["pbrf"],
                    "proximal_stationarity": rec["proximal_stationarity"],
                    "proximal_unsolved": rec["unsolved"]["proximal"],
                }
            )
    return pd.DataFrame(rows)


def timing_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """Seconds per estimator and per PBRF / proximal solve set, median over models, per setting kind."""
    rows = []
    for rec in _records(results):
        kind = "Iris" if rec["setting"].startswith("iris") else "small MNIST"
        for m, e in rec["estimates"].items():
            if "failed" not in e:
                rows.append({"data": kind, "method": m, "seconds": e["seconds"]})
        for g, s in rec["truth_seconds"].items():
            rows.append({"data": kind, "method": TRUTH_NAMES[g], "seconds": s})
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


def pbrf_claims(results: list[dict[str, Any]], *, iris_width: int) -> list[dict[str, Any]]:
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


def observations(results: list[dict[str, Any]]) -> list[str]:
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
