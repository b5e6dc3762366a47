import pytest
import torch

from fragile import Objective, TrainSpec, build_model, convergence_report, fit, synthetic_classification
from fragile.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def setup():
    data = synthetic_classification(24, num_features=3, num_classes=2, seed=4)
    model = build_model("mlp", seed=1, in_features=3, num_classes=2, depth=1, width=3)
    return Objective(model, weight_decay=0.01), data


def _manual_gd(objective, theta, x, y, lr, steps):
    """Plain autograd gradient descent on an explicitly written loss: independent of fit()."""
    params = [t.clone() for t in objective.unflatten(theta).values()]
    for _ in range(steps):
        w1, b1, w2, b2 = (p.requires_grad_(True) for p in params)
        logits = torch.relu(x @ w1.T + b1) @ w2.T + b2
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.5 * objective.weight_decay * sum((p * p).sum() for p in params)
        grads = torch.autograd.grad(loss, params)
        params = [(p - lr * g).detach() for p, g in zip(params, grads)]
    return torch.cat([p.flatten() for p in params])


def test_gd_matches_a_hand_written_loop(setup):
    objective, data = setup
    theta0 = objective.initial_params()
    ours = fit(objective, theta0, data.x, data.y, TrainSpec(lr=0.3, steps=50), progress=False).params[0]
    ref = _manual_gd(objective, theta0, data.x, data.y, 0.3, 50)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [
        TrainSpec("sgd", lr=0.1, steps=40, batch_size=5, momentum=0.9, seed=2),
        TrainSpec("adam", lr=0.01, steps=40, batch_size=7, seed=2),
    ],
)
def test_training_is_deterministic_and_stack_equals_single(setup, spec):
    objective, data = setup
    theta0 = objective.initial_params()
    a = fit(objective, theta0, data.x, data.y, spec, progress=False)
    b = fit(objective, theta0, data.x, data.y, spec, progress=False)
    assert torch.equal(a.params, b.params)
    other = theta0 + 0.1
    stacked = fit(objective, torch.stack([theta0, other]), data.x, data.y, spec, progress=False)
    single = fit(objective, other, data.x, data.y, spec, progress=False)
    assert torch.allclose(stacked.params[0], a.params[0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(stacked.params[1], single.params[0], rtol=1e-12, atol=1e-14)


def test_gd_decreases_loss_and_reports_convergence(setup):
    objective, data = setup
    res = fit(objective, objective.initial_params(), data.x, data.y, TrainSpec(lr=0.5, steps=400), progress=False)
    assert res.losses[-1, 0] < res.losses[0, 0]
    report = convergence_report(objective, res.params[0], data.x, data.y, lr=0.5)
    assert report.grad_norm == pytest.approx(float(res.grad_norm[0]), rel=1e-10)
    h = torch.func.hessian(objective.train_loss)(res.params[0], data.x, data.y)
    assert report.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-5)
    assert report.lr_times_lambda_max == pytest.approx(0.5 * report.lambda_max)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"optimizer": "lbfgs"}, "optimizer="),
        ({"lr": -1.0}, "lr="),
        ({"steps": -5}, "steps="),
        ({"optimizer": "gd", "batch_size": 10}, "batch_size"),
        ({"optimizer": "sgd", "momentum": 1.5}, "momentum="),
        ({"optimizer": "adam", "nesterov": True, "momentum": 0.9}, "nesterov=True is not allowed"),
        ({"optimizer": "sgd", "nesterov": True}, "nesterov=True is not allowed"),
        ({"optimizer": "rmsprop", "alpha": 1.0}, "alpha="),
    ],
)
def test_bad_train_spec_names_the_field(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        TrainSpec(**kwargs)


def test_divergent_learning_rate_is_reported(setup):
    objective, data = setup
    with pytest.raises(InvalidArgumentError, match="lower lr"):
        fit(objective, objective.initial_params() * 50, data.x, data.y, TrainSpec(lr=1e6, steps=50), progress=False)


@pytest.mark.parametrize(
    "spec, make",
    [
        (
            TrainSpec("sgd", lr=0.1, steps=25, momentum=0.9, nesterov=True),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        ),
        (TrainSpec("sgd", lr=0.1, steps=25, momentum=0.8), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8)),
        (TrainSpec("rmsprop", lr=0.01, steps=25), lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.99, eps=1e-8)),
        (
            TrainSpec("rmsprop", lr=0.01, steps=25, momentum=0.5, alpha=0.9),
            lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5),
        ),
        (TrainSpec("adam", lr=0.01, steps=25), lambda ps: torch.optim.Adam(ps, lr=0.01)),
    ],
)
def test_each_optimiser_follows_its_torch_optim_namesake_step_for_step(setup, spec, make):
    # The appendix's optimiser study (Adam, GD, Nesterov, RMSProp) needs each update to be the standard one:
    # torch.optim on an nn.Module with the same (full-batch) objective is the independent reference.
    import copy

    objective, data = setup
    theta0 = objective.initial_params()
    ours = fit(objective, theta0, data.x, data.y, spec, progress=False).params[0]
    model = copy.deepcopy(objective.model)
    opt = make(list(model.parameters()))
    for _ in range(spec.steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data.x), data.y)
        loss = loss + 0.5 * objective.weight_decay * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    ref = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11)


def test_the_final_gradient_norm_is_the_same_in_chunks(setup):
    from fragile.core.train import _full_batch_grads

    objective, data = setup
    thetas = objective.initial_params().expand(3, -1).contiguous() + 0.1
    weights = torch.ones(3, len(data.x), dtype=thetas.dtype)
    weights[1, :5] = 0.0  # a model with points removed
    wd = torch.tensor([0.0, 0.01, 0.1], dtype=thetas.dtype)
    # Each model's gradient on its own, through the single-model objective with its own weights and weight decay.
    one_by_one = torch.stack(
        [objective.with_weight_decay(float(wd[k])).grad(thetas[k], data.x, data.y, weights[k]) for k in range(3)]
    )
    for chunk in (len(data.x), 5):  # one pass, and chunks whose weighted means are recombined
        torch.testing.assert_close(
            _full_batch_grads(objective, thetas, data.x, data.y, weights, wd, chunk=chunk), one_by_one, rtol=1e-12, atol=1e-14
        )
    unweighted = torch.stack([objective.grad(t, data.x, data.y) for t in thetas])
    torch.testing.assert_close(
        _full_batch_grads(objective, thetas, data.x, data.y, None, None, chunk=7), unweighted, rtol=1e-12, atol=1e-14
    )
