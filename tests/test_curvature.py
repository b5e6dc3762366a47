"""HVPs against finite differences of gradients; the materialised Hessian against torch.func.hessian."""

import pytest
import torch

from fragile import Objective, build_model, hessian_matrix, hvp, top_eigenvalue
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
    """The 2,616 × 2,616 Hessian of the small-MNIST CNN on a tiny subset of real digits, against central
    differences of gradients along coordinate directions drawn from every parameter tensor."""
    from fragile import load_mnist_digits

    data = load_mnist_digits()
    x, y = data.x[:3], data.y[:3]
    objective = Objective(build_model("koh_liang_cnn", seed=0), weight_decay=0.001)
    theta = objective.initial_params()
    h = hessian_matrix(objective, theta, x, y, vector_chunk=128)
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
