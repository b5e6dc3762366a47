"""Leave-one-out ground truth: retrain warm-started from θ* with one point removed, plus the drift control.

The paper's protocol (paper-brief §2): each leave-one-out model starts at θ* and trains a fixed number
of steps without point ``i``; the control trains the same steps with nothing removed. We report both
``L(θ₋ᵢ) − L(θ*)`` (the paper's "actual" change) and ``L(θ₋ᵢ) − L(θ_control)``, which removes the
drift that continued training causes on its own.

:func:`loo_retrain` trains the K models as one vectorised stack (per-model example weights, one
vmapped forward, one backward); :func:`loo_retrain_sequential` trains them one by one and exists as the
reference the batched version is tested against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fragile.errors import InvalidArgumentError, check_dataset, check_indices, check_int
from fragile.objective import Objective
from fragile.train import TrainSpec, fit

log = logging.getLogger(__name__)


@dataclass
class LOOResult:
    """Leave-one-out retraining results for one set of removed indices.

    Attributes:
        removed: (K,) removed training indices.
        test_loss_star: (n_test,) test losses at θ*.
        test_loss_control: (n_test,) test losses after the control retraining (nothing removed).
        test_loss_removed: (K, n_test) test losses after retraining without each point.
        param_change: (K,) ``‖θ₋ᵢ − θ*‖``.
        param_change_vs_control: (K,) ``‖θ₋ᵢ − θ_control‖``.
        control_grad_norm: full-batch gradient norm of the objective at the end of the control run.
        params_removed: (K, p) retrained parameters, kept only when asked for.
    """

    removed: torch.Tensor
    test_loss_star: torch.Tensor
    test_loss_control: torch.Tensor
    test_loss_removed: torch.Tensor
    param_change: torch.Tensor
    param_change_vs_control: torch.Tensor
    control_grad_norm: float
    params_removed: torch.Tensor | None = None

    @property
    def actual(self) -> torch.Tensor:
        """``L(θ₋ᵢ) − L(θ*)``, (K, n_test): the paper's actual loss change."""
        return self.test_loss_removed - self.test_loss_star

    @property
    def actual_vs_control(self) -> torch.Tensor:
        """``L(θ₋ᵢ) − L(θ_control)``, (K, n_test): the change with the retraining drift removed."""
        return self.test_loss_removed - self.test_loss_control

    @property
    def drift(self) -> torch.Tensor:
        """``L(θ_control) − L(θ*)``, (n_test,): what continued training alone does to each test loss."""
        return self.test_loss_control - self.test_loss_star


def _check(objective, theta_star, x, y, remove, x_test, y_test, chunk_size) -> torch.Tensor:
    check_dataset("x", x, "y", y)
    check_dataset("x_test", x_test, "y_test", y_test)
    objective.check_params("theta_star", theta_star)
    if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
        raise InvalidArgumentError(f"x_test rows have shape {tuple(x_test.shape[1:])} but x rows have {tuple(x.shape[1:])}")
    check_int("chunk_size", chunk_size, minimum=1)
    if x.shape[0] < 2:
        raise InvalidArgumentError("leave-one-out needs at least 2 training points")
    return check_indices("remove", remove, x.shape[0])


def loo_retrain(
    objective: Objective,
    theta_star: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    remove: Sequence[int] | torch.Tensor,
    spec: TrainSpec,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    chunk_size: int = 64,
    keep_params: bool = False,
    progress: bool = True,
) -> LOOResult:
    """Batched warm-started leave-one-out retraining with the drift control.

    The control and the K leave-one-out models train as stacks of at most ``chunk_size`` models; every
    model sees the same minibatch order (``spec.seed``), with the removed point weighted 0 in its own
    objective. Cost: about ``ceil((K+1)/chunk_size)·spec.steps`` stacked steps; memory grows with
    ``chunk_size`` times one model's activations.

    Args:
        objective: the training objective (same weight decay as the training of θ*).
        theta_star: the trained parameters to warm-start from, (p,).
        x, y: the full training set.
        remove: indices whose removal is simulated, one model each.
        spec: retraining optimiser and number of steps.
        x_test, y_test: points whose loss change is measured.
        chunk_size: models trained together.
        keep_params: also return the retrained parameters (K·p memory).
    """
    idxs = _check(objective, theta_star, x, y, remove, x_test, y_test, chunk_size)
    n, k = x.shape[0], idxs.numel()
    # Row 0 of the first chunk is the control: it has nothing removed.
    all_rows = torch.cat([torch.tensor([-1]), idxs])
    params_out = torch.empty(k + 1, objective.num_params, dtype=theta_star.dtype)
    grad_norms = torch.empty(k + 1, dtype=theta_star.dtype)
    chunks = list(range(0, k + 1, chunk_size))
    for c, start in enumerate(tqdm(chunks, desc="leave-one-out", disable=not progress or len(chunks) == 1)):
        rows = all_rows[start : start + chunk_size]
        weights = torch.ones(rows.numel(), n, dtype=theta_star.dtype)
        hit = rows >= 0
        weights[torch.nonzero(hit).flatten(), rows[hit]] = 0.0
        res = fit(
            objective, theta_star.expand(rows.numel(), -1), x, y, spec,
            weights=weights, progress=progress and len(chunks) == 1, desc="leave-one-out",
        )
        params_out[start : start + rows.numel()] = res.params
        grad_norms[start : start + rows.numel()] = res.grad_norm
    return _summarise(objective, theta_star, idxs, params_out, float(grad_norms[0]), x_test, y_test, keep_params)


def loo_retrain_sequential(
    objective: Objective,
    theta_star: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    remove: Sequence[int] | torch.Tensor,
    spec: TrainSpec,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    keep_params: bool = False,
    progress: bool = True,
) -> LOOResult:
    """The plain loop: the control and each leave-one-out model trained on their own, one after another.

    Same arguments and result as :func:`loo_retrain`; K+1 times the single-model cost. For full-batch
    gradient descent the removed point is deleted from the data; for minibatch optimisers it is
    weighted 0 so that the minibatch order matches the batched version.
    """
    idxs = _check(objective, theta_star, x, y, remove, x_test, y_test, 1)
    n = x.shape[0]
    params = [fit(objective, theta_star, x, y, spec, progress=False).params[0]]
    control_grad = None
    for i in tqdm(idxs.tolist(), desc="leave-one-out (sequential)", disable=not progress):
        if spec.batch_size is None:
            keep = torch.arange(n) != i
            res = fit(objective, theta_star, x[keep], y[keep], spec, progress=False)
        else:
            w = torch.ones(n, dtype=theta_star.dtype)
            w[i] = 0.0
            res = fit(objective, theta_star, x, y, spec, weights=w, progress=False)
        params.append(res.params[0])
    control_grad = float(objective.grad(params[0], x, y).norm())
    return _summarise(objective, theta_star, idxs, torch.stack(params), control_grad, x_test, y_test, keep_params)


def _summarise(objective, theta_star, idxs, params, control_grad_norm, x_test, y_test, keep_params) -> LOOResult:
    with torch.no_grad():
        loss_star = objective.sample_losses(theta_star, x_test, y_test)
        losses = torch.stack([objective.sample_losses(t, x_test, y_test) for t in params])
    control, removed = params[0], params[1:]
    return LOOResult(
        removed=idxs,
        test_loss_star=loss_star,
        test_loss_control=losses[0],
        test_loss_removed=losses[1:],
        param_change=(removed - theta_star).norm(dim=1),
        param_change_vs_control=(removed - control).norm(dim=1),
        control_grad_norm=control_grad_norm,
        params_removed=removed.clone() if keep_params else None,
    )
