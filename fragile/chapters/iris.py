"""The Iris section (docs/protocol.md#iris; the paper's Figure 1): exact influence vs leave-one-out retraining
for small MLPs, across depth, width, weight decay and seeds.

Protocol, per architecture and seed: train by full-batch gradient descent from the seed's
initialisation (with and without weight decay, in one stack), take the held-out test point with the
highest loss, compute exact influence (materialised Hessian) on every training point, select the top
``selection_fraction`` by |predicted influence|, retrain each of them warm-started from θ* for
``retrain_steps`` steps with the drift control, and correlate predicted with actual loss changes.
Each architecture is one job of a :mod:`fragile.run.sweep` (its seeds train as one vectorised stack, which is
faster than spreading them over processes); jobs run on Dask workers, are cached one by one, and an
interrupted run resumes where it stopped. A job returns an :class:`ArchitectureResult`: one :class:`IrisRun` per
seed and weight decay, or a :class:`FailedRun` where the damped Hessian was singular.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from fragile.book.chapter import PAPER_PART, Chapter, ChapterConfig
from fragile.book.claims import Claim, DataUsed
from fragile.book.verdicts import MatchesPaper, PairedDifference, Rule, Trend, mean_interval, plural
from fragile.chapters.protocol import ConvergenceSettings, agreement, iris_split, job_fields, run_jobs
from fragile.chapters.results import Agreement, Estimate, EstimatorFailure
from fragile.config import at_least, between, each, fraction, non_negative, one_of, positive, setting
from fragile.core.convergence import (
    Convergence,
    ConvergenceClass,
    ConvergenceCriteria,
    classify_convergence,
    loss_rise,
    majority_share,
    prediction_spread,
)
from fragile.core.ground_truth import LOOResult, LOOTask, loo_retrain_many
from fragile.core.metrics import aggregate_over_seeds
from fragile.core.objective import Objective
from fragile.core.selection import SELECTION_SCORES, select_top_k
from fragile.core.train import TrainSpec, fit
from fragile.data.datasets import Dataset
from fragile.errors import InvalidArgumentError
from fragile.estimators import NEGATIVE_POLICIES, make_estimator
from fragile.models.small import ACTIVATIONS, INITS, build_model
from fragile.run.payload import record
from fragile.run.sweep import Job, SweepReport

log = logging.getLogger(__name__)

MAX_DEPTH = 12
MAX_WIDTH = 200
TEST_POINTS = ("per_model", "fixed")


@dataclass(frozen=True)
class IrisConfig(ConvergenceSettings, ChapterConfig):
    """Every value the Iris section depends on, each with its help text (``fragile params iris`` lists them), besides
    the common fields of :class:`~fragile.book.chapter.ChapterConfig` (``device`` is the CPU only here: the models
    are tiny). Values the paper does not state are marked so."""

    n_seeds: int = setting(10, "seeds per configuration (the paper reports single runs)", at_least(1, 1000))
    depths: tuple[int, ...] = setting(
        (1, 2, 3, 4, 5, 6, 7, 8),
        "hidden-layer counts of the depth sweep, at width headline_width",
        each(between(1, MAX_DEPTH), nonempty=True),
    )
    widths: tuple[int, ...] = setting(
        (8, 14, 20, 30, 40, 50), "widths of the width sweep, at depth 1", each(between(1, MAX_WIDTH), nonempty=True)
    )
    headline_width: int = setting(5, "width of the headline network and of the depth sweep (paper: 5)", between(1, MAX_WIDTH))
    activation: str = setting("relu", "hidden activation (paper: ReLU)", one_of(ACTIVATIONS))
    init: str = setting(
        "default",
        "weight initialisation: default (PyTorch's, uniform in ±1/√fan_in) or he (normal √(2/fan_in), zero biases); "
        "paper: not stated",
        one_of(INITS),
    )
    weight_decay: float = setting(0.001, 'L2 coefficient of the "with weight decay" runs (paper: not stated for Iris)', positive)
    damping_with_wd: float = setting(0.0, "damping λ with weight decay (paper: none)", non_negative)
    damping_without_wd: float = setting(0.001, "damping λ without weight decay (paper: 0.001)", non_negative)
    negative_eigenvalues: str = setting(
        "keep", "policy for negative Hessian eigenvalues (paper: damping only, i.e. keep)", one_of(NEGATIVE_POLICIES)
    )
    lr: float = setting(
        0.2,
        (
            "gradient-descent learning rate (paper: not stated). 0.2, not 0.3: at 0.3 every seed of the depth-2 network "
            "ends at lr·λmax ≈ 2, gradient descent's stability limit; at 0.2 most models of the depth sweep stay below "
            "it, and the ones that do not are classified unstable and left out of the claims"
        ),
        positive,
    )
    train_steps: int = setting(60000, "full-batch GD steps to θ* (paper: 60,000)", at_least(1))
    retrain_steps: int = setting(7500, "warm-started leave-one-out steps (paper: 7,500)", at_least(1))
    test_fraction: float = setting(
        0.2, "share of Iris held out as test points (paper: split not stated)", fraction(high=0.5, high_open=True)
    )
    split_seed: int = setting(0, "seed of the stratified train/test split", at_least(0))
    test_point: str = setting(
        "per_model",
        "which held-out point a model is measured on: per_model (its own highest-loss point, as the paper describes) "
        "or fixed (the point with the highest loss averaged over all models of the architecture)",
        one_of(TEST_POINTS),
    )
    selection_fraction: float = setting(0.166, "share of training points evaluated (paper: 16.6 %)", fraction())
    selection_by: str = setting(
        "abs", "ranking for the selection: abs = |predicted influence| (paper: unconfirmed)", one_of(SELECTION_SCORES)
    )
    chunk_size: int = setting(128, "models per retraining stack (memory and time: the numbers agree to rounding)", at_least(1))


def split_iris(cfg: IrisConfig) -> tuple[Dataset, Dataset]:
    """Stratified train/test split of the standardised Iris data (seeded by ``split_seed``)."""
    return iris_split(cfg.test_fraction, cfg.split_seed)


@record
@dataclass(frozen=True)
class LeaveOneOut:
    """Warm-started leave-one-out retraining of some of one run's training points, with the drift control.

    Attributes:
        removed: (m,) the retrained training indices, in retraining order.
        actual: (m,) change of the test loss against θ* when each point is removed.
        actual_vs_control: (m,) the same change against the control run (the same steps, nothing removed).
        drift: control − θ* on the test loss: what continued training alone does to it.
        param_change: (m,) ‖θ₋ᵢ − θ*‖ of each retrained model.
        control_grad_norm: the control's final full-batch gradient norm.
    """

    removed: np.ndarray
    actual: np.ndarray
    actual_vs_control: np.ndarray
    drift: float
    param_change: np.ndarray
    control_grad_norm: float

    @classmethod
    def of(cls, result: LOOResult) -> LeaveOneOut:
        """The retraining of one model on its one test point."""
        return cls(
            removed=result.removed.numpy(),
            actual=result.actual[:, 0].numpy(),
            actual_vs_control=result.actual_vs_control[:, 0].numpy(),
            drift=float(result.drift[0]),
            param_change=result.param_change.numpy(),
            control_grad_norm=result.control_grad_norm,
        )

    def of_points(self, indices: np.ndarray) -> LeaveOneOut:
        """The same retraining restricted to ``indices`` (each of which was retrained), in their order."""
        where = {int(i): j for j, i in enumerate(self.removed)}
        missing = [int(i) for i in indices if int(i) not in where]
        if missing:
            raise InvalidArgumentError(f"training points {missing[:5]} were not retrained")
        pos = np.array([where[int(i)] for i in indices], dtype=np.int64)
        return LeaveOneOut(
            self.removed[pos],
            self.actual[pos],
            self.actual_vs_control[pos],
            self.drift,
            self.param_change[pos],
            self.control_grad_norm,
        )


# What the headline reports of each run (:meth:`IrisRun.statistics`).
HEADLINE_STATS = ("spearman", "pearson", "sign_agreement", "sign_agreement_vs_control", "drift_to_signal")


@record
@dataclass(frozen=True)
class IrisRun:
    """One seed and weight decay of an architecture: exact influence on the highest-loss test point, checked by
    retraining the chosen training points.

    Attributes:
        seed, weight_decay: which model of the architecture's stack.
        damping: λ added to the Hessian.
        test_index: the held-out point the run is measured on (``test_point``); ``test_loss`` is its loss at θ*.
        train_loss: the final mean training loss of gradient descent.
        train_accuracy: the share of training points classified correctly at θ*.
        prediction_spread: the largest, over classes, standard deviation of the predicted probability across the
            training inputs (0 for a constant predictor).
        loss_rise: how far the training loss rose at the end (:func:`~fragile.core.convergence.loss_rise`).
        grad_norm: ‖∇‖ of the training objective at θ*.
        lambda_min, num_negative: the smallest Hessian eigenvalue at θ* and the count of negative ones (the
            largest is the estimate's ``lambda_max``).
        lr_times_lambda_max: lr·λmax: gradient descent stops converging near 2.
        estimate: exact influence of every training point on the test point (``predicted`` is (1, n)).
        chosen: the k evaluated training indices, by ``selection_by``, most influential first.
        random: k training indices drawn at random (seeded by the seed), where every training point was retrained
            (the headline network); empty elsewhere.
        predicted_param_change: (k,) ‖(1/n)(H+λI)⁻¹∇L(zᵢ)‖ of each chosen point.
        loo: the retrained ground truth: the chosen points, or every training point for the headline network.
    """

    failed: ClassVar[bool] = False

    seed: int
    weight_decay: float
    damping: float
    test_index: int
    test_loss: float
    train_loss: float
    train_accuracy: float
    prediction_spread: float
    loss_rise: float
    grad_norm: float
    lambda_min: float
    num_negative: int
    lr_times_lambda_max: float
    estimate: Estimate
    chosen: np.ndarray
    random: np.ndarray
    predicted_param_change: np.ndarray
    loo: LeaveOneOut

    @property
    def lambda_max(self) -> float:
        """The largest Hessian eigenvalue at θ* (the exact estimator always learns it)."""
        return float(self.estimate.lambda_max)

    @property
    def residual(self) -> float:
        """Relative residual of the inverse-HVP solve."""
        return float(self.estimate.residuals.max())

    @property
    def predicted_all(self) -> np.ndarray:
        """(n,) predicted change of the test loss when each training point is removed."""
        return self.estimate.predicted[0]

    @property
    def predicted(self) -> np.ndarray:
        """(k,) the predicted changes of the chosen points."""
        return self.predicted_all[self.chosen]

    @property
    def chosen_loo(self) -> LeaveOneOut:
        """The retraining of the chosen points, in their order."""
        return self.loo.of_points(self.chosen)

    @property
    def agreement(self) -> Agreement:
        """Predicted against actual (against θ*) changes of the chosen points."""
        return agreement(self.predicted, self.chosen_loo.actual)

    def agreement_over(self, which: str) -> Agreement | None:
        """Predicted against actual changes over the ``chosen`` points, ``random`` points or ``all`` training points;
        None where those points were not retrained."""
        if which == "chosen":
            return self.agreement
        idx = self.random if which == "random" else self.loo.removed
        if (which == "all" and idx.size != self.predicted_all.size) or idx.size == 0:
            return None
        return agreement(self.predicted_all[idx], self.loo.of_points(idx).actual)

    def convergence(self, criteria: ConvergenceCriteria, majority: float) -> Convergence:
        """This model's convergence class (:mod:`fragile.core.convergence`), ``majority`` the training set's largest
        class share."""
        return classify_convergence(
            grad_norm=self.grad_norm,
            train_accuracy=self.train_accuracy,
            majority_share=majority,
            prediction_spread=self.prediction_spread,
            lr_times_lambda_max=self.lr_times_lambda_max,
            full_batch_gd=True,
            loss_rise=self.loss_rise,
            criteria=criteria,
        )

    # What the drift control changes. For one test point the control's drift shifts every actual change by the same
    # amount, so rank and linear correlations are unchanged by it; signs and magnitudes are not.

    @property
    def sign_agreement(self) -> float:
        """Share of chosen points whose predicted and actual (against θ*) changes have the same sign."""
        return float(np.mean(np.sign(self.predicted) == np.sign(self.chosen_loo.actual)))

    @property
    def sign_agreement_vs_control(self) -> float:
        """The same share with the actual change measured against the control."""
        return float(np.mean(np.sign(self.predicted) == np.sign(self.chosen_loo.actual_vs_control)))

    @property
    def drift_to_signal(self) -> float:
        """``|drift| / median |actual − drift|``: above 1, continued training alone moves the test loss more than
        removing a typical chosen point does."""
        signal = float(np.median(np.abs(self.chosen_loo.actual_vs_control)))
        return abs(self.loo.drift) / signal if signal > 0 else math.inf

    def statistics(self) -> dict[str, float]:
        """What the headline reports of this run, by the names of :data:`HEADLINE_STATS`."""
        a = self.agreement
        values = (a.spearman, a.pearson, self.sign_agreement, self.sign_agreement_vs_control, self.drift_to_signal)
        return dict(zip(HEADLINE_STATS, values, strict=True))


@record
@dataclass(frozen=True)
class FailedRun:
    """A seed and weight decay whose damped Hessian was singular: no estimate, nothing retrained.

    Attributes:
        seed, weight_decay: which model of the architecture's stack.
        failure: the exact estimator's failure, with why.
    """

    failed: ClassVar[bool] = True

    seed: int
    weight_decay: float
    failure: EstimatorFailure


@record
@dataclass(frozen=True)
class ArchitectureResult:
    """One architecture's job: every seed with and without weight decay.

    Attributes:
        depth, width: hidden layers and units per hidden layer.
        num_params: p, the length of θ.
        k: training points evaluated per run.
        n_train: training points.
        majority_share: the share of the training set's most common class (what a constant predictor scores).
        runs: one per seed with weight decay, then one per seed without, in seed order.
    """

    depth: int
    width: int
    num_params: int
    k: int
    n_train: int
    majority_share: float
    runs: tuple[IrisRun | FailedRun, ...]

    def finished(self, with_weight_decay: bool) -> tuple[IrisRun, ...]:
        """The runs with (or without) weight decay that did not fail, in seed order."""
        return tuple(r for r in self.runs if not r.failed and (r.weight_decay > 0) == with_weight_decay)

    @property
    def failures(self) -> tuple[FailedRun, ...]:
        return tuple(r for r in self.runs if r.failed)


def run_architecture(
    cfg: IrisConfig, depth: int, width: int, *, every_point: bool = False, progress: bool = True
) -> ArchitectureResult:
    """All seeds, with and without weight decay, for one architecture.

    Cost: one stack of ``2·n_seeds`` models for ``train_steps`` steps, ``2·n_seeds`` exact Hessians
    (p ≤ a few hundred), and one leave-one-out stack of ``2·n_seeds·(k+1)`` models for ``retrain_steps``; with
    ``every_point`` (the headline network) ``2·n_seeds·(n+1)``: every training point is retrained, so the chosen
    points' correlation can be set beside random points' and all points'.
    """
    train, test = split_iris(cfg)
    n = len(train)
    k = max(3, int(round(cfg.selection_fraction * n)))
    wds = [cfg.weight_decay] * cfg.n_seeds + [0.0] * cfg.n_seeds
    seeds = cfg.seeds * 2
    models = [
        build_model(
            "mlp", seed=s, in_features=4, num_classes=3, depth=depth, width=width, activation=cfg.activation, init=cfg.init
        )
        for s in seeds
    ]
    base = Objective(models[0], 0.0)
    theta0 = torch.stack([Objective(m).initial_params() for m in models])
    wd_t = torch.tensor(wds, dtype=theta0.dtype)
    spec = TrainSpec("gd", lr=cfg.lr, steps=cfg.train_steps)
    trained = fit(base, theta0, train.x, train.y, spec, weight_decay=wd_t, progress=progress, desc=f"train d={depth} w={width}")
    with torch.no_grad():
        test_losses = torch.stack([base.sample_losses(theta, test.x, test.y) for theta in trained.params])
    fixed = int(test_losses.mean(dim=0).argmax())  # the held-out point the architecture's models do worst on

    # A finished run waits for its retraining, which all runs share as one stack.
    pending: list[FailedRun | partial[IrisRun]] = []
    tasks: list[LOOTask] = []
    for r, (seed, wd) in enumerate(zip(seeds, wds)):
        theta = trained.params[r]
        objective = base.with_weight_decay(wd)
        t = int(test_losses[r].argmax()) if cfg.test_point == "per_model" else fixed
        damping = cfg.damping_with_wd if wd > 0 else cfg.damping_without_wd
        est = make_estimator(
            "exact", objective, theta, train.x, train.y, damping=damping, negative=cfg.negative_eigenvalues, progress=False
        )
        try:
            res = est.influences(test.x[t : t + 1], test.y[t : t + 1])
        except InvalidArgumentError as exc:  # singular H + λI: reported as a failed run, not hidden
            log.warning("depth %d width %d seed %d wd %g: %s", depth, width, seed, wd, exc)
            pending.append(FailedRun(seed, wd, EstimatorFailure("exact", str(exc))))
            continue
        predicted = res.predicted[0]
        chosen = select_top_k(predicted.numpy(), k, by=cfg.selection_by)
        random = np.sort(np.random.default_rng(seed).choice(n, k, replace=False)) if every_point else np.empty(0, np.int64)
        dtheta = est.predicted_param_changes(torch.as_tensor(chosen))
        spectrum = est.spectrum
        with torch.no_grad():
            logits = objective.logits(theta, train.x)
        pending.append(
            partial(
                IrisRun,
                seed=seed,
                weight_decay=wd,
                damping=damping,
                test_index=t,
                test_loss=float(test_losses[r, t]),
                train_loss=float(trained.losses[-1, r]),
                train_accuracy=float((logits.argmax(dim=1) == train.y).double().mean()),
                prediction_spread=prediction_spread(logits.numpy()),
                loss_rise=loss_rise(trained.losses[:, r].numpy()),
                grad_norm=float(trained.grad_norm[r]),
                lambda_min=spectrum.smallest,
                num_negative=spectrum.num_negative,
                lr_times_lambda_max=cfg.lr * spectrum.largest,
                estimate=Estimate(
                    "exact", res.predicted.numpy(), res.residuals.numpy(), res.seconds, lambda_max=spectrum.largest
                ),
                chosen=chosen,
                random=random,
                predicted_param_change=dtheta.norm(dim=1).numpy(),
            )
        )
        retrained = torch.arange(n) if every_point else torch.as_tensor(chosen)
        tasks.append(LOOTask(theta, retrained, test.x[t : t + 1], test.y[t : t + 1], weight_decay=wd))

    # Leave-one-out retraining continues the same gradient descent from θ*.
    retrain = spec.replace(steps=cfg.retrain_steps)
    done = iter(loo_retrain_many(base, tasks, train.x, train.y, retrain, chunk_size=cfg.chunk_size, progress=progress))
    runs = tuple(run if isinstance(run, FailedRun) else run(loo=LeaveOneOut.of(next(done))) for run in pending)
    return ArchitectureResult(
        depth=depth,
        width=width,
        num_params=base.num_params,
        k=k,
        n_train=n,
        majority_share=majority_share(train.y.numpy()),
        runs=runs,
    )


def architecture_job(depth: int, width: int, every_point: bool, **fields: Any) -> ArchitectureResult:
    """One sweep job: :func:`run_architecture` for the config that :func:`architecture_jobs` keyed it by."""
    return run_architecture(IrisConfig(**fields), depth, width, every_point=every_point, progress=False)


def architectures(cfg: IrisConfig) -> list[tuple[int, int]]:
    """(depth, width) of every network: the headline network, the depth sweep and the width sweep."""
    archs = [(d, cfg.headline_width) for d in cfg.depths] + [(1, w) for w in cfg.widths if w != cfg.headline_width]
    if (1, cfg.headline_width) not in archs:
        archs.insert(0, (1, cfg.headline_width))
    return archs


def architecture_jobs(cfg: IrisConfig) -> list[Job]:
    """The study as sweep jobs, one per architecture, each keyed by everything its numbers depend on.

    The cost hint is a fit to the run times of the ``default`` grid on one core (seconds: about 40 +
    27 per layer + 3 per hidden unit of width), used only to start the long jobs first.
    """
    fields = job_fields(cfg, exclude=("depths", "widths", "headline_width"))
    headline = (1, cfg.headline_width)
    return [
        Job(
            f"iris/d{d}-w{w}",
            architecture_job,
            {"depth": d, "width": w, "every_point": (d, w) == headline, **fields},
            cost=40 + 27 * d + 3 * w + (60 if (d, w) == headline else 0),
        )
        for d, w in architectures(cfg)
    ]


def run_study(cfg: IrisConfig, *, progress: bool = True, client=None) -> tuple[list[ArchitectureResult], SweepReport]:
    """Every architecture, through the sweep layer on ``cfg.scheduler`` (or ``client``).

    Returns the finished architectures in :func:`architectures` order and the sweep's report (done,
    cached, failed with traceback). A failed architecture is left out of the groups, never hidden:
    the report names it.
    """
    return run_jobs(cfg, architecture_jobs(cfg), progress=progress, client=client)


def architecture(groups: Sequence[ArchitectureResult], depth: int, width: int) -> ArchitectureResult:
    """The finished architecture of ``depth`` hidden layers of ``width`` units."""
    return next(g for g in groups if g.depth == depth and g.width == width)


# A finished run's own values in the runs table, in column order (its leave-one-out and statistics follow).
RUN_COLUMNS = (
    "damping",
    "test_index",
    "test_loss",
    "train_loss",
    "grad_norm",
    "lambda_max",
    "lambda_min",
    "num_negative",
    "lr_times_lambda_max",
    "residual",
    "train_accuracy",
    "prediction_spread",
    "loss_rise",
)


def runs_table(groups: Sequence[ArchitectureResult], criteria: ConvergenceCriteria):
    """One row per (architecture, weight decay, seed) with the scalar results and the convergence class by
    ``criteria``, as a pandas DataFrame; a failed run's row says why in ``failed`` and has no numbers."""
    import pandas as pd

    rows = []
    for g in groups:
        for r in g.runs:
            row: dict[str, Any] = {
                "depth": g.depth,
                "width": g.width,
                "num_params": g.num_params,
                "seed": r.seed,
                "weight_decay": r.weight_decay,
            }
            if isinstance(r, FailedRun):
                row["failed"] = r.failure.message
                row["convergence"] = "estimator failed"
            else:
                conv = r.convergence(criteria, g.majority_share)
                row.update(
                    **{column: getattr(r, column) for column in RUN_COLUMNS},
                    drift=r.loo.drift,
                    control_grad_norm=r.loo.control_grad_norm,
                    **r.statistics(),
                    convergence=str(conv.kind),
                    convergence_reason=conv.reason,
                )
            row["wd"] = "with weight decay" if r.weight_decay > 0 else "without weight decay"
            rows.append(row)
    return pd.DataFrame(rows)


def seed_summary(values) -> dict[str, Any]:
    """Mean, std and values over seeds (NaN-aware), as a plain dict for JSON and glue."""
    return aggregate_over_seeds(list(values)).as_dict()


def headline(groups: Sequence[ArchitectureResult], width: int, criteria: ConvergenceCriteria) -> dict[str, Any]:
    """Each of :data:`HEADLINE_STATS` of the depth-1 network at ``width`` with and without weight decay: the first
    seed's value (the paper reports one run), the spread over all finished seeds, and the mean with its 95 % interval
    over the converged seeds, as a plain dict for JSON and glue."""
    g = architecture(groups, 1, width)
    out = {}
    for label, with_wd in (("with_wd", True), ("without_wd", False)):
        runs = g.finished(with_wd)
        stats = [r.statistics() for r in runs]
        good = [st for r, st in zip(runs, stats) if r.convergence(criteria, g.majority_share).converged]
        out[label] = {}
        for stat in HEADLINE_STATS:
            values = [st[stat] for st in good if math.isfinite(st[stat])]
            mean, low, high = mean_interval(values) if values else (math.nan,) * 3
            out[label][stat] = {
                "first_seed": stats[0][stat] if stats else math.nan,
                **seed_summary(st[stat] for st in stats),
                "converged_mean": mean,
                "converged_low": low,
                "converged_high": high,
                "converged_n": len(values),
            }
    return out


SELECTIONS = {"chosen": "top k by |predicted|", "random": "k at random", "all": "every training point"}


def selection_table(groups: Sequence[ArchitectureResult], width: int, criteria: ConvergenceCriteria):
    """The headline network's Spearman over the chosen points, k random points and every training point, per weight
    decay: mean and 95 % interval (Fisher z) over the converged seeds, as a pandas DataFrame."""
    import pandas as pd

    g = architecture(groups, 1, width)
    rows = []
    for with_wd in (True, False):
        runs = [r for r in g.finished(with_wd) if r.convergence(criteria, g.majority_share).converged]
        for which, label in SELECTIONS.items():
            values = [a.spearman for r in runs if (a := r.agreement_over(which)) is not None and math.isfinite(a.spearman)]
            mean, low, high = mean_interval(values, fisher=True) if values else (math.nan,) * 3
            rows.append(
                {
                    "weight decay": "with" if with_wd else "without",
                    "training points": label,
                    "Spearman": mean,
                    "95 % interval": f"[{low:.2f}, {high:.2f}]" if math.isfinite(low) else "—",
                    "n (converged seeds)": len(values),
                }
            )
    return pd.DataFrame(rows)


# The paper's Iris numbers (docs/protocol.md#iris: from a third-party reading note [note], not yet checked
# against the PDF). Only the headline network has numbers; the sweeps are qualitative claims.
PAPER_HEADLINE = {"with_wd": 0.97, "without_wd": 0.508}
PAPER_SOURCE = "Figure 1 (from a reading note; not yet checked against the PDF)"

# The rules, fixed before any result is looked at (the chapter states them before its verdicts).
HEADLINE_RULES = {key: MatchesPaper(paper=value, tolerance=0.1, fisher=True) for key, value in PAPER_HEADLINE.items()}
WEIGHT_DECAY_RULE = PairedDifference(direction="positive", tolerance=0.1)
TREND_RULE = Trend(direction="negative", unit="model")


def rules_markdown() -> str:
    """The chapter's rules in words, before its results."""
    return "\n".join(
        [
            f"- **headline Spearman** (each weight decay): {HEADLINE_RULES['with_wd'].statement()}; a seed is a unit;",
            f"- **weight decay helps** (each seed's Spearman with minus without): {WEIGHT_DECAY_RULE.statement()};",
            "- **drops with depth**, **drops with width**, **larger λmax goes with worse estimates** (one converged model "
            f"with weight decay is a unit; the covariate is its depth, width or λmax): {TREND_RULE.statement()}.",
        ]
    )


def _claim(key: str, claim: str, paper: str, rule: Rule, data: DataUsed, converged: tuple, every: tuple, why: str) -> Claim:
    count = f"{len(converged[0])} of {len(every[0])} models converged"
    return Claim.on_converged(key, claim, paper, rule, converged, every, data=data, count=count, why=why, source=PAPER_SOURCE)


def claims(groups: Sequence[ArchitectureResult], cfg: IrisConfig) -> list[Claim]:
    """The paper's Iris claims, each decided by its rule (:func:`rules_markdown`) on the converged models, with the
    all-models value and the count of converged models beside it."""
    table = runs_table(groups, cfg.criteria)
    train, _ = split_iris(cfg)
    data = DataUsed("Iris", len(train), len(train))
    finite = table[table["spearman"].notna()] if "spearman" in table else table
    converged = finite["convergence"] == str(ConvergenceClass.CONVERGED)
    out = []
    head = (finite["depth"] == 1) & (finite["width"] == cfg.headline_width)
    for key, label in (("with_wd", "with weight decay"), ("without_wd", "without weight decay")):
        arm = head & ((finite["weight_decay"] > 0) == (key == "with_wd"))
        good = finite[arm & converged]["spearman"]
        why = "" if len(good) else f"none of {int(arm.sum())} models converged"
        claim = f"Depth-1, width-{cfg.headline_width} network {label}: Spearman"
        rule = HEADLINE_RULES[key]
        out.append(
            _claim(f"headline_{key}", claim, f"{PAPER_HEADLINE[key]:g}", rule, data, (good,), (finite[arm]["spearman"],), why)
        )
    pairs = _seed_pairs(finite[head])
    good_pairs = pairs[pairs["converged_with"] & pairs["converged_without"]]
    why = "" if len(good_pairs) else f"none of {len(pairs)} seeds converged both with and without weight decay"
    out.append(
        _claim(
            "wd_helps",
            "Weight decay raises the headline Spearman (each seed with minus without)",
            f"{PAPER_HEADLINE['with_wd']:g} vs {PAPER_HEADLINE['without_wd']:g}",
            WEIGHT_DECAY_RULE,
            data,
            (good_pairs["with"], good_pairs["without"]),
            (pairs["with"], pairs["without"]),
            why,
        )
    )
    with_wd = finite["weight_decay"] > 0
    sweeps = (
        ("depth_drop", f"Spearman drops with depth (with weight decay, width {cfg.headline_width})", "depth", "width"),
        ("width_drop", "Spearman drops as width grows (with weight decay, one hidden layer)", "width", "depth"),
        (
            "curvature",
            "A larger top Hessian eigenvalue goes with worse estimates (with weight decay, the depth sweep)",
            "lambda_max",
            "width",
        ),
    )
    for key, claim, covariate, fixed in sweeps:  # fixed: what the sweep holds constant
        # the depth sweep at the headline width; the width sweep is the declared widths at depth 1
        sweep = with_wd & (
            (finite["width"] == cfg.headline_width)
            if fixed == "width"
            else (finite["depth"] == 1) & finite["width"].isin(cfg.widths)
        )
        every, good = finite[sweep], finite[sweep & converged]
        values = good[covariate].nunique()
        why = (
            ""
            if len(good) >= 3 and values >= 2
            else f"{plural(len(good), 'converged model')} over {plural(values, covariate + ' value')}"
        )
        units = (good[covariate], good["spearman"]), (every[covariate], every["spearman"])
        out.append(_claim(key, claim, "qualitative", TREND_RULE, data, *units, why))
    return out


def _seed_pairs(rows):
    """One row per seed that finished with both weight decays: each arm's Spearman and whether that model converged."""
    import pandas as pd

    rows = rows.assign(converged=rows["convergence"] == str(ConvergenceClass.CONVERGED))
    arms = {}
    for name, with_wd in (("with", True), ("without", False)):
        arm = rows[(rows["weight_decay"] > 0) == with_wd].set_index("seed")
        arms[name] = arm["spearman"]
        arms[f"converged_{name}"] = arm["converged"]
    pairs = pd.DataFrame(arms).dropna(subset=["with", "without"])
    return pairs.astype({"converged_with": bool, "converged_without": bool})


CHAPTER = Chapter(
    name="iris", number=1, part=PAPER_PART, config=IrisConfig, glue_prefix="iris", jobs=architecture_jobs, run=run_study
)
