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
