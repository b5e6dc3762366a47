"""Bad input to the estimators fails before any work, naming the argument."""

import pytest
import torch

from fragile import InvalidArgumentError, make_estimator


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
