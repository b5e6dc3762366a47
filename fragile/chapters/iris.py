"""The Iris section (docs/protocol.md#iris; the paper's Figure 1): exact influence vs leave-one-out retraining
for small MLPs, across depth, width, weight decay and seeds.

Protocol, per architecture and seed: train by full-batch gradient descent from the seed's
initialisation (with and without weight decay, in one stack), take the held-out test point with the
highest loss, compute exact influence (materialised Hessian) on every training point, select the top
``selection_fraction`` by |predicted influence|, retrain each of them warm-started from θ* for
``retrain_steps`` steps with the drift control, and correlate predicted with actual loss changes.
Each architecture is one job of a :mod:`fragile.run.sweep` (its seeds train as one vectorised stack, which is
faster than spreading them over processes); jobs run on Dask workers, are cached one by one, and an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fragile.book.chapter import PAPER_PART, Chapter, ChapterConfig
from fragile.book.claims import Claim, number
from fragile.chapters.protocol import iris_split, job_fields, run_jobs
from fragile.core.ground_truth import LOOTask, loo_retrain_many
from fragile.core.metrics import aggregate_over_seeds, correlation
from fragile.core.objective import Objective
from fragile.core.selection import SELECTION_SCORES, select_top_k
from fragile.core.train import TrainSpec, fit
from fragile.data.datasets import Dataset
from fragile.errors import InvalidArgumentError, check_choice, check_int, check_positive
from fragile.estimators import NEGATIVE_POLICIES, make_estimator
from fragile.models.small import ACTIVATIONS, build_model
from fragile.run.sweep import Job, SweepReport

log = logging.getLogger(__name__)

MAX_DEPTH = 12
MAX_WIDTH = 200


@dataclass(frozen=True)
class IrisConfig(ChapterConfig):
    """Every value the Iris section depends on. Values the paper does not state are marked so.

    Attributes:
        (the common fields of :class:`~fragile.book.chapter.ChapterConfig`; ``device`` is the CPU only here:
        the models are tiny)
        n_seeds: seeds per configuration (the paper reports single runs).
        depths: hidden-layer counts of the depth sweep, at width ``headline_width``.
        widths: widths of the width sweep, at depth 1.
        headline_width: width of the headline network and of the depth sweep (paper: 5).
        activation: hidden activation (paper: ReLU).
        weight_decay: L2 coefficient of the "with weight decay" runs (paper: not stated for Iris).
        damping_with_wd: damping λ with weight decay (paper: none).
        damping_without_wd: damping λ without weight decay (paper: 0.001).
        negative_eigenvalues: policy for negative Hessian eigenvalues (paper: damping only, i.e. keep).
        lr: gradient-descent learning rate (paper: not stated).
        train_steps: full-batch GD steps to θ* (paper: 60,000).
        retrain_steps: warm-started leave-one-out steps (paper: 7,500).
        test_fraction: share of Iris held out as test points (paper: split not stated).
        split_seed: seed of the stratified train/test split.
        selection_fraction: share of training points evaluated (paper: 16.6 %).
        selection_by: ranking for the selection: ``abs`` = |predicted influence| (paper: unconfirmed).
        chunk_size: models per retraining stack.
    """

    n_seeds: int = 10
    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    widths: tuple[int, ...] = (8, 14, 20, 30, 40, 50)
    headline_width: int = 5
    activation: str = "relu"
    weight_decay: float = 0.001
    damping_with_wd: float = 0.0
    damping_without_wd: float = 0.001
    negative_eigenvalues: str = "keep"
    lr: float = 0.3
    train_steps: int = 60000
    retrain_steps: int = 7500
    test_fraction: float = 0.2
    split_seed: int = 0
    selection_fraction: float = 0.166
    selection_by: str = "abs"
    chunk_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.depths:
            raise InvalidArgumentError("depths is empty; give at least one depth")
        for d in self.depths:
            check_int("depths", d, minimum=1, maximum=MAX_DEPTH)
        if not self.widths:
            raise InvalidArgumentError("widths is empty; give at least one width")
        for w in self.widths:
            check_int("widths", w, minimum=1, maximum=MAX_WIDTH)
        check_int("headline_width", self.headline_width, minimum=1, maximum=MAX_WIDTH)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_positive("weight_decay", self.weight_decay)
        check_positive("damping_with_wd", self.damping_with_wd, allow_zero=True)
        check_positive("damping_without_wd", self.damping_without_wd, allow_zero=True)
        check_choice("negative_eigenvalues", self.negative_eigenvalues, NEGATIVE_POLICIES)
        check_positive("lr", self.lr)
        check_int("train_steps", self.train_steps, minimum=1)
        check_int("retrain_steps", self.retrain_steps, minimum=1)
        if not 0.0 < self.test_fraction < 0.5:
            raise InvalidArgumentError(f"test_fraction={self.test_fraction!r} is not allowed; it must be in (0, 0.5)")
        check_int("split_seed", self.split_seed, minimum=0)
        if not 0.0 < self.selection_fraction <= 1.0:
            raise InvalidArgumentError(f"selection_fraction={self.selection_fraction!r} is not allowed; it must be in (0, 1]")
        check_choice("selection_by", self.selection_by, SELECTION_SCORES)
        check_int("chunk_size", self.chunk_size, minimum=1)


def split_iris(cfg: IrisConfig) -> tuple[Dataset, Dataset]:
    """Stratified train/test split of the standardised Iris data (seeded by ``split_seed``)."""
    return iris_split(cfg.test_fraction, cfg.split_seed)


def run_architecture(cfg: IrisConfig, depth: int, width: int, *, progress: bool = True) -> dict[str, Any]:
    """All seeds, with and without weight decay, for one architecture. Returns plain arrays per run.

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
    trained = fit(
        base,
        theta0,
        train.x,
        train.y,
        TrainSpec("gd", lr=cfg.lr, steps=cfg.train_steps),
        weight_decay=wd_t,
        progress=progress,
        desc=f"train d={depth} w={width}",
    )

    runs: list[dict[str, Any]] = []
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
            runs.append({"seed": seed, "weight_decay": wd, "failed": str(exc)})
            continue
        predicted = res.predicted[0]
        chosen = select_top_k(predicted.numpy(), k, by=cfg.selection_by)
        dtheta = est.predicted_param_changes(torch.as_tensor(chosen))
        spec = est.spectrum
        runs.append(
            {
                "seed": seed,
                "weight_decay": wd,
                "damping": damping,
                "test_index": t,
                "test_loss": float(test_losses[t]),
                "train_loss": float(trained.losses[-1, r]),
                "grad_norm": float(trained.grad_norm[r]),
                "lambda_max": spec.largest,
                "lambda_min": spec.smallest,
                "num_negative": spec.num_negative,
                "lr_times_lambda_max": cfg.lr * spec.largest,
                "predicted_all": predicted.numpy(),
                "chosen": chosen,
                "predicted": predicted.numpy()[chosen],
                "predicted_param_change": dtheta.norm(dim=1).numpy(),
                "residual": float(res.residuals.max()),
            }
        )
        tasks.append(LOOTask(theta, torch.as_tensor(chosen), test.x[t : t + 1], test.y[t : t + 1], weight_decay=wd))

    loo = loo_retrain_many(
        base,
        tasks,
        train.x,
        train.y,
        TrainSpec("gd", lr=cfg.lr, steps=cfg.retrain_steps),
        chunk_size=cfg.chunk_size,
        progress=progress,
    )
    done = iter(loo)
    for run in runs:
        if "failed" in run:
            continue
        lr_ = next(done)
        actual, vs_control = lr_.actual[:, 0].numpy(), lr_.actual_vs_control[:, 0].numpy()
        run.update(
            {
                "actual": actual,
                "actual_vs_control": vs_control,
                "drift": float(lr_.drift[0]),
                "actual_param_change": lr_.param_change.numpy(),
                "control_grad_norm": lr_.control_grad_norm,
                "spearman": correlation(run["predicted"], actual, "spearman"),
                "pearson": correlation(run["predicted"], actual, "pearson"),
            }
        )
    return {"depth": depth, "width": width, "num_params": base.num_params, "k": k, "n_train": n, "runs": runs}


def architecture_job(depth: int, width: int, **fields: Any) -> dict[str, Any]:
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


def run_study(cfg: IrisConfig, *, progress: bool = True, client=None) -> tuple[list[dict[str, Any]], SweepReport]:
    """Every architecture, through the sweep layer on ``cfg.scheduler`` (or ``client``).

    Returns the finished architectures in :func:`architectures` order and the sweep's report (done,
    cached, failed with traceback). A failed architecture is left out of the groups, never hidden:
    the report names it.
    """
    return run_jobs(cfg, architecture_jobs(cfg), progress=progress, client=client)


def derived_metrics(run: dict[str, Any]) -> dict[str, float]:
    """What the drift control changes. For one test point the control's drift shifts every actual change
    by the same amount, so rank and linear correlations are unchanged by it; signs and magnitudes are not.

    Returns the share of evaluated points whose predicted and actual changes have the same sign, against
    θ* and against the control, and ``|drift| / median |actual − drift|``: above 1, continued training
    alone moves the test loss more than removing a typical evaluated point does.
    """
    if "actual" not in run:
        return {"sign_agreement": math.nan, "sign_agreement_vs_control": math.nan, "drift_to_signal": math.nan}
    pred = np.sign(run["predicted"])
    signal = float(np.median(np.abs(run["actual_vs_control"])))
    return {
        "sign_agreement": float(np.mean(pred == np.sign(run["actual"]))),
        "sign_agreement_vs_control": float(np.mean(pred == np.sign(run["actual_vs_control"]))),
        "drift_to_signal": abs(run["drift"]) / signal if signal > 0 else math.inf,
    }


def runs_table(groups: list[dict[str, Any]]):
    """One row per (architecture, weight decay, seed) with the scalar results, as a pandas DataFrame."""
    import pandas as pd

    rows = []
    for g in groups:
        for r in g["runs"]:
            row = {"depth": g["depth"], "width": g["width"], "num_params": g["num_params"]}
            row.update({k: v for k, v in r.items() if not isinstance(v, np.ndarray) and not k.endswith("_vs_control")})
            row.update(derived_metrics(r))
            row["wd"] = "with weight decay" if r["weight_decay"] > 0 else "without weight decay"
            rows.append(row)
    return pd.DataFrame(rows)


def seed_summary(values) -> dict[str, Any]:
    """Mean, std and values over seeds (NaN-aware), as a plain dict for JSON and glue."""
    return aggregate_over_seeds(list(values)).as_dict()


HEADLINE_STATS = ("spearman", "pearson", "sign_agreement", "sign_agreement_vs_control", "drift_to_signal")


def headline(groups: list[dict[str, Any]], width: int) -> dict[str, Any]:
    """Spearman/Pearson of the depth-1 network at ``width`` with and without weight decay: the first seed's
    value (the paper reports one run) and the spread over all seeds."""
    g = next(g for g in groups if g["depth"] == 1 and g["width"] == width)
    out = {}
    for label, with_wd in (("with_wd", True), ("without_wd", False)):
        runs = [{**r, **derived_metrics(r)} for r in g["runs"] if (r["weight_decay"] > 0) == with_wd and "failed" not in r]
        out[label] = {
            stat: {"first_seed": runs[0][stat] if runs else math.nan, **seed_summary(r[stat] for r in runs)}
            for stat in HEADLINE_STATS
        }
    return out


# The paper's Iris numbers (docs/protocol.md#iris: from a third-party reading note [note], not yet checked
# against the PDF). Only the headline network has numbers; the sweeps are qualitative claims.
PAPER_HEADLINE = {"with_wd": 0.97, "without_wd": 0.508}


def _verdict(ok: bool, partly: bool) -> str:
    return "reproduced" if ok else ("partly reproduced" if partly else "not reproduced")


def claims(groups: list[dict[str, Any]], headline_width: int, widths: tuple[int, ...]) -> list[Claim]:
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
