"""Group removal (the paper's appendix): batched group retraining against retraining each group alone, a group of
one against leave-one-out, and, on a convex problem retrained to its optimum, the first-order group influence
(the sum of the members' influences) against the actual change for small groups."""

import pytest
import torch
from brute_force import newton_minimise

from fragile import Objective, TrainSpec, build_model, fit, loo_retrain, make_estimator, synthetic_classification
from fragile.core.ground_truth import group_retrain
from fragile.errors import InvalidArgumentError
from fragile.estimators import group_influence

GROUPS = [[0, 3, 7], [5], [10, 11, 12, 13]]


def test_batched_group_retraining_is_each_group_retrained_alone(mlp_problem):
    objective, theta, data = mlp_problem
    spec = TrainSpec("adam", lr=0.01, steps=30, batch_size=10, seed=2)
    res = group_retrain(objective, theta, data.x, data.y, GROUPS, spec, data.x[:4], data.y[:4], chunk_size=2, progress=False)
    for g, members in enumerate(GROUPS):
        w = torch.ones(len(data.x), dtype=theta.dtype)
        w[members] = 0.0
        alone = fit(objective, theta, data.x, data.y, spec, weights=w, progress=False).params[0]
        expected = objective.sample_losses(alone, data.x[:4], data.y[:4]) - objective.sample_losses(theta, data.x[:4], data.y[:4])
        torch.testing.assert_close(res.actual[g], expected, rtol=1e-9, atol=1e-12)
        assert res.groups[g].tolist() == members
    control = fit(objective, theta, data.x, data.y, spec, progress=False).params[0]
    torch.testing.assert_close(res.drift, objective.sample_losses(control, data.x[:4], data.y[:4]) - res.test_loss_star)
    single = loo_retrain(objective, theta, data.x, data.y, [5], spec, data.x[:4], data.y[:4], progress=False)
    torch.testing.assert_close(res.actual[1], single.actual[0], rtol=1e-9, atol=1e-12)


def test_first_order_group_influence_predicts_small_group_removals_on_a_convex_problem():
    # Well conditioned (400 points, weight decay 0.05), so single-point influence is accurate to a few per cent
    # and what is left to test is that the group's prediction is the sum of its members'.
    data = synthetic_classification(400, num_features=3, num_classes=3, noise=1.0, seed=3)
    objective = Objective(build_model("mlp", seed=0, in_features=3, num_classes=3, depth=0), weight_decay=0.05)
    theta = newton_minimise(objective, objective.initial_params(), data.x, data.y)
    groups = [[0, 1], [20, 40, 60], [7]]
    est = make_estimator("exact", objective, theta, data.x, data.y, progress=False)
    xt, yt = data.x[300:303], data.y[300:303]  # test points outside every group
    predicted = group_influence(est.influences(xt, yt).predicted, groups)
    actual = []
    for members in groups:
        keep = torch.ones(len(data.x), dtype=torch.bool)
        keep[members] = False
        refit = newton_minimise(objective, theta, data.x[keep], data.y[keep])
        actual.append(objective.sample_losses(refit, xt, yt) - objective.sample_losses(theta, xt, yt))
    actual = torch.stack(actual, dim=1)  # (n_test, G)
    torch.testing.assert_close(predicted, actual, rtol=0.1, atol=0.02 * float(actual.abs().max()))
    assert (predicted.sign() == actual.sign()).all()


def test_bad_groups_are_named(mlp_problem):
    objective, theta, data = mlp_problem
    spec = TrainSpec(lr=0.1, steps=2)
    with pytest.raises(InvalidArgumentError, match="groups is empty"):
        group_retrain(objective, theta, data.x, data.y, [], spec, data.x[:1], data.y[:1])
    with pytest.raises(InvalidArgumentError, match=r"groups\[1\] has repeated indices"):
        group_retrain(objective, theta, data.x, data.y, [[0], [2, 2]], spec, data.x[:1], data.y[:1])
    with pytest.raises(InvalidArgumentError, match=r"groups\[0\] has indices outside"):
        group_influence(torch.zeros(1, 5), [[9]])
