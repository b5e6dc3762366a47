"""The convergence classes, on networks trained here to each state and on hand-made diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fragile.core import convergence as cv
from fragile.core.objective import Objective
from fragile.core.train import TrainSpec, convergence_report, fit
from fragile.data.datasets import load_iris
from fragile.errors import InvalidArgumentError
from fragile.models.small import build_model


def _classify(objective, theta, data, spec, losses=None):
    rise = 0.0 if losses is None else cv.loss_rise(losses)
    report = convergence_report(objective, theta, data.x, data.y, lr=spec.lr)
    with torch.no_grad():
        logits = objective.logits(theta, data.x)
    accuracy = float((logits.argmax(1) == data.y).double().mean())
    return cv.classify_convergence(
        grad_norm=report.grad_norm,
        train_accuracy=accuracy,
        majority_share=cv.majority_share(data.y.numpy()),
        prediction_spread=cv.prediction_spread(logits.numpy()),
        lr_times_lambda_max=report.lr_times_lambda_max,
        full_batch_gd=spec.optimizer == "gd",
        loss_rise=rise,
    ), report


@pytest.fixture(scope="module")
def iris():
    return load_iris()


def test_softmax_regression_trained_to_its_optimum_is_converged(iris):
    obj = Objective(build_model("mlp", seed=0, in_features=4, num_classes=3, depth=0), 0.01)
    spec = TrainSpec("gd", lr=0.5, steps=3000)
    res = fit(obj, obj.initial_params(), iris.x, iris.y, spec, progress=False)
    conv, report = _classify(obj, res.params[0], iris, spec, res.losses[:, 0].numpy())
    assert report.grad_norm < 1e-6 and conv.kind is cv.ConvergenceClass.CONVERGED and conv.converged


def test_a_few_steps_are_not_converged(iris):
    obj = Objective(build_model("mlp", seed=0, in_features=4, num_classes=3, depth=0), 0.01)
    spec = TrainSpec("gd", lr=0.1, steps=30)
    res = fit(obj, obj.initial_params(), iris.x, iris.y, spec, progress=False)
    conv, report = _classify(obj, res.params[0], iris, spec, res.losses[:, 0].numpy())
    assert report.grad_norm > 1e-2 and conv.kind is cv.ConvergenceClass.NOT_CONVERGED and "‖∇‖" in conv.reason


def test_a_network_dead_at_its_output_is_collapsed(iris):
    """Strong weight decay on a deep ReLU net drives it to the constant predictor of the class shares: its Hessian
    is then the output bias's, λmax = 1/3 + wd for three balanced classes."""
    wd = 0.05
    obj = Objective(build_model("mlp", seed=3, in_features=4, num_classes=3, depth=6, width=5), wd)
    spec = TrainSpec("gd", lr=0.1, steps=4000)
    res = fit(obj, obj.initial_params(), iris.x, iris.y, spec, progress=False)
    conv, report = _classify(obj, res.params[0], iris, spec)
    assert conv.kind is cv.ConvergenceClass.COLLAPSED, conv
    assert report.lambda_max == pytest.approx(1 / 3 + wd, rel=0.05)


def test_gradient_descent_past_its_stability_limit_is_unstable(iris):
    obj = Objective(build_model("mlp", seed=0, in_features=4, num_classes=3, depth=0), 0.01)
    spec = TrainSpec("gd", lr=0.5, steps=3000)
    theta = fit(obj, obj.initial_params(), iris.x, iris.y, spec, progress=False).params[0]
    lam = convergence_report(obj, theta, iris.x, iris.y).lambda_max
    fast = spec.replace(lr=2.2 / lam)  # lr·λmax = 2.2 at the optimum: gradient descent oscillates out of it
    conv, report = _classify(obj, theta, iris, fast)
    assert report.lr_times_lambda_max == pytest.approx(2.2) and conv.kind is cv.ConvergenceClass.UNSTABLE
    adam = TrainSpec("adam", lr=fast.lr, steps=10)
    assert _classify(obj, theta, iris, adam)[0].kind is not cv.ConvergenceClass.UNSTABLE  # the limit is gradient descent's


def test_a_loss_that_rises_at_the_end_is_unstable():
    falling = np.linspace(1.0, 0.1, 1000)
    assert cv.loss_rise(falling) == 0.0
    rising = np.r_[falling, np.linspace(0.1, 0.2, 100)]
    window = round(0.05 * rising.size)
    by_hand = rising[-window:].mean() / min(rising[i : i + window].mean() for i in range(rising.size - window + 1)) - 1
    assert cv.loss_rise(rising) == pytest.approx(by_hand) and by_hand > 0.05
    conv = cv.classify_convergence(
        grad_norm=1e-5, train_accuracy=0.9, majority_share=0.34, prediction_spread=0.3, loss_rise=cv.loss_rise(rising)
    )
    assert conv.kind is cv.ConvergenceClass.UNSTABLE and "rose" in conv.reason


def test_the_class_order_and_the_diagnostics_by_hand():
    ok = dict(grad_norm=1e-5, train_accuracy=0.95, majority_share=0.34, prediction_spread=0.4)
    assert cv.classify_convergence(**ok).kind is cv.ConvergenceClass.CONVERGED
    assert cv.classify_convergence(**{**ok, "train_accuracy": 0.34}).kind is cv.ConvergenceClass.COLLAPSED
    assert cv.classify_convergence(**{**ok, "prediction_spread": 1e-5}).kind is cv.ConvergenceClass.COLLAPSED
    unstable = {**ok, "grad_norm": 1.0, "lr_times_lambda_max": 2.02, "full_batch_gd": True}
    assert cv.classify_convergence(**unstable).kind is cv.ConvergenceClass.UNSTABLE  # unstable before not converged
    loose = cv.ConvergenceCriteria(grad_tolerance=2.0)
    assert cv.classify_convergence(**{**ok, "grad_norm": 1.0}, criteria=loose).kind is cv.ConvergenceClass.CONVERGED
    assert cv.majority_share(np.array([0, 0, 1, 2])) == 0.5
    same = np.tile([[1.0, 2.0, 0.5]], (5, 1))
    assert cv.prediction_spread(same) == 0.0
    assert cv.prediction_spread(np.array([[10.0, 0.0], [0.0, 10.0]])) == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_accuracy": 1.5}, "train_accuracy=1.5"),
        ({"majority_share": -0.1}, "majority_share"),
        ({"grad_norm": math.nan}, "grad_norm"),
    ],
)
def test_bad_diagnostics_are_refused_by_name(kwargs, match):
    base = dict(grad_norm=1e-5, train_accuracy=0.95, majority_share=0.34, prediction_spread=0.4)
    with pytest.raises(InvalidArgumentError, match=match):
        cv.classify_convergence(**{**base, **kwargs})


def test_bad_criteria_are_refused_by_name():
    with pytest.raises(InvalidArgumentError, match="grad_tolerance"):
        cv.ConvergenceCriteria(grad_tolerance=0)
    with pytest.raises(InvalidArgumentError, match="window=0.9"):
        cv.loss_rise(np.ones(10), window=0.9)
    with pytest.raises(InvalidArgumentError, match="logits"):
        cv.prediction_spread(np.zeros(3))


def test_the_counts_per_class_are_in_the_classes_order_with_other_values_after():
    import pandas as pd

    from fragile.chapters.protocol import convergence_counts

    table = pd.DataFrame(
        {
            "depth": [2, 1, 1, 1, 2],
            "convergence": ["collapsed", "estimator failed", "converged", "converged", "not converged"],
        }
    )
    counts = convergence_counts(table, ["depth"])
    assert counts["depth"].tolist() == [2, 1]  # in the table's order
    assert list(counts.columns[1:]) == ["converged", "not converged", "collapsed", "estimator failed"]
    assert counts.set_index("depth").loc[1].tolist() == [2, 0, 0, 1] and counts.set_index("depth").loc[2].tolist() == [0, 1, 1, 0]
