"""Batched leave-one-out retraining against the sequential loop and against row deletion."""

import pytest
import torch

from fragile import InvalidArgumentError, TrainSpec, fit, loo_retrain, loo_retrain_sequential

REMOVE = [0, 3, 4, 11, 29]


@pytest.mark.parametrize(
    "spec",
    [
        TrainSpec("gd", lr=0.3, steps=150),
        TrainSpec("sgd", lr=0.05, steps=120, batch_size=6, momentum=0.5, seed=1),
        TrainSpec("adam", lr=0.005, steps=120, batch_size=8, seed=2),
    ],
    ids=["gd", "sgd", "adam"],
)
def test_batched_equals_sequential(mlp_problem, spec):
    objective, theta, data = mlp_problem
    args = (objective, theta, data.x, data.y, REMOVE, spec, data.x[:4], data.y[:4])
    batched = loo_retrain(*args, chunk_size=2, keep_params=True, progress=False)  # uneven chunks on purpose
    sequential = loo_retrain_sequential(*args, keep_params=True, progress=False)
    assert torch.allclose(batched.test_loss_removed, sequential.test_loss_removed, rtol=1e-5, atol=0)
    assert torch.allclose(batched.test_loss_control, sequential.test_loss_control, rtol=1e-5, atol=0)
    assert torch.allclose(batched.params_removed, sequential.params_removed, rtol=1e-8, atol=1e-12)
    # The removals do something: the models differ from the control by more than the tolerance.
    assert float(batched.param_change_vs_control.min()) > 1e-6


def test_gd_leave_one_out_equals_training_on_the_deleted_set(mlp_problem):
    objective, theta, data = mlp_problem
    spec = TrainSpec("gd", lr=0.3, steps=100)
    res = loo_retrain(objective, theta, data.x, data.y, [5], spec, data.x[:2], data.y[:2], keep_params=True, progress=False)
    keep = torch.arange(len(data)) != 5
    direct = fit(objective, theta, data.x[keep], data.y[keep], spec, progress=False).params[0]
    assert torch.allclose(res.params_removed[0], direct, rtol=1e-10, atol=1e-12)
    control = fit(objective, theta, data.x, data.y, spec, progress=False).params[0]
    expected_control = objective.sample_losses(control, data.x[:2], data.y[:2])
    assert torch.allclose(res.test_loss_control, expected_control, rtol=1e-12)
    assert torch.allclose(res.actual, res.actual_vs_control + res.drift.unsqueeze(0), atol=1e-14)


def test_warm_started_loo_tracks_influence_near_an_optimum(logistic_problem):
    """On the convex problem, a long warm-started GD retrain approaches the true leave-one-out change."""
    from fragile import correlation, make_estimator

    objective, theta, data = logistic_problem
    idxs = list(range(0, 150, 10))
    res = loo_retrain(
        objective, theta, data.x, data.y, idxs, TrainSpec("gd", lr=1.0, steps=600), data.x[:1], data.y[:1], progress=False
    )
    pred = (
        make_estimator("exact", objective, theta, data.x, data.y, progress=False)
        .influences(data.x[:1], data.y[:1], idxs)
        .predicted[0]
    )
    assert correlation(pred.numpy(), res.actual[:, 0].numpy(), "pearson") > 0.98
    assert float(res.drift.abs().max()) < 1e-10  # θ* is the optimum: the control does not move


@pytest.mark.parametrize(
    "remove,match",
    [([], "remove is empty"), ([1, 1], "repeated"), ([99], r"outside \[0, 30\)"), ([-1], "outside")],
)
def test_bad_indices_fail_before_work(mlp_problem, remove, match):
    objective, theta, data = mlp_problem
    with pytest.raises(InvalidArgumentError, match=match):
        loo_retrain(objective, theta, data.x, data.y, remove, TrainSpec(steps=10**9), data.x[:1], data.y[:1], progress=False)


def test_mismatched_shapes_fail_before_work(mlp_problem):
    objective, theta, data = mlp_problem
    with pytest.raises(InvalidArgumentError, match="x_test rows"):
        loo_retrain(objective, theta, data.x, data.y, [0], TrainSpec(steps=10**9), data.x[:1, :2], data.y[:1], progress=False)
    with pytest.raises(InvalidArgumentError, match="theta_star"):
        loo_retrain(objective, theta[:-1], data.x, data.y, [0], TrainSpec(steps=10**9), data.x[:1], data.y[:1], progress=False)
    with pytest.raises(InvalidArgumentError, match="y has shape"):
        loo_retrain(objective, theta, data.x, data.y[:-1], [0], TrainSpec(steps=10**9), data.x[:1], data.y[:1], progress=False)


def test_many_tasks_in_one_stack_equal_separate_runs(mlp_problem):
    """Two trained models with different weight decays share one stack and still match their own runs."""
    from fragile import LOOTask, loo_retrain_many

    objective, theta, data = mlp_problem
    spec = TrainSpec("gd", lr=0.3, steps=80)
    other = theta + 0.05
    tasks = [
        LOOTask(theta, [1, 2], data.x[:2], data.y[:2]),
        LOOTask(other, [3, 4, 5], data.x[2:4], data.y[2:4], weight_decay=0.0),
    ]
    many = loo_retrain_many(objective, tasks, data.x, data.y, spec, chunk_size=4, progress=False)
    one = loo_retrain(objective, theta, data.x, data.y, [1, 2], spec, data.x[:2], data.y[:2], progress=False)
    two = loo_retrain_sequential(
        objective.with_weight_decay(0.0), other, data.x, data.y, [3, 4, 5], spec, data.x[2:4], data.y[2:4], progress=False
    )
    assert torch.allclose(many[0].test_loss_removed, one.test_loss_removed, rtol=1e-10)
    assert torch.allclose(many[1].test_loss_removed, two.test_loss_removed, rtol=1e-10)
    assert torch.allclose(many[1].test_loss_control, two.test_loss_control, rtol=1e-10)
    assert many[1].control_grad_norm == pytest.approx(two.control_grad_norm, rel=1e-8)
