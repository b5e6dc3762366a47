"""The feature-major stack of MLPs (fragile.core.stacked_mlp) against the generic path: each model's own objective
evaluated alone by functional_call, and its gradient by torch.func.grad."""

import pytest
import torch
from torch import nn
from torch.func import grad

from fragile import Objective, build_model
from fragile.core.train import _stacked_grads


class Opaque(nn.Module):
    """The same network behind a wrapper that is no chain: the objective takes the vmap path for it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _problem(depth, activation, loss, k=5, n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = build_model("mlp", seed=seed, in_features=4, num_classes=3, depth=depth, width=6, activation=activation).double()
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g) if loss == "cross_entropy" else torch.randn(n, 3, generator=g, dtype=torch.float64)
    objective = Objective(model, weight_decay=0.01, loss=loss)
    thetas = objective.initial_params() + 0.3 * torch.randn(k, objective.num_params, generator=g, dtype=torch.float64)
    weights = torch.rand(k, n, generator=g, dtype=torch.float64)
    decay = torch.rand(k, generator=g, dtype=torch.float64) * 0.1
    return objective, thetas, x, y, weights, decay


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "selu", "softplus"])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_stack_gives_each_models_own_objective_and_gradient(depth, activation, loss):
    objective, thetas, x, y, weights, decay = _problem(depth, activation, loss)
    assert objective._mlp is not None  # the fast path is what is tested
    values = objective.stacked_train_losses(thetas, x, y, weights, decay)
    grads, _ = _stacked_grads(objective.stacked_train_losses, thetas, x, y, weights, decay)

    def alone(theta, w, wd):  # model k by itself, through the module's own forward
        losses = objective.sample_losses(theta, x, y)
        return (losses * w).sum() / w.sum() + 0.5 * wd * (theta * theta).sum()

    for k in range(len(thetas)):
        want = alone(thetas[k], weights[k], decay[k])
        assert values[k].item() == pytest.approx(want.item(), rel=1e-13)
        torch.testing.assert_close(grads[k], grad(alone)(thetas[k], weights[k], decay[k]), rtol=1e-12, atol=1e-14)


def test_the_stack_agrees_with_the_vmap_path_and_with_smaller_stacks():
    objective, thetas, x, y, weights, decay = _problem(2, "relu", "cross_entropy", k=9)
    opaque = Objective(Opaque(objective.model), weight_decay=0.01)
    assert opaque._mlp is None and opaque.num_params == objective.num_params
    fast, _ = _stacked_grads(objective.stacked_train_losses, thetas, x, y, weights, decay)
    slow, _ = _stacked_grads(opaque.stacked_train_losses, thetas, x, y, weights, decay)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    one_by_one = torch.cat(
        [
            _stacked_grads(objective.stacked_train_losses, thetas[k : k + 1], x, y, weights[k : k + 1], decay[k : k + 1])[0]
            for k in range(9)
        ]
    )
    # to rounding, not bit for bit: MKL's batched product of some shapes rounds a model's result differently by its
    # place in the batch (the vmap path's too), which is why a stack's size is part of a job's configuration
    torch.testing.assert_close(one_by_one, fast, rtol=1e-13, atol=1e-15)


def test_models_that_are_no_plain_chain_take_the_generic_path():
    mlp = build_model("mlp", seed=0, in_features=4, num_classes=3, depth=1, width=5).double()
    assert Objective(mlp, trainable=("net.2",))._mlp is None  # a parameter held fixed
    with_dropout = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.0), nn.Linear(5, 3)).double()
    assert Objective(with_dropout)._mlp is None
    plain = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).double()
    objective = Objective(plain)
    assert objective._mlp is not None
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    thetas = objective.initial_params().expand(2, -1).clone()
    want = objective.train_loss(thetas[0], x, y)
    assert objective.stacked_train_losses(thetas, x, y).tolist() == pytest.approx([want.item()] * 2, rel=1e-14)
    assert Objective(build_model("koh_liang_cnn", seed=0, num_classes=10))._mlp is None
