"""Influence restricted to a subset of the parameters (how it is computed at ImageNet scale): the objective's
gradient and Hessian are the matching entries and block of the full ones, and exact influence is the closed form
on that block."""

import pytest
import torch

from fragile import Objective, build_model, make_estimator, synthetic_classification
from fragile.core.curvature import hessian_matrix
from fragile.errors import InvalidArgumentError

HEAD = ("net.4",)


@pytest.fixture(scope="module")
def problem():
    data = synthetic_classification(25, num_features=3, num_classes=3, noise=1.0, seed=5)
    model = build_model("mlp", seed=1, in_features=3, num_classes=3, depth=2, width=4, activation="tanh")
    full = Objective(model, 0.01)
    theta = full.initial_params() + 0.1 * torch.randn(
        full.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    head = Objective(model, 0.01, trainable=HEAD)
    # Where the head's entries sit in the full θ (named_parameters order: the head is last).
    sel = torch.arange(full.num_params - head.num_params, full.num_params)
    return data, model, full, head, theta, sel


def test_the_subsets_gradient_and_hessian_are_the_full_ones_entries_and_block(problem):
    data, model, full, head, theta, sel = problem
    assert head.names == ["net.4.weight", "net.4.bias"] and head.num_params == 4 * 3 + 3
    # The frozen parameters are the template's: evaluate the full objective with them there.
    base = full.initial_params()
    point = base.clone()
    point[sel] = theta[sel]
    torch.testing.assert_close(head.grad(theta[sel], data.x, data.y), full.grad(point, data.x, data.y)[sel])
    h_full = hessian_matrix(full, point, data.x, data.y)
    h_head = hessian_matrix(head, theta[sel], data.x, data.y)
    torch.testing.assert_close(h_head, h_full[sel][:, sel], rtol=1e-10, atol=1e-12)


def test_exact_influence_on_a_subset_is_the_closed_form_on_its_block(problem):
    data, model, full, head, theta, sel = problem
    t = theta[sel]
    est = make_estimator("exact", head, t, data.x, data.y, damping=0.05, progress=False)
    got = est.influences(data.x[:2], data.y[:2]).predicted
    h = hessian_matrix(head, t, data.x, data.y) + 0.05 * torch.eye(head.num_params, dtype=torch.float64)
    g_test = head.sample_grads(t, data.x[:2], data.y[:2])
    g_train = head.point_grads(t, data.x, data.y)
    expected = g_test @ torch.linalg.solve(h, g_train.T) / len(data.x)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)
    assert head.with_weight_decay(0.1).trainable == HEAD


def test_a_prefix_that_names_no_parameter_is_refused_by_name(problem):
    _, model, *_ = problem
    with pytest.raises(
        InvalidArgumentError,
        match=r"trainable=\['net.9'\] is not allowed: \['net.9'\] names no parameter; top-level modules: \['net'\]",
    ):
        Objective(model, 0.0, trainable=("net.9",))
    with pytest.raises(InvalidArgumentError, match="trainable"):
        Objective(model, 0.0, trainable=())
    with pytest.raises(InvalidArgumentError, match=r"\['net.4.w'\] names no parameter"):
        Objective(model, 0.0, trainable=("net.4.w",))  # a prefix is a whole module or parameter name, not a string prefix
