"""The Iris chapter's job and verdicts: against plain sequential retraining, hand-computed diagnostics and planted
results."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from fragile.book.verdicts import Verdict
from fragile.chapters import iris
from fragile.chapters.iris import ArchitectureResult, IrisConfig, IrisRun, LeaveOneOut, run_architecture, split_iris
from fragile.chapters.results import Estimate
from fragile.core.convergence import ConvergenceClass
from fragile.core.ground_truth import loo_retrain_sequential
from fragile.core.objective import Objective
from fragile.core.train import TrainSpec, fit
from fragile.models.small import build_model

TINY = dict(n_seeds=2, train_steps=300, retrain_steps=30, depths=(1,), widths=(8,), chunk_size=64)


@pytest.fixture(scope="module")
def headline():
    cfg = IrisConfig(**TINY)
    return cfg, run_architecture(cfg, 1, 5, every_point=True, progress=False)


def test_every_point_of_the_headline_network_is_retrained_as_a_plain_loop_would(headline):
    cfg, result = headline
    train, test = split_iris(cfg)
    run = result.runs[0]
    assert run.loo.removed.tolist() == list(range(len(train)))
    model = build_model("mlp", seed=run.seed, in_features=4, num_classes=3, depth=1, width=5)
    objective = Objective(model, run.weight_decay)
    spec = TrainSpec("gd", lr=cfg.lr, steps=cfg.train_steps)
    theta = fit(objective, objective.initial_params(), train.x, train.y, spec, progress=False).params[0]
    t = run.test_index
    picked = [int(run.chosen[0]), int(run.random[0])]
    seq = loo_retrain_sequential(
        objective,
        theta,
        train.x,
        train.y,
        picked,
        spec.replace(steps=cfg.retrain_steps),
        test.x[t : t + 1],
        test.y[t : t + 1],
        progress=False,
    )
    np.testing.assert_allclose(run.loo.of_points(np.array(picked)).actual, seq.actual[:, 0].numpy(), rtol=1e-6, atol=1e-12)
    # the chosen points' agreement is over them alone; "all" over every point; "random" over k distinct random points
    assert run.random.size == result.k == np.unique(run.random).size and run.random.max() < len(train)
    rho = stats.spearmanr(run.predicted_all, run.loo.actual).statistic
    assert run.agreement_over("all").spearman == pytest.approx(rho)
    chosen_rho = stats.spearmanr(run.predicted, run.chosen_loo.actual).statistic
    assert run.agreement.spearman == pytest.approx(chosen_rho)


def test_a_network_other_than_the_headline_retrains_only_its_chosen_points():
    cfg = IrisConfig(**TINY)
    result = run_architecture(cfg, 1, 8, progress=False)
    run = result.runs[0]
    assert sorted(run.loo.removed.tolist()) == sorted(run.chosen.tolist()) and run.random.size == 0
    assert run.agreement_over("random") is None and run.agreement_over("all") is None


def test_the_recorded_diagnostics_are_the_models_own(headline):
    cfg, result = headline
    train, _ = split_iris(cfg)
    run = result.runs[0]
    model = build_model("mlp", seed=run.seed, in_features=4, num_classes=3, depth=1, width=5)
    objective = Objective(model, run.weight_decay)
    theta = fit(
        objective, objective.initial_params(), train.x, train.y, TrainSpec("gd", lr=cfg.lr, steps=cfg.train_steps), progress=False
    ).params[0]
    with torch.no_grad():
        probs = torch.softmax(objective.logits(theta, train.x), dim=1)
    assert run.train_accuracy == pytest.approx(float((probs.argmax(1) == train.y).double().mean()))
    assert run.prediction_spread == pytest.approx(float(probs.std(dim=0, unbiased=False).max()))
    assert result.majority_share == pytest.approx(np.bincount(train.y.numpy()).max() / len(train))
    conv = run.convergence(cfg.criteria, result.majority_share)
    expected = ConvergenceClass.CONVERGED if run.grad_norm <= cfg.converged_grad_norm else ConvergenceClass.NOT_CONVERGED
    assert conv.kind is expected  # 300 steps of a healthy shallow network: neither collapsed nor unstable


def test_a_fixed_test_point_is_the_one_with_the_highest_mean_loss():
    cfg = IrisConfig(**{**TINY, "test_point": "fixed"})
    train, test = split_iris(cfg)
    result = run_architecture(cfg, 1, 8, progress=False)
    losses = []
    for r in result.runs:
        model = build_model("mlp", seed=r.seed, in_features=4, num_classes=3, depth=1, width=8)
        objective = Objective(model, r.weight_decay)
        theta = fit(
            objective,
            objective.initial_params(),
            train.x,
            train.y,
            TrainSpec("gd", lr=cfg.lr, steps=cfg.train_steps),
            progress=False,
        ).params[0]
        losses.append(objective.sample_losses(theta, test.x, test.y))
    fixed = int(torch.stack(losses).mean(0).argmax())
    assert {r.test_index for r in result.runs} == {fixed}


def _run(seed: int, wd: float, rho: float, *, grad_norm: float = 1e-5, accuracy: float = 0.97, lam: float = 1.0):
    """An Iris run whose chosen points' Spearman is about ``rho``: planted predicted and actual changes."""
    rng = np.random.default_rng(seed + (1000 if wd else 0))
    n, k = 40, 20
    predicted = rng.normal(size=n)
    noise = rng.normal(size=n)
    actual = rho * predicted + math.sqrt(max(0.0, 1 - rho**2)) * noise
    chosen = np.argsort(-np.abs(predicted))[:k]
    loo = LeaveOneOut(chosen, actual[chosen], actual[chosen], 0.0, np.ones(k), 0.0)
    return IrisRun(
        seed=seed,
        weight_decay=wd,
        damping=0.0,
        test_index=0,
        test_loss=1.0,
        train_loss=0.1,
        train_accuracy=accuracy,
        prediction_spread=0.3,
        loss_rise=0.0,
        grad_norm=grad_norm,
        lambda_min=0.0,
        num_negative=0,
        lr_times_lambda_max=0.3 * lam,
        estimate=Estimate("exact", predicted[None], np.zeros(1), 0.0, lambda_max=lam),
        chosen=chosen,
        random=np.empty(0, np.int64),
        predicted_param_change=np.ones(k),
        loo=loo,
    )


def _group(depth, width, runs):
    return ArchitectureResult(depth=depth, width=width, num_params=43, k=20, n_train=40, majority_share=1 / 3, runs=tuple(runs))


def test_the_verdicts_decide_on_converged_models_and_count_the_others():
    cfg = IrisConfig(n_seeds=8, depths=(1, 2, 3, 4, 5, 6), widths=(5, 8))
    seeds = range(8)
    groups = [
        _group(1, 5, [_run(s, 0.001, 0.97) for s in seeds] + [_run(s, 0.0, 0.5) for s in seeds]),
    ]
    # the depth sweep: Spearman falling with depth; the deepest network's seeds collapsed (and would look terrible)
    for depth in range(2, 7):
        runs = [_run(s, 0.001, 0.95 - 0.15 * depth, lam=depth) for s in seeds]
        if depth == 6:
            runs = [replace(r, train_accuracy=1 / 3) for r in runs]
        groups.append(_group(depth, 5, runs + [_run(s, 0.0, 0.5) for s in seeds]))
    groups.append(_group(1, 8, [_run(s, 0.001, 0.6) for s in seeds] + [_run(s, 0.0, 0.5) for s in seeds]))
    got = {c.key: c for c in iris.claims(groups, cfg)}
    assert got["headline_with_wd"].outcome is Verdict.REPRODUCED and got["headline_with_wd"].decision.n == 8
    assert got["wd_helps"].outcome is Verdict.REPRODUCED and got["wd_helps"].decision.n == 8
    depth = got["depth_drop"]
    assert depth.outcome is Verdict.REPRODUCED and depth.decision.n == 40  # depths 1–5 converged, depth 6 collapsed
    assert "40 of 48 models converged" in depth.note
    assert 0 <= depth.decision.null_rate <= 0.05
    assert got["width_drop"].outcome is Verdict.REPRODUCED and got["curvature"].outcome is Verdict.REPRODUCED
    assert all(c.data.text() == "real (Iris, 40 training points)" or c.data.name == "Iris" for c in got.values())


def test_no_converged_model_leaves_the_claims_inconclusive_and_says_so():
    cfg = IrisConfig(n_seeds=3, depths=(1, 2, 3), widths=(8,))
    slow = dict(grad_norm=1.0)
    groups = [
        _group(d, w, [_run(s, 0.001, 0.9, **slow) for s in range(3)] + [_run(s, 0.0, 0.5, **slow) for s in range(3)])
        for d, w in ((1, 5), (2, 5), (3, 5), (1, 8))
    ]
    got = {c.key: c for c in iris.claims(groups, cfg)}
    assert all(c.decision is None and c.verdict.startswith("inconclusive") for c in got.values()), got
