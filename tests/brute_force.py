"""Reference computations that do not go through fragile's own solvers or trainers."""

import torch


def newton_minimise(objective, theta, x, y, weights=None, tol=1e-12, max_iter=100):
    """Damped-free Newton iterations with torch.func.hessian: an optimiser independent of fragile.core.train."""
    for _ in range(max_iter):
        g = torch.func.grad(objective.train_loss)(theta, x, y, weights)
        if g.norm() < tol:
            return theta
        h = torch.func.hessian(objective.train_loss)(theta, x, y, weights)
        theta = theta - torch.linalg.solve(h, g)
    raise AssertionError(f"Newton did not converge: gradient norm {float(g.norm())}")


def retrained_change(objective, theta, data, remove, spec, test_index):
    """The change of test point ``test_index``'s loss when training point ``remove`` is left out, by one plain
    sequential warm-started retraining (no stacking): the reference a stacked leave-one-out job must match."""
    from fragile import loo_retrain_sequential

    t = slice(test_index, test_index + 1)
    res = loo_retrain_sequential(
        objective, theta, data.train.x, data.train.y, [remove], spec, data.test.x[t], data.test.y[t], progress=False
    )
    return float(res.actual[0, 0])


def write_measurement(path, rows):
    """A benchmarks measurement file (as benchmarks/ write them) holding ``rows``, from a made-up device."""
    import json

    path.write_text(json.dumps({"device": "GPU X", "torch": "2", "date": "d", "script": "s", "rows": rows}))
    return path
