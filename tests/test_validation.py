"""Bad input fails where it enters the library, before any work, naming the argument: the estimators' construction and
their ``influences`` calls, ``fit``, and the ground truths. Non-finite data or parameters, labels outside the model's
outputs, float labels, and mixed dtypes or devices each raise :class:`InvalidArgumentError` instead of all-NaN
influences, a misleading solver failure, or a raw torch error."""

import pytest
import torch

from fragile import (
    InvalidArgumentError,
    LOOTask,
    Objective,
    TrainSpec,
    build_model,
    fit,
    loo_retrain,
    loo_retrain_many,
    loo_retrain_sequential,
    make_estimator,
)
from fragile.core.ground_truth import group_retrain, pbrf_retrain
from fragile.core.train import convergence_report
from fragile.errors import check_compatible, check_dataset


@pytest.mark.parametrize(
    "method,kwargs,match",
    [
        ("newton", {}, "method='newton'"),
        ("exact", {"damping": -0.1}, "damping=-0.1"),
        ("exact", {"negative": "flip"}, "negative='flip'"),
        ("cg", {"depth": 10}, r"unknown option\(s\) \['depth'\]"),
        ("lissa", {"depth": 0}, "depth=0"),
        ("lissa", {"scale": -1.0}, "scale=-1.0"),
        ("lissa", {"batch_size": 1000}, "batch_size=1000"),
        ("arnoldi", {"rank": 10**6}, "rank="),
    ],
)
def test_estimator_arguments(mlp_problem, method, kwargs, match):
    objective, theta, data = mlp_problem
    with pytest.raises(InvalidArgumentError, match=match):
        make_estimator(method, objective, theta, data.x, data.y, **kwargs)


def test_influence_call_arguments(mlp_problem):
    objective, theta, data = mlp_problem
    est = make_estimator("cg", objective, theta, data.x, data.y, progress=False)
    with pytest.raises(InvalidArgumentError, match="train_idxs is empty"):
        est.influences(data.x[:1], data.y[:1], train_idxs=[])
    with pytest.raises(InvalidArgumentError, match="x_test rows"):
        est.influences(torch.zeros(1, 7, dtype=data.x.dtype), data.y[:1])
    with pytest.raises(InvalidArgumentError, match="y_test has shape"):
        est.influences(data.x[:2], data.y[:1])
    with pytest.raises(InvalidArgumentError, match="theta has shape"):
        make_estimator("exact", objective, theta[:3], data.x, data.y)
    assert not est._prepared  # none of the failures above did any work


# -- inputs checked where they enter: finite values, labels within the outputs, one dtype and device ----------------
METHODS = ("exact", "cg", "lissa", "arnoldi", "grad_dot", "ekfac", "tracin")


def _spoiled(t, idx, value=float("nan")):
    t = t.clone()
    t.view(-1)[list(idx)] = value
    return t


def _options(method, theta):
    return {"checkpoints": theta.unsqueeze(0)} if method == "tracin" else {}


@pytest.mark.parametrize("method", METHODS)
def test_every_estimator_refuses_non_finite_data_and_theta_naming_them(mlp_problem, method):
    objective, theta, data = mlp_problem
    extra = _options(method, theta)
    n_values = data.x.numel()
    with pytest.raises(InvalidArgumentError, match=rf"^x_train contains NaN or inf \(3 of {n_values} values\)"):
        make_estimator(method, objective, theta, _spoiled(data.x, [0, 5, 7]), data.y, progress=False, **extra)
    with pytest.raises(InvalidArgumentError, match=rf"^x_train contains NaN or inf \(1 of {n_values} values\)"):
        make_estimator(method, objective, theta, _spoiled(data.x, [4], float("-inf")), data.y, progress=False, **extra)
    with pytest.raises(InvalidArgumentError, match=rf"^theta contains NaN or inf \(2 of {theta.numel()} values\)"):
        make_estimator(method, objective, _spoiled(theta, [0, 30], float("inf")), data.x, data.y, progress=False, **extra)
    est = make_estimator(method, objective, theta, data.x, data.y, progress=False, **extra)
    with pytest.raises(InvalidArgumentError, match=r"^x_test contains NaN or inf \(1 of 6 values\)"):
        est.influences(_spoiled(data.x[:2], [3]), data.y[:2])
    assert not est._prepared  # refused before the Hessian, the factors or the power iteration


@pytest.mark.parametrize("method", METHODS)
def test_every_estimator_refuses_labels_outside_the_models_outputs(mlp_problem, method):
    objective, theta, data = mlp_problem
    extra = _options(method, theta)
    assert objective.num_outputs(theta, data.x) == 3 and int(data.y.max()) == 2
    with pytest.raises(InvalidArgumentError, match=r"^y_train has labels up to 7 but the model has 3 outputs; .*\[0, 3\)"):
        make_estimator(method, objective, theta, data.x, _spoiled(data.y, [4], 7), progress=False, **extra)
    with pytest.raises(InvalidArgumentError, match=r"^y_train has labels up to 3 but the model has 3 outputs"):
        make_estimator(method, objective, theta, data.x, _spoiled(data.y, [0], 3), progress=False, **extra)
    with pytest.raises(InvalidArgumentError, match=r"^y_train has negative labels \(min -2\)"):
        make_estimator(method, objective, theta, data.x, _spoiled(data.y, [1], -2), progress=False, **extra)
    with pytest.raises(InvalidArgumentError, match=r"^y_train has dtype torch.float32; class labels must be integers"):
        make_estimator(method, objective, theta, data.x, data.y.float(), progress=False, **extra)
    est = make_estimator(method, objective, theta, data.x, data.y, progress=False, **extra)
    with pytest.raises(InvalidArgumentError, match=r"^y_test has labels up to 5 but the model has 3 outputs"):
        est.influences(data.x[:2], torch.tensor([0, 5]))
    with pytest.raises(InvalidArgumentError, match=r"^y_test has negative labels \(min -1\)"):
        est.influences(data.x[:2], torch.tensor([-1, 0]))
    assert not est._prepared


def test_estimators_refuse_mixed_dtypes_naming_both(mlp_problem):
    objective, theta, data = mlp_problem  # float64 throughout
    with pytest.raises(
        InvalidArgumentError, match=r"^theta is torch.float32 but x_train is torch.float64; give both the same dtype"
    ):
        make_estimator("cg", objective, theta.float(), data.x, data.y)
    est = make_estimator("exact", objective, theta, data.x, data.y, progress=False)
    with pytest.raises(
        InvalidArgumentError, match=r"^theta is torch.float64 but x_test is torch.float32; give both the same dtype"
    ):
        est.influences(data.x[:2].float(), data.y[:2])
    with pytest.raises(InvalidArgumentError, match=r"^theta is torch.int64; parameters must be floating point"):
        make_estimator("cg", objective, theta.long(), data.x, data.y)
    # With trainable, θ is combined with the parameters held fixed: their dtype too.
    head = Objective(objective.model, weight_decay=0.01, trainable=("net.2",))
    theta_head = head.initial_params()
    with pytest.raises(
        InvalidArgumentError, match=r"^theta is torch.float32 but the fixed parameter net.0.weight is torch.float64"
    ):
        make_estimator("exact", head, theta_head.float(), data.x.float(), data.y)
    assert not est._prepared


def test_devices_are_compared_naming_both():
    """The device check, on the CPU and the meta device (no GPU needed); every entry point calls this helper."""
    cpu, meta = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64, device="meta")
    with pytest.raises(InvalidArgumentError, match=r"^theta is on cpu but x is on meta; put both on the same device"):
        check_compatible("theta", cpu, "x", meta)
    check_compatible("theta", cpu, "x", torch.zeros(3, dtype=torch.long))  # integer inputs (token ids) beside any dtype
    with pytest.raises(InvalidArgumentError, match=r"^y is on meta but x is on cpu; put both on the same device"):
        check_dataset("x", cpu, "y", torch.zeros(3, dtype=torch.long, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_theta_on_another_device_than_the_data_is_refused(mlp_problem):
    objective, theta, data = mlp_problem
    with pytest.raises(InvalidArgumentError, match=r"^theta is on cuda:0 but x_train is on cpu; put both on the same device"):
        make_estimator("cg", objective, theta.cuda(), data.x, data.y)
    with pytest.raises(InvalidArgumentError, match=r"^params is on cuda:0 but x is on cpu"):
        fit(objective, theta.cuda(), data.x, data.y, TrainSpec(lr=0.1, steps=1), progress=False)


def test_regression_targets_are_checked_for_finiteness_and_shape_only():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 2, generator=gen, dtype=torch.float64) * 100  # any values: no range
    model = build_model("mlp", seed=0, in_features=3, num_classes=2, depth=0, dtype=torch.float64)
    objective = Objective(model, weight_decay=0.01, loss="mse")
    theta = objective.initial_params()
    est = make_estimator("exact", objective, theta, x, y, progress=False)
    assert est.influences(x[:2], y[:2]).predicted.shape == (2, 12)
    with pytest.raises(InvalidArgumentError, match=r"^y_train contains NaN or inf \(1 of 24 values\)"):
        make_estimator("exact", objective, theta, x, _spoiled(y, [3]))
    with pytest.raises(InvalidArgumentError, match=r"^y contains NaN or inf \(2 of 24 values\)"):
        fit(objective, theta, x, _spoiled(y, [0, 1], float("inf")), TrainSpec(lr=0.1, steps=1), progress=False)
    with pytest.raises(InvalidArgumentError, match=r"^x_test contains NaN or inf"):
        est.influences(_spoiled(x[:2], [0]), y[:2])
    # A user's loss owns its targets: neither range nor finiteness is imposed on them, only one row per input.
    custom = Objective(model, weight_decay=0.01, loss=lambda z, t: (z - t.unsqueeze(1)).pow(2).sum(1))
    custom.check_inputs("theta", theta, "x", x, "y", torch.full((12,), 99, dtype=torch.long))


def test_fit_refuses_bad_inputs_before_any_step_instead_of_blaming_the_learning_rate(mlp_problem):
    objective, theta, data = mlp_problem
    spec = TrainSpec(lr=0.1, steps=3)
    start = objective.initial_params()
    cases = [
        ((start, _spoiled(data.x, [2]), data.y), r"^x contains NaN or inf \(1 of 90 values\)"),
        ((_spoiled(start, [1]), data.x, data.y), r"^params contains NaN or inf \(1 of 31 values\)"),
        ((torch.stack([start, _spoiled(start, [0, 1])]), data.x, data.y), r"^params contains NaN or inf \(2 of 62 values\)"),
        ((start, data.x, _spoiled(data.y, [0], 4)), r"^y has labels up to 4 but the model has 3 outputs"),
        ((start, data.x, _spoiled(data.y, [0], -1)), r"^y has negative labels \(min -1\)"),
        ((start, data.x, data.y.double()), r"^y has dtype torch.float64; class labels must be integers"),
        ((start.float(), data.x, data.y), r"^params is torch.float32 but x is torch.float64; give both the same dtype"),
    ]
    for (params, x, y), match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            fit(objective, params, x, y, spec, progress=False)
    with pytest.raises(InvalidArgumentError, match=r"weight_decay must be a tensor of 1 finite values >= 0"):
        fit(
            objective, start, data.x, data.y, spec, weight_decay=torch.tensor([float("nan")], dtype=torch.float64), progress=False
        )
    with pytest.raises(InvalidArgumentError, match=r"^x contains NaN or inf"):
        convergence_report(objective, theta, _spoiled(data.x, [0]), data.y)
    # The checks change nothing when the inputs are good: the same bits as before they existed (no state kept).
    a = fit(objective, start, data.x, data.y, spec, progress=False)
    b = fit(objective, start, data.x, data.y, spec, progress=False)
    assert torch.equal(a.params, b.params) and torch.isfinite(a.losses).all()


def _ground_truths(objective, theta, x, y, x_test, y_test):
    spec = TrainSpec(lr=0.1, steps=2)
    return {
        "loo_retrain": lambda: loo_retrain(objective, theta, x, y, [0, 1], spec, x_test, y_test, progress=False),
        "loo_retrain_sequential": lambda: loo_retrain_sequential(
            objective, theta, x, y, [0, 1], spec, x_test, y_test, progress=False
        ),
        "loo_retrain_many": lambda: loo_retrain_many(
            objective, [LOOTask(theta, [0], x_test, y_test)], x, y, spec, progress=False
        ),
        "group_retrain": lambda: group_retrain(objective, theta, x, y, [[0, 1]], spec, x_test, y_test, progress=False),
        "pbrf_retrain": lambda: pbrf_retrain(objective, theta, x, y, [0], x_test, y_test, damping=0.1, max_iter=2),
    }


@pytest.mark.parametrize("entry", ["loo_retrain", "loo_retrain_sequential", "loo_retrain_many", "group_retrain", "pbrf_retrain"])
def test_every_ground_truth_refuses_bad_inputs_naming_them(mlp_problem, entry):
    objective, theta, data = mlp_problem
    x, y, xt, yt = data.x, data.y, data.x[:3], data.y[:3]
    cases = [
        ((theta, _spoiled(x, [0]), y, xt, yt), r"^x contains NaN or inf \(1 of 90 values\)"),
        ((theta, x, y, _spoiled(xt, [0, 1]), yt), r"^x_test contains NaN or inf \(2 of 9 values\)"),
        ((_spoiled(theta, [3]), x, y, xt, yt), r"^theta_star contains NaN or inf \(1 of 31 values\)"),
        ((theta, x, _spoiled(y, [2], 9), xt, yt), r"^y has labels up to 9 but the model has 3 outputs"),
        ((theta, x, y, xt, torch.tensor([0, 1, 3])), r"^y_test has labels up to 3 but the model has 3 outputs"),
        ((theta, x, y, xt, torch.tensor([0, -4, 1])), r"^y_test has negative labels \(min -4\)"),
        ((theta.float(), x, y, xt, yt), r"^theta_star is torch.float32 but x is torch.float64"),
        ((theta, x, y, xt.float(), yt), r"^theta_star is torch.float64 but x_test is torch.float32"),
    ]
    for args, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            _ground_truths(objective, *args)[entry]()
    _ground_truths(objective, theta, x, y, xt, yt)[entry]()  # good inputs pass
