"""The MNIST and CIFAR-10 section (the paper's Table 1; docs/protocol.md#table-1): deeper networks, the stochastic
inverse-HVP (LiSSA) against warm-started leave-one-out retraining.

Every model is one job of the Table 1 protocol (:mod:`fragile.chapters.table1_protocol`): trained with minibatch
Adam; its highest-loss and median-loss test points; every training point's influence on each by ``estimator``
(LiSSA, its scale set from the largest Hessian eigenvalue unless given) and, beside it on the same test points,
by each of ``compare_estimators`` (``cg``, ``arnoldi``), each with its solve residual; the ``top_k`` training
points by |predicted| retrained warm-started from θ* for ``retrain_fraction`` of the training steps, with the
drift control. This module makes the chapter's tables and claims from those models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fragile.book.chapter import PAPER_PART, Chapter
from fragile.book.claims import Claim
from fragile.chapters.protocol import check_device_here, run_jobs
from fragile.chapters.results import Estimate, EstimatorFailure
from fragile.chapters.table1_protocol import (
    TEST_POINTS,
    Table1Config,
    Table1Result,
    build_network,
    correlations_table,
    model_jobs,
)
from fragile.core.metrics import aggregate_over_seeds, correlation
from fragile.run.sweep import SweepReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MnistCifar10Config(Table1Config):
    """The MNIST & CIFAR-10 chapter's parameters: those of a Table 1 model (:class:`Table1Config`), with its
    data sets' architecture lists saying which models the table has."""


def run_study(cfg: MnistCifar10Config, *, progress: bool = True, client=None) -> tuple[list[Table1Result], SweepReport]:
    """Every model through the sweep layer; returns the finished models (table order) and the report."""
    check_device_here(cfg, client)
    return run_jobs(cfg, model_jobs(cfg), progress=progress, client=client)


# The paper's Table 1 cells known to us (docs/protocol.md#table-1: from a reading note [note], unchecked against
# the PDF): ResNet-50 on MNIST, Spearman 0.22 / 0.19 with weight decay and 0.13 without. We read the pair as the
# highest- and the median-loss test point; which test point 0.13 belongs to is not known to us.
PAPER_CELLS = {("resnet50", "mnist", "highest loss", True): 0.22, ("resnet50", "mnist", "median loss", True): 0.19}
PAPER_RESNET50_MNIST_WITHOUT_WD = 0.13


def models_table(models: list[Table1Result]):
    """One row per trained network: size, fit, λmax, and each estimator's time and worst solve residual (NaN, and
    ``<name>_failed`` its message, where it failed); ``failed`` says why the primary estimator failed, or ``""``."""
    import pandas as pd

    rows = []
    for m in models:
        net, fit = m.network, m.network.fit
        row: dict[str, Any] = {
            "dataset": net.dataset,
            "architecture": net.architecture,
            "weight_decay": net.weight_decay,
            "seed": net.seed,
            "num_params": net.num_params,
            "train_accuracy": fit.train_accuracy,
            "test_accuracy": fit.test_accuracy,
            "train_loss": fit.train_loss,
            "grad_norm": fit.grad_norm,
            "failed": m.failure,
        }
        for name, est in m.estimators.items():
            if isinstance(est, Estimate):
                row[f"{name}_seconds"] = est.seconds
                row[f"{name}_max_residual"] = float(np.max(est.residuals))
                if est.lambda_max is not None:
                    row.setdefault("lambda_max", est.lambda_max)
            else:
                row[f"{name}_seconds"] = row[f"{name}_max_residual"] = math.nan
                row[f"{name}_failed"] = est.message[:200]
        rows.append(row)
    return pd.DataFrame(rows)


def estimator_comparison(models: list[Table1Result], compare_estimators: Sequence[str]) -> tuple[str, list[str]]:
    """The compared estimators beside LiSSA on the same test points and top training points: a Markdown table (one
    row per network and test point: LiSSA's Spearman with leave-one-out, and each compared estimator's Spearman
    with leave-one-out and with LiSSA, or "failed"), and each distinct failure message (cut to 160 characters)."""
    rows = [
        "| data set | architecture | wd | test point | LiSSA vs LOO | "
        + " | ".join(f"{name} vs LOO | {name} vs LiSSA" for name in compare_estimators)
        + " |",
        "|" + "---|" * (4 + 1 + 2 * len(compare_estimators)),
    ]
    failures = set()
    for m in models:
        net = m.network
        for name in compare_estimators:
            if isinstance(est := m.estimators[name], EstimatorFailure):
                failures.add(f"{name}: {est.message[:160]}")
        for e in m.per_test_point:
            cells = [
                net.dataset + (" (stand-in)" if net.stand_in else ""),
                net.architecture,
                f"{net.weight_decay:g}",
                e.kind,
                f"{e.spearman:.2f}",
            ]
            compared = {c.method: c for c in e.compared}
            for name in compare_estimators:
                c = compared.get(name)
                cells += ["failed", ""] if c is None else [f"{c.spearman:.2f}", f"{c.spearman_vs_primary:.2f}"]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows), sorted(failures)


def _cell(values: list[float], pearsons: list[float]) -> str:
    s, p = aggregate_over_seeds(values), aggregate_over_seeds(pearsons)
    if not math.isfinite(s.mean):
        return "–"
    spread = f" ± {s.std:.2f}" if s.n > 1 and math.isfinite(s.std) else ""
    return f"{s.mean:.2f} ({p.mean:.2f}){spread}"


def table1(models: list[Table1Result], *, stand_in: dict[str, bool] | None = None, not_run: dict[str, str] | None = None):
    """The paper's Table 1 as a DataFrame: rows = architecture, columns = (data set, test point, weight decay),
    cells = "Spearman (Pearson) ± standard deviation of Spearman over seeds" (no ± with one seed).

    A data set run on a stand-in is named so in its column header ("CIFAR-10 STAND-IN (digits)"). Missing
    combinations (e.g. ResNet-50 on CIFAR-10) are blank; a failed estimator is "failed". ``not_run`` maps an
    architecture this run left out to the reason, shown in its row.
    """
    import pandas as pd

    stand_in = stand_in or {}
    table = correlations_table(models)
    header = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    archs: list[str] = []
    for m in models:
        if m.network.architecture not in archs:
            archs.append(m.network.architecture)
    for (ds, arch, wd, kind), g in table.groupby(["dataset", "architecture", "weight_decay", "test_point"], sort=False):
        name = header[ds] + (" STAND-IN (digits)" if stand_in.get(ds) else "")
        col = (name, kind, f"wd {wd:g}" if wd else "no wd")
        cells.setdefault(col, {})[arch] = _cell(list(g["spearman"]), list(g["pearson"]))
    for m in models:
        if m.failure:
            net = m.network
            name = header[net.dataset] + (" STAND-IN (digits)" if stand_in.get(net.dataset) else "")
            for kind in TEST_POINTS:
                col = (name, kind, f"wd {net.weight_decay:g}" if net.weight_decay else "no wd")
                cells.setdefault(col, {}).setdefault(net.architecture, "failed")
    for arch, reason in (not_run or {}).items():
        if arch not in archs:
            archs.append(arch)
            for col in cells:
                cells[col][arch] = reason
    frame = pd.DataFrame(cells, index=archs).fillna("")
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["data set", "test point", "weight decay"])
    return frame


def paper_comparison(models: list[Table1Result]) -> list[dict[str, Any]]:
    """Our ResNet-50-on-MNIST Spearman beside the paper's cells (the only Table 1 cells known to us: docs/protocol.md#table-1)."""
    table = correlations_table(models)
    rows = []
    sel = table[(table["architecture"] == "resnet50") & (table["dataset"] == "mnist")] if len(table) else table
    for kind in TEST_POINTS:
        for with_wd in (True, False):
            g = sel[(sel["test_point"] == kind) & ((sel["weight_decay"] > 0) == with_wd)] if len(sel) else sel
            ours = float(g["spearman"].mean()) if len(g) else math.nan
            paper = PAPER_CELLS.get(
                ("resnet50", "mnist", kind, with_wd), PAPER_RESNET50_MNIST_WITHOUT_WD if not with_wd else math.nan
            )
            rows.append(
                {
                    "test point": kind,
                    "weight decay": "with" if with_wd else "without",
                    "paper": paper,
                    "ours": ours,
                    "note": "" if with_wd else "the paper's 0.13 is for one test point, which one is not known to us",
                }
            )
    return rows


def claims(models: list[Table1Result], *, stand_in: dict[str, bool]) -> list[Claim]:
    """The paper's Table 1 claims, our number beside theirs, and a verdict by a stated rule.

    Rules (stated in the chapter): *ResNet-50 on MNIST is poor* is reproduced when our mean Spearman over its
    test points and weight decays is within 0.15 of the paper's mean (0.18 over 0.22, 0.19, 0.13), partly
    when it is below 0.4; *correlation varies strongly* is reproduced when the cells of the table span more
    than 0.5 (highest minus lowest mean Spearman), partly when more than 0.25; *some CIFAR-10 VGG values are
    higher without weight decay* is reproduced when at least one VGG test point on CIFAR-10 has a higher
    Spearman without than with weight decay. A claim about CIFAR-10 computed on the stand-in is marked so and
    cannot be "reproduced": its verdict says "on the stand-in".
    """
    table = correlations_table(models)
    out = []
    paper_mean = float(np.mean([0.22, 0.19, PAPER_RESNET50_MNIST_WITHOUT_WD]))
    r50 = table[(table["architecture"] == "resnet50") & (table["dataset"] == "mnist")] if len(table) else table
    if len(r50):
        ours = float(r50["spearman"].mean())
        verdict = "reproduced" if abs(ours - paper_mean) <= 0.15 else ("partly reproduced" if ours < 0.4 else "not reproduced")
        out.append(
            Claim(
                key="resnet50",
                claim="ResNet-50 on MNIST: influence correlates poorly with leave-one-out (mean Spearman)",
                paper=f"{paper_mean:.2f} (0.22, 0.19 with wd; 0.13 without)",
                ours=f"{ours:.2f}",
                value=ours,
                verdict=verdict,
            )
        )
    else:
        out.append(
            Claim.not_run(
                "resnet50",
                "ResNet-50 on MNIST: influence correlates poorly with leave-one-out (mean Spearman)",
                f"{paper_mean:.2f}",
                "needs the real data set and a GPU: run with `--profile paper` (ResNet-50 is not in this profile's "
                "mnist_architectures: too slow for a CPU)",
            )
        )
    if len(table):
        cell_means = table.groupby(["dataset", "architecture", "weight_decay", "test_point"])["spearman"].mean().dropna()
        span = float(cell_means.max() - cell_means.min()) if len(cell_means) else math.nan
        out.append(
            Claim(
                key="varies",
                claim=(
                    "Correlation varies strongly with architecture, data set, test point and weight decay "
                    "(span of the table's cells)"
                ),
                paper="qualitative (varies strongly)",
                ours=f"{span:.2f} ({cell_means.min():.2f} to {cell_means.max():.2f})",
                value=span,
                verdict="reproduced" if span > 0.5 else ("partly reproduced" if span > 0.25 else "not reproduced"),
            )
        )
    vgg = table[(table["dataset"] == "cifar10") & table["architecture"].str.startswith("vgg")] if len(table) else table
    claim = "CIFAR-10: some VGG values are higher without weight decay than with it"
    if len(vgg) and (vgg["weight_decay"] == 0).any() and (vgg["weight_decay"] > 0).any():
        by = vgg.groupby(["architecture", "test_point", vgg["weight_decay"] > 0])["spearman"].mean().unstack()
        higher = int((by[False] > by[True]).sum())
        verdict = "reproduced" if higher else "not reproduced"
        if stand_in.get("cifar10"):
            verdict += " on the stand-in (not CIFAR-10)"
        out.append(
            Claim(
                key="vgg_wd",
                claim=claim,
                paper="qualitative (some higher without)",
                ours=f"{higher} of {len(by)} VGG test points higher without",
                value=float(higher),
                verdict=verdict,
            )
        )
    else:
        out.append(
            Claim.not_run(
                "vgg_wd",
                claim,
                "qualitative (some higher without)",
                "needs the real data set: run with `--profile paper` (VGG on CIFAR-10, with and without weight decay)",
            )
        )
    out.append(lissa_depth_claim(models))
    return out


def weight_layers(architecture: str) -> int:
    """Convolutional and linear layers of ``architecture`` (its depth, as the paper counts it)."""
    net = build_network(MnistCifar10Config(width=8), architecture, "cifar10", 0)
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in net.modules())


def lissa_depth_claim(models: list[Table1Result]) -> Claim:
    """The appendix's *LiSSA is inaccurate, and worse for deeper networks*, from the solves of this chapter.

    Rule (stated in the chapter): LiSSA's relative residual ‖(H+λI)x − v‖/‖v‖, averaged per architecture over
    its test points, weight decays and seeds; **reproduced** when it exceeds 0.1 for every architecture and its
    Spearman correlation with the number of weight layers is at least 0.5, **partly** when only one holds; at
    least three architectures are needed.
    """
    claim = "LiSSA's inverse-HVP is inaccurate, and worse for deeper networks (its residual against depth)"
    per: dict[str, list[float]] = {}
    for m in models:
        est = m.estimators.get("lissa")
        if isinstance(est, Estimate):
            per.setdefault(m.network.architecture, []).extend(np.asarray(est.residuals, dtype=float).tolist())
    if len(per) < 3:
        return Claim.not_run("lissa_depth", claim, "qualitative", "not run: needs LiSSA on at least three architectures")
    depth = {a: weight_layers(a) for a in per}
    mean = {a: float(np.mean(v)) for a, v in per.items()}
    order = sorted(per, key=depth.get)
    rho = correlation(np.array([depth[a] for a in order], dtype=float), np.array([mean[a] for a in order]), "spearman")
    inaccurate, deeper = all(v > 0.1 for v in mean.values()), rho >= 0.5
    verdict = "reproduced" if inaccurate and deeper else ("partly reproduced" if inaccurate or deeper else "not reproduced")
    ours = "; ".join(f"{a} ({depth[a]} layers) {mean[a]:.2f}" for a in order) + f"; Spearman with depth {rho:.2f}"
    return Claim(key="lissa_depth", claim=claim, paper="qualitative", ours=ours, value=rho, verdict=verdict)


def paper_cost_markdown(cfg: MnistCifar10Config) -> str:
    """The work of one run of ``cfg``, counted from its parameters in image-gradient evaluations (an HVP counts
    as two; the power iteration at its 200-step cap; every top point distinct), per model and in total.
    A count, not a time: how long it takes depends on the device, and the chapter's provenance records it."""
    full = {"mnist": 60000, "cifar10": 50000}
    rows = [
        "| data set | architecture | training | LiSSA | CG | Arnoldi | leave-one-out | per model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for ds, arch in cfg.pairs:
        n = cfg.n_train or full[ds]
        train = cfg.train_steps * cfg.batch_size
        lissa = 2 * (200 * n + 2 * cfg.lissa_depth * cfg.lissa_repeats * min(cfg.lissa_batch_size, n) + 2 * n) + n
        cg = 2 * 2 * cfg.cg_max_iter * n + n
        arnoldi = 2 * 2 * cfg.arnoldi_rank * n + n
        loo = (2 * cfg.top_k + 1) * cfg.retrain_steps * cfg.batch_size
        per_model = train + lissa + cg + arnoldi + loo
        total += per_model * len(cfg.weight_decays) * cfg.n_seeds
        rows.append(
            f"| {ds} | {arch} | " + " | ".join(f"{v / 1e6:,.1f} M" for v in (train, lissa, cg, arnoldi, loo, per_model)) + " |"
        )
    models = len(cfg.pairs) * len(cfg.weight_decays) * cfg.n_seeds
    return (
        "\n".join(rows) + f"\n\n{models} models in all: {total / 1e9:,.2f} billion image-gradient evaluations "
        "(one ResNet-18 image-gradient at full width is about 1.7 GFLOP on a 32×32 image)."
    )


def measured_time_markdown(cfg: MnistCifar10Config, costs_path: str) -> str:
    """The time ``cfg`` takes per model and in all, from unit costs that ``benchmarks/table1_costs.py --json``
    measured on a device (CIFAR-10 networks taken at their MNIST cost); empty when no measurement is there."""
    import json
    from pathlib import Path

    path = Path(costs_path)
    if not path.is_file():
        return ""
    record = json.loads(path.read_text())
    hours = {r["architecture"]: r["hours_per_model"] for r in record["rows"]}
    missing = sorted({a for _, a in cfg.pairs} - set(hours))
    per_seed_wd = sum(hours.get(a, math.nan) for _, a in cfg.pairs)
    rows = ["| architecture | hours per model |", "|---|---|"] + [f"| {a} | {h:.2f} |" for a, h in hours.items()]
    total = per_seed_wd * len(cfg.weight_decays) * cfg.n_seeds
    return (
        "\n".join(rows) + f"\n\nMeasured with `{record['script']}` on one {record['device']} (torch {record['torch']}, "
        f"{record['date']}): unit costs times the counts above. For these {len(cfg.pairs)} networks, "
        f"{len(cfg.weight_decays)} weight decays and {cfg.n_seeds} seed(s): **about {total:,.0f} GPU-hours**"
        + (f" (no measurement for {', '.join(missing)})" if missing else "")
        + "."
    )


CHAPTER = Chapter(
    name="mnist_cifar10", number=3, part=PAPER_PART, config=MnistCifar10Config, glue_prefix="mc10", jobs=model_jobs, run=run_study
)
