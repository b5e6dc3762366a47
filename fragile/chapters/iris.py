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
from fragile.book.claims import Claim, number
from fragile.chapters.protocol import agreement, iris_split, job_fields, run_jobs
from fragile.chapters.results import Agreement, Estimate, EstimatorFailure
from fragile.config import at_least, between, each, fraction, non_negative, one_of, positive, setting
from fragile.core.ground_truth import LOOResult, LOOTask, loo_retrain_many
from fragile.core.metrics import aggregate_over_seeds, correlation
from fragile.core.objective import Objective
from fragile.core.selection import SELECTION_SCORES, select_top_k
from fragile.core.train import TrainSpec, fit
from fragile.data.datasets import Dataset
from fragile.errors import InvalidArgumentError
from fragile.estimators import NEGATIVE_POLICIES, make_estimator
from fragile.models.small import ACTIVATIONS, build_model
from fragile.run.payload import record
from fragile.run.sweep import Job, SweepReport

log = logging.getLogger(__name__)

MAX_DEPTH = 12
MAX_WIDTH = 200


@dataclass(frozen=True)
class IrisConfig(ChapterConfig):
    """Every value the Iris section depends on, each with its help text (``fragile params iris`` lists them), besides
    the common fields of :class:`~fragile.book.chapter.ChapterConfig` (``device`` is the CPU only here: the models
    are tiny). Values the paper does not state are marked so."""

    n_seeds: int = setting(10, "seeds per configuration (the paper reports single runs)", at_least(1))
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
    weight_decay: float = setting(0.001, 'L2 coefficient of the "with weight decay" runs (paper: not stated for Iris)', positive)
    damping_with_wd: float = setting(0.0, "damping λ with weight decay (paper: none)", non_negative)
    damping_without_wd: float = setting(0.001, "damping λ without weight decay (paper: 0.001)", non_negative)
    negative_eigenvalues: str = setting(
        "keep", "policy for negative Hessian eigenvalues (paper: damping only, i.e. keep)", one_of(NEGATIVE_POLICIES)
    )
    lr: float = setting(0.3, "gradient-descent learning rate (paper: not stated)", positive)
    train_steps: int = setting(60000, "full-batch GD steps to θ* (paper: 60,000)", at_least(1))
    retrain_steps: int = setting(7500, "warm-started leave-one-out steps (paper: 7,500)", at_least(1))
    test_fraction: float = setting(
        0.2, "share of Iris held out as test points (paper: split not stated)", fraction(high=0.5, high_open=True)
    )
    split_seed: int = setting(0, "seed of the stratified train/test split", at_least(0))
    selection_fraction: float = setting(0.166, "share of training points evaluated (paper: 16.6 %)", fraction())
    selection_by: str = setting(
        "abs", "ranking for the selection: abs = |predicted influence| (paper: unconfirmed)", one_of(SELECTION_SCORES)
    )
    chunk_size: int = setting(512, "models per retraining stack (memory, not numbers)", at_least(1))


def split_iris(cfg: IrisConfig) -> tuple[Dataset, Dataset]:
    """Stratified train/test split of the standardised Iris data (seeded by ``split_seed``)."""
    return iris_split(cfg.test_fraction, cfg.split_seed)


@record
@dataclass(frozen=True)
class LeaveOneOut:
    """Warm-started leave-one-out retraining of one run's chosen training points, with the drift control.

    Attributes:
        actual: (k,) change of the test loss against θ* when each chosen point is removed.
        actual_vs_control: (k,) the same change against the control run (the same steps, nothing removed).
        drift: control − θ* on the test loss: what continued training alone does to it.
        param_change: (k,) ‖θ₋ᵢ − θ*‖ of each retrained model.
        control_grad_norm: the control's final full-batch gradient norm.
    """

    actual: np.ndarray
    actual_vs_control: np.ndarray
    drift: float
    param_change: np.ndarray
    control_grad_norm: float

    @classmethod
    def of(cls, result: LOOResult) -> LeaveOneOut:
        """The retraining of one model on its one test point."""
        return cls(
            actual=result.actual[:, 0].numpy(),
            actual_vs_control=result.actual_vs_control[:, 0].numpy(),
            drift=float(result.drift[0]),
            param_change=result.param_change.numpy(),
            control_grad_norm=result.control_grad_norm,
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
        test_index: the held-out point with the highest loss at θ*; ``test_loss`` is that loss.
        train_loss: the final mean training loss of gradient descent.
        grad_norm: ‖∇‖ of the training objective at θ*.
        lambda_min, num_negative: the smallest Hessian eigenvalue at θ* and the count of negative ones (the
            largest is the estimate's ``lambda_max``).
        lr_times_lambda_max: lr·λmax: gradient descent stops converging near 2.
        estimate: exact influence of every training point on the test point (``predicted`` is (1, n)).
        chosen: the k evaluated training indices, by ``selection_by``, most influential first.
        predicted_param_change: (k,) ‖(1/n)(H+λI)⁻¹∇L(zᵢ)‖ of each chosen point.
        loo: the retrained ground truth of the chosen points.
    """

    failed: ClassVar[bool] = False

    seed: int
    weight_decay: float
    damping: float
    test_index: int
    test_loss: float
    train_loss: float
    grad_norm: float
    lambda_min: float
    num_negative: int
    lr_times_lambda_max: float
    estimate: Estimate
    chosen: np.ndarray
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
    def agreement(self) -> Agreement:
        """Predicted against actual (against θ*) changes of the chosen points."""
        return agreement(self.predicted, self.loo.actual)

    # What the drift control changes. For one test point the control's drift shifts every actual change by the same
    # amount, so rank and linear correlations are unchanged by it; signs and magnitudes are not.

    @property
    def sign_agreement(self) -> float:
        """Share of chosen points whose predicted and actual (against θ*) changes have the same sign."""
        return float(np.mean(np.sign(self.predicted) == np.sign(self.loo.actual)))

    @property
    def sign_agreement_vs_control(self) -> float:
        """The same share with the actual change measured against the control."""
        return float(np.mean(np.sign(self.predicted) == np.sign(self.loo.actual_vs_control)))

    @property
    def drift_to_signal(self) -> float:
        """``|drift| / median |actual − drift|``: above 1, continued training alone moves the test loss more than
        removing a typical chosen point does."""
        signal = float(np.median(np.abs(self.loo.actual_vs_control)))
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
        runs: one per seed with weight decay, then one per seed without, in seed order.
    """

    depth: int
    width: int
    num_params: int
    k: int
    n_train: int
    runs: tuple[IrisRun | FailedRun, ...]

    def finished(self, with_weight_decay: bool) -> tuple[IrisRun, ...]:
        """The runs with (or without) weight decay that did not fail, in seed order."""
        return tuple(r for r in self.runs if not r.failed and (r.weight_decay > 0) == with_weight_decay)

    @property
    def failures(self) -> tuple[FailedRun, ...]:
        return tuple(r for r in self.runs if r.failed)


def run_architecture(cfg: IrisConfig, depth: int, width: int, *, progress: bool = True) -> ArchitectureResult:
    """All seeds, with and without weight decay, for one architecture.

    Cost: one stack of ``2·n_seeds`` models for ``train_steps`` steps, ``2·n_seeds`` exact Hessians
    (p ≤ a few hundred), and one leave-one-out stack of ``2·n_seeds·(k+1)`` models for ``retrain_steps``.
    """
    train, test = split_iris(cfg)
    n = len(train)
    k = max(3, int(round(cfg.selection_fraction * n)))
    wds = [cfg.weight_decay] * cfg.n_seeds + [0.0] * cfg.n_seeds
    seeds = cfg.seeds * 2
    models = [
        build_model("mlp", seed=s, in_features=4, num_classes=3, depth=depth, width=width, activation=cfg.activation)
        for s in seeds
    ]
    base = Objective(models[0], 0.0)
    theta0 = torch.stack([Objective(m).initial_params() for m in models])
    wd_t = torch.tensor(wds, dtype=theta0.dtype)
    spec = TrainSpec("gd", lr=cfg.lr, steps=cfg.train_steps)
    trained = fit(base, theta0, train.x, train.y, spec, weight_decay=wd_t, progress=progress, desc=f"train d={depth} w={width}")

    # A finished run waits for its retraining, which all runs share as one stack.
    pending: list[FailedRun | partial[IrisRun]] = []
    tasks: list[LOOTask] = []
    for r, (seed, wd) in enumerate(zip(seeds, wds)):
        theta = trained.params[r]
        objective = base.with_weight_decay(wd)
        test_losses = objective.sample_losses(theta, test.x, test.y)
        t = int(test_losses.argmax())
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
        dtheta = est.predicted_param_changes(torch.as_tensor(chosen))
        spectrum = est.spectrum
        pending.append(
            partial(
                IrisRun,
                seed=seed,
                weight_decay=wd,
                damping=damping,
                test_index=t,
                test_loss=float(test_losses[t]),
                train_loss=float(trained.losses[-1, r]),
                grad_norm=float(trained.grad_norm[r]),
                lambda_min=spectrum.smallest,
                num_negative=spectrum.num_negative,
                lr_times_lambda_max=cfg.lr * spectrum.largest,
                estimate=Estimate(
                    "exact", res.predicted.numpy(), res.residuals.numpy(), res.seconds, lambda_max=spectrum.largest
                ),
                chosen=chosen,
                predicted_param_change=dtheta.norm(dim=1).numpy(),
            )
        )
        tasks.append(LOOTask(theta, torch.as_tensor(chosen), test.x[t : t + 1], test.y[t : t + 1], weight_decay=wd))

    # Leave-one-out retraining continues the same gradient descent from θ*.
    retrain = spec.replace(steps=cfg.retrain_steps)
    done = iter(loo_retrain_many(base, tasks, train.x, train.y, retrain, chunk_size=cfg.chunk_size, progress=progress))
    runs = tuple(run if isinstance(run, FailedRun) else run(loo=LeaveOneOut.of(next(done))) for run in pending)
    return ArchitectureResult(depth=depth, width=width, num_params=base.num_params, k=k, n_train=n, runs=runs)


def architecture_job(depth: int, width: int, **fields: Any) -> ArchitectureResult:
    """One sweep job: :func:`run_architecture` for the config that :func:`architecture_jobs` keyed it by."""
    return run_architecture(IrisConfig(**fields), depth, width, progress=False)


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
    return [
        Job(f"iris/d{d}-w{w}", architecture_job, {"depth": d, "width": w, **fields}, cost=40 + 27 * d + 3 * w)
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
)


def runs_table(groups: Sequence[ArchitectureResult]):
    """One row per (architecture, weight decay, seed) with the scalar results, as a pandas DataFrame; a failed run's
    row says why in ``failed`` and has no numbers."""
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
            else:
                row.update(
                    **{column: getattr(r, column) for column in RUN_COLUMNS},
                    drift=r.loo.drift,
                    control_grad_norm=r.loo.control_grad_norm,
                    **r.statistics(),
                )
            row["wd"] = "with weight decay" if r.weight_decay > 0 else "without weight decay"
            rows.append(row)
    return pd.DataFrame(rows)


def seed_summary(values) -> dict[str, Any]:
    """Mean, std and values over seeds (NaN-aware), as a plain dict for JSON and glue."""
    return aggregate_over_seeds(list(values)).as_dict()


def headline(groups: Sequence[ArchitectureResult], width: int) -> dict[str, Any]:
    """Spearman/Pearson of the depth-1 network at ``width`` with and without weight decay: the first seed's
    value (the paper reports one run) and the spread over all seeds, as a plain dict for JSON and glue."""
    g = architecture(groups, 1, width)
    out = {}
    for label, with_wd in (("with_wd", True), ("without_wd", False)):
        stats = [r.statistics() for r in g.finished(with_wd)]
        out[label] = {
            stat: {"first_seed": stats[0][stat] if stats else math.nan, **seed_summary(s[stat] for s in stats)}
            for stat in HEADLINE_STATS
        }
    return out


# The paper's Iris numbers (docs/protocol.md#iris: from a third-party reading note [note], not yet checked
# against the PDF). Only the headline network has numbers; the sweeps are qualitative claims.
PAPER_HEADLINE = {"with_wd": 0.97, "without_wd": 0.508}


def _verdict(ok: bool, partly: bool) -> str:
    return "reproduced" if ok else ("partly reproduced" if partly else "not reproduced")


def claims(groups: Sequence[ArchitectureResult], headline_width: int, widths: tuple[int, ...]) -> list[Claim]:
    """The paper's Iris claims, our number beside theirs, and a verdict by a stated rule.

    Rules (stated in the chapter): a number is *reproduced* when our mean over seeds is within 0.1
    of the paper's, *partly* within 0.25; a direction ("drops", "helps") is *reproduced* when the
    difference of means exceeds 0.1 in the paper's direction, *partly* when it has the paper's sign; the
    curvature claim is *reproduced* when the rank correlation of λmax with the mean Spearman over depths
    is ≤ −0.5, *partly* when ≤ −0.2.
    """
    table = runs_table(groups)
    ok = table[table["spearman"].notna()] if "spearman" in table else table
    head = headline(groups, headline_width)
    out = []
    for key, label in (("with_wd", "with weight decay"), ("without_wd", "without weight decay")):
        ours = head[key]["spearman"]["mean"]
        diff = abs(ours - PAPER_HEADLINE[key]) if math.isfinite(ours) else math.inf
        out.append(
            Claim(
                key=f"headline_{key}",
                claim=f"Depth-1, width-{headline_width} network {label}: Spearman",
                paper=number(PAPER_HEADLINE[key]),
                ours=number(ours, spread=head[key]["spearman"]["std"]),
                verdict=_verdict(diff <= 0.1, diff <= 0.25),
                value=ours,
            )
        )
    gap = head["with_wd"]["spearman"]["mean"] - head["without_wd"]["spearman"]["mean"]
    out.append(
        Claim(
            key="wd_helps",
            claim="Weight decay raises the headline Spearman",
            paper=number(PAPER_HEADLINE["with_wd"] - PAPER_HEADLINE["without_wd"]),
            ours=number(gap),
            verdict=_verdict(gap > 0.1, gap > 0),
            value=gap,
        )
    )
    wd = ok[(ok["weight_decay"] > 0) & (ok["width"] == headline_width)]
    shallow, deep = wd[wd["depth"] <= 5]["spearman"].mean(), wd[wd["depth"] > 5]["spearman"].mean()
    drop = shallow - deep if len(wd[wd["depth"] > 5]) else math.nan
    out.append(
        Claim(
            key="depth_drop",
            claim="Spearman drops once depth exceeds 5 (mean depth ≤ 5 minus mean depth > 5, with weight decay)",
            paper="—",
            ours=number(drop),
            value=drop,
            verdict="not run" if not math.isfinite(drop) else _verdict(drop > 0.1, drop > 0),
        )
    )
    w1 = ok[(ok["weight_decay"] > 0) & (ok["depth"] == 1) & ok["width"].isin(widths)]  # the width sweep only
    widths = sorted(w1["width"].unique())
    if len(widths) >= 2:
        narrow, wide = w1[w1["width"] == widths[0]]["spearman"].mean(), w1[w1["width"] == widths[-1]]["spearman"].mean()
        wdrop = narrow - wide
    else:
        wdrop = math.nan
    out.append(
        Claim(
            key="width_drop",
            claim=(
                f"Spearman drops as width grows (width {widths[0] if widths else '?'} minus width "
                f"{widths[-1] if widths else '?'}, depth 1, with weight decay)"
            ),
            paper="—",
            ours=number(wdrop),
            value=wdrop,
            verdict="not run" if not math.isfinite(wdrop) else _verdict(wdrop > 0.1, wdrop > 0),
        )
    )
    per_arch = wd.groupby("depth")[["spearman", "lambda_max"]].mean() if len(wd) else None
    if per_arch is not None and len(per_arch) >= 3:
        rho = correlation(per_arch["lambda_max"].to_numpy(), per_arch["spearman"].to_numpy(), "spearman")
    else:
        rho = math.nan
    out.append(
        Claim(
            key="curvature",
            claim=(
                "Larger top Hessian eigenvalue goes with worse estimates (Spearman over depths of mean λmax vs mean correlation)"
            ),
            paper="—",
            ours=number(rho),
            value=rho,
            verdict="not run" if not math.isfinite(rho) else _verdict(rho <= -0.5, rho <= -0.2),
        )
    )
    return out


CHAPTER = Chapter(
    name="iris", number=1, part=PAPER_PART, config=IrisConfig, glue_prefix="iris", jobs=architecture_jobs, run=run_study
)
