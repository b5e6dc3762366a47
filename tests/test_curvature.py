"""HVPs against finite differences of gradients; the materialised Hessian against torch.func.hessian; the layer-blocked
Hessian of a chain of layers against the Hessian by HVPs through the whole model."""

import pytest
import torch
from torch import nn

from fragile import Objective, build_model, hessian_matrix, hvp, load_mnist_digits, synthetic_classification, top_eigenvalue
from fragile.core.blocked_hessian import NotAChainError, chain_stages, layer_blocked_hessian
from fragile.core.curvature import Spectrum


def test_hvp_matches_finite_differences_of_gradients(mlp_problem):
    objective, theta, data = mlp_problem
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(objective.num_params, generator=gen, dtype=theta.dtype)
    eps = 1e-5
    fd = (objective.grad(theta + eps * v, data.x, data.y) - objective.grad(theta - eps * v, data.x, data.y)) / (2 * eps)
    hv = hvp(objective, theta, data.x, data.y, v)
    # Central differences: O(eps²) truncation plus O(machine eps / eps) round-off.
    assert torch.allclose(hv, fd, rtol=1e-6, atol=1e-8)


def test_hessian_is_symmetric_and_matches_torch_func(mlp_problem):
    objective, theta, data = mlp_problem
    h = hessian_matrix(objective, theta, data.x, data.y, data_chunk=7, vector_chunk=5)
    assert float((h - h.T).abs().max()) < 1e-12
    reference = torch.func.hessian(objective.train_loss)(theta, data.x, data.y)
    assert torch.allclose(h, reference, rtol=1e-10, atol=1e-12)


def test_hessian_includes_weight_decay(mlp_problem):
    _, theta, data = mlp_problem
    model = build_model("mlp", seed=0, in_features=3, num_classes=3, depth=1, width=4, activation="tanh")
    h0 = hessian_matrix(Objective(model, 0.0), theta, data.x, data.y)
    h1 = hessian_matrix(Objective(model, 0.3), theta, data.x, data.y)
    assert torch.allclose(h1 - h0, 0.3 * torch.eye(theta.numel(), dtype=theta.dtype), atol=1e-12)


def test_top_eigenvalue_power_iteration_handles_negative_dominant_spectrum():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    evals = torch.tensor([-5.0, -1.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    a = q @ torch.diag(evals) @ q.T
    assert top_eigenvalue(lambda v: a @ v, 6, iters=2000, rtol=1e-12) == pytest.approx(3.0, rel=1e-6)


def test_spectrum_counts_negative_eigenvalues():
    s = Spectrum.from_eigenvalues(torch.tensor([-2.0, -1e-20, 0.0, 1.0, 4.0], dtype=torch.float64))
    assert (s.largest, s.smallest, s.num_negative) == (4.0, -2.0, 1)


def test_koh_liang_cnn_exact_hessian_matches_finite_differences_of_gradients():
    """The 2,616 × 2,616 Hessian of the small-MNIST CNN on a tiny subset of real digits (layer-blocked, through
    hessian_matrix), against central differences of gradients along coordinate directions drawn from every parameter
    tensor, and those rows against HVPs through the whole model; chunks that do not divide 3 images or any layer's
    parameters."""
    data = load_mnist_digits()
    x, y = data.x[:3], data.y[:3]
    objective = Objective(build_model("koh_liang_cnn", seed=0), weight_decay=0.001)
    theta = objective.initial_params()
    h = hessian_matrix(objective, theta, x, y, data_chunk=2, vector_chunk=128)
    assert h.shape == (2616, 2616)
    assert float((h - h.T).abs().max()) < 1e-10 * float(h.abs().max())
    starts = torch.tensor([0, *torch.cumsum(torch.tensor(objective.numels), 0)[:-1].tolist()])
    gen = torch.Generator().manual_seed(0)
    cols = torch.cat([s + torch.randint(0, n, (3,), generator=gen) for s, n in zip(starts.tolist(), objective.numels)])
    eps = 1e-5
    for j in cols.tolist():
        e = torch.zeros_like(theta)
        e[j] = eps
        fd = (objective.grad(theta + e, x, y) - objective.grad(theta - e, x, y)) / (2 * eps)
        assert torch.allclose(h[:, j], fd, rtol=1e-5, atol=1e-7), f"column {j}"
    # Rows from every layer span every block, those below the diagonal (filled in by symmetry) included.
    rows = hvp(objective, theta, x, y, torch.eye(objective.num_params, dtype=theta.dtype)[cols])
    assert float((h[cols] - rows).abs().max()) < 1e-10 * float(rows.abs().max())


# -- the layer-blocked Hessian ------------------------------------------------------------------------------------------


def _hvp_hessian(objective, theta, x, y):
    """The Hessian by HVPs through the whole model, one row at a time (hessian_matrix's path for a model that is not a
    chain)."""
    eye = torch.eye(objective.num_params, dtype=theta.dtype)
    return torch.stack([hvp(objective, theta, x, y, e) for e in eye])


def _relative(a, b):
    return float((a - b).abs().max()) / float(b.abs().max())


def _perturbed(objective, scale=0.3, seed=0):
    """Initial parameters moved off their zero biases, so that every block of the Hessian is generic."""
    theta = objective.initial_params()
    return theta + scale * torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed), dtype=theta.dtype)


@pytest.fixture(scope="module")
def small_cnn_problem():
    """The Koh & Liang CNN with 2 channels (312 parameters) on 5 real digits, weight decay 0.01, in float64."""
    data = load_mnist_digits()
    objective = Objective(build_model("koh_liang_cnn", seed=0, channels=2), weight_decay=0.01)
    theta = _perturbed(objective)
    x, y = data.x[:5], data.y[:5]
    return objective, theta, x, y, _hvp_hessian(objective, theta, x, y)


@pytest.fixture(scope="module")
def deep_mlp_problem():
    """A tanh MLP of depth 3 (71 parameters) on 30 points, weight decay 0.01, in float64."""
    data = synthetic_classification(30, num_features=3, num_classes=3, noise=1.5, seed=3)
    model = build_model("mlp", seed=1, in_features=3, num_classes=3, depth=3, width=4, activation="tanh")
    objective = Objective(model, weight_decay=0.01)
    theta = _perturbed(objective)
    return objective, theta, data.x, data.y, _hvp_hessian(objective, theta, data.x, data.y)


# n = 5 and 30; the CNN's layers hold 20, 38, 30 and 110 parameters, the MLP's 16, 20, 20 and 15: 5 and 10 divide
# some of them, 7, 9 and 13 none, 2 divides n = 30 only; 1000 caps nothing.
CHUNKS = [(None, None), (5, 5), (2, 9), (7, 13), (10, 1000)]


@pytest.mark.parametrize(("data_chunk", "vector_chunk"), CHUNKS)
@pytest.mark.parametrize("problem", ["small_cnn_problem", "deep_mlp_problem"])
def test_layer_blocked_hessian_equals_the_hvp_hessian(problem, data_chunk, vector_chunk, request):
    objective, theta, x, y, reference = request.getfixturevalue(problem)
    h = layer_blocked_hessian(objective, theta, x, y, data_chunk=data_chunk, vector_chunk=vector_chunk)
    assert _relative(h, reference) < 1e-10
    assert float((h - h.T).abs().max()) < 1e-12 * float(h.abs().max())


def test_layer_blocked_hessian_adds_weight_decay_on_the_diagonal(deep_mlp_problem):
    """The regulariser as hvp adds it (weight_decay·v): weight_decay·I, blocks off the diagonal untouched."""
    objective, theta, x, y, _ = deep_mlp_problem
    h = layer_blocked_hessian(objective, theta, x, y, data_chunk=7, vector_chunk=13)
    h0 = layer_blocked_hessian(objective.with_weight_decay(0.0), theta, x, y, data_chunk=7, vector_chunk=13)
    assert torch.allclose(h - h0, 0.01 * torch.eye(objective.num_params, dtype=theta.dtype), rtol=0, atol=1e-12)


def test_hessian_matrix_is_the_layer_blocked_hessian_for_a_chain(small_cnn_problem):
    objective, theta, x, y, _ = small_cnn_problem
    h = hessian_matrix(objective, theta, x, y, data_chunk=3, vector_chunk=16)
    assert torch.equal(h, layer_blocked_hessian(objective, theta, x, y, data_chunk=3, vector_chunk=16))


@pytest.mark.parametrize("model", ["koh_liang_cnn", "mlp"])
def test_layer_blocked_hessian_matches_torch_func_hessian(model):
    """Against an independent computation: torch.func.hessian (forward-over-reverse of the flat objective)."""
    if model == "mlp":
        data = synthetic_classification(12, num_features=3, num_classes=3, seed=4)
        x, y = data.x, data.y
        net = build_model("mlp", seed=2, in_features=3, num_classes=3, depth=2, width=3, activation="softplus")
    else:
        digits = load_mnist_digits()
        x, y = digits.x[:3], digits.y[:3]
        net = build_model("koh_liang_cnn", seed=2, channels=1)
    objective = Objective(net, weight_decay=0.05)
    theta = _perturbed(objective, seed=1)
    reference = torch.func.hessian(objective.train_loss)(theta, x, y)
    h = layer_blocked_hessian(objective, theta, x, y, data_chunk=2, vector_chunk=4)
    assert _relative(h, reference) < 1e-10


def test_layer_blocked_hessian_float32_agrees_with_float64(small_cnn_problem):
    objective64, theta, x, y, reference = small_cnn_problem
    objective = Objective(build_model("koh_liang_cnn", seed=0, channels=2, dtype=torch.float32), weight_decay=0.01)
    h = layer_blocked_hessian(objective, theta.float(), x.float(), y)
    assert h.dtype == torch.float32
    assert _relative(h.double(), reference) < 1e-4


def test_layer_blocked_hessian_of_a_parameter_subset(deep_mlp_problem):
    """θ the second and last linear layers only: the layers below the first are a prefix without tangents, the one in
    between (held fixed) is part of the sub-chain; the result is the Hessian of that objective."""
    full, _, x, y, _ = deep_mlp_problem
    objective = Objective(full.model, weight_decay=0.01, trainable=("net.2", "net.6"))
    theta = _perturbed(objective, seed=2)
    assert [s.size for s in chain_stages(objective)] == [0, 0, 20, 0, 0, 0, 15]
    h = layer_blocked_hessian(objective, theta, x, y, data_chunk=7, vector_chunk=6)
    assert _relative(h, _hvp_hessian(objective, theta, x, y)) < 1e-10


class _HeadFirst(nn.Module):
    """A chain whose parameters come in θ head first (registered before the hidden layer), against the order of the
    layers."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.hidden = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))

    def sequential_layers(self):
        return [self.hidden, nn.Tanh(), self.head]


def test_layer_blocked_hessian_in_theta_order_whatever_the_chain_order():
    data = synthetic_classification(20, seed=5)
    torch.manual_seed(0)
    objective = Objective(_HeadFirst().double(), weight_decay=0.01)
    assert objective.names[0] == "head.weight"
    theta = _perturbed(objective)
    h = layer_blocked_hessian(objective, theta, data.x, data.y, vector_chunk=5)
    assert _relative(h, torch.func.hessian(objective.train_loss)(theta, data.x, data.y)) < 1e-10


class _Skip(nn.Module):
    """Not a chain: a skip connection around the hidden layer."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)) + x)


class _SkipSequential(nn.Sequential):
    """An nn.Sequential whose own forward adds a skip connection: not the chain of its children."""

    def forward(self, x):
        return self[2](self[1](self[0](x)) + x)


class _WrongLayers(_Skip):
    """Claims a chain that leaves out the skip connection."""

    def sequential_layers(self):
        return [self.hidden, nn.Tanh(), self.out]


def _tied():
    layer = nn.Linear(3, 3)
    return nn.Sequential(layer, nn.Tanh(), layer)


NOT_CHAINS = {
    "skip connection": (_Skip, "_Skip is not one"),
    "nn.Sequential with its own forward": (lambda: _SkipSequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)), "not one"),
    "sequential_layers() that is not the forward": (_WrongLayers, "does not reproduce its forward pass"),
    "tied weights": (_tied, "in two layers"),
}


@pytest.mark.parametrize("case", list(NOT_CHAINS))
def test_a_model_that_is_not_a_chain(case):
    """layer_blocked_hessian refuses it, naming the reason; hessian_matrix falls back to HVPs through the whole model."""
    make, reason = NOT_CHAINS[case]
    data = synthetic_classification(15, seed=6)
    torch.manual_seed(0)
    objective = Objective(make().double(), weight_decay=0.01)
    theta = _perturbed(objective)
    with pytest.raises(NotAChainError, match=reason):
        layer_blocked_hessian(objective, theta, data.x, data.y)
    h = hessian_matrix(objective, theta, data.x, data.y, vector_chunk=4)
    assert _relative(h, torch.func.hessian(objective.train_loss)(theta, data.x, data.y)) < 1e-10
