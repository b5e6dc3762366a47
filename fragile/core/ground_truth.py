"""Leave-one-out ground truth: retrain warm-started from θ* with one point removed, plus the drift control.

The paper's protocol (docs/protocol.md#definitions): each leave-one-out model starts at θ* and trains a fixed number
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

from fragile.core.objective import Objective
from fragile.core.train import TrainSpec, fit
from fragile.errors import InvalidArgumentError, check_choice, check_indices, check_int

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

    def against_control(self) -> LOOResult:
        """The same retraining measured against its control: ``actual`` is ``L(θ₋ᵢ) − L(θ_control)``, ``drift`` is
        zero and ``param_change`` is ``‖θ₋ᵢ − θ_control‖``.

        Of :func:`loo_retrain` from θ* this is the drift-corrected leave-one-out: what continued training does on
        its own (an unconverged θ*, minibatch noise) cancels, what the removal does remains. Of :func:`loo_retrain`
        from the *initialisation* θ₀ with the original training's spec (same minibatch order and length) it is
        cold-start leave-one-out (Bae et al. 2022), whose control is θ* itself when training is deterministic.
        """
        return LOOResult(
            self.removed,
            self.test_loss_control,
            self.test_loss_control,
            self.test_loss_removed,
            self.param_change_vs_control,
            self.param_change_vs_control,
            self.control_grad_norm,
            self.params_removed,
        )


def _check(objective, theta_star, x, y, remove, x_test, y_test, chunk_size) -> torch.Tensor:
    """Every check of a retraining call's arguments, before any training: shapes, finite θ* and data, labels within
    the model's outputs, one dtype and device (one pass over each tensor, one forward pass on one row); returns the
    indices to remove."""
    objective.check_data("x", x, "y", y)
    objective.check_data("x_test", x_test, "y_test", y_test)
    objective.check_params("theta_star", theta_star)
    if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
        raise InvalidArgumentError(f"x_test rows have shape {tuple(x_test.shape[1:])} but x rows have {tuple(x.shape[1:])}")
    objective.check_model_inputs("theta_star", theta_star, "x", x, "y", y)
    objective.check_model_inputs("theta_star", theta_star, "x_test", x_test, "y_test", y_test)
    check_int("chunk_size", chunk_size, minimum=1)
    if x.shape[0] < 2:
        raise InvalidArgumentError("leave-one-out needs at least 2 training points")
    return check_indices("remove", remove, x.shape[0])


def removal_example_weight(removal_weight: float | None, n: int) -> float:
    """The example weight that gives a removed point removal weight ε in a weighted-mean objective.

    Down-weighting point m by ε, ``(1/n)Σ_j L(z_j) − ε·L(z_m)`` with ``L`` a point's share of the objective
    (loss plus ``wd/2‖θ‖²``), is ``(1 − ε)`` times the weighted mean with weight ``1 − nε`` on m and 1
    elsewhere, plus the regulariser: the same minimiser. ε = 1/n (None) is a removal, weight 0.

    Raises:
        InvalidArgumentError: unless 0 < ε <= 1/n.
    """
    if removal_weight is None:
        return 0.0
    if not 0 < removal_weight <= 1.0 / n:
        raise InvalidArgumentError(
            f"removal_weight={removal_weight!r} is not allowed; it must be in (0, 1/n] = (0, {1.0 / n:.6g}] (1/n is a removal)"
        )
    return 1.0 - n * removal_weight


@dataclass(frozen=True)
class LOOTask:
    """One trained model's leave-one-out job, for :func:`loo_retrain_many`.

    Attributes:
        theta_star: the trained parameters to warm-start from, (p,).
        remove: indices whose removal is simulated, one model each.
        x_test, y_test: points whose loss change is measured.
        weight_decay: this model's L2 coefficient (None: the objective's).
    """

    theta_star: torch.Tensor
    remove: Sequence[int] | torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    weight_decay: float | None = None


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
    removal_weight: float | None = None,
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
        removal_weight: ε, how much of each point is removed (:func:`removal_example_weight`); None = 1/n,
            the whole point. Small ε probes the first-order response that influence functions linearise.
    """
    task = LOOTask(theta_star, remove, x_test, y_test)
    return loo_retrain_many(
        objective,
        [task],
        x,
        y,
        spec,
        chunk_size=chunk_size,
        keep_params=keep_params,
        progress=progress,
        removal_weight=removal_weight,
    )[0]


def loo_retrain_many(
    objective: Objective,
    tasks: Sequence[LOOTask],
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    *,
    chunk_size: int = 64,
    keep_params: bool = False,
    progress: bool = True,
    removal_weight: float | None = None,
) -> list[LOOResult]:
    """:func:`loo_retrain` for several trained models (seeds, weight decays) in the same stacks.

    All controls and leave-one-out models of all tasks are trained together, ``chunk_size`` at a time,
    so many small jobs cost about as much as one large one. Every task is checked before any training.
    """
    if not tasks:
        raise InvalidArgumentError("tasks is empty; give at least one LOOTask")
    n = x.shape[0]
    idxs = [_check(objective, t.theta_star, x, y, t.remove, t.x_test, t.y_test, chunk_size) for t in tasks]
    for t in tasks:
        if t.weight_decay is not None and not t.weight_decay >= 0:
            raise InvalidArgumentError(f"LOOTask.weight_decay={t.weight_decay!r} is not allowed; it must be >= 0")
    removed_weight = removal_example_weight(removal_weight, n)
    dtype, device = tasks[0].theta_star.dtype, tasks[0].theta_star.device
    starts, removed, wds = [], [], []
    for t, ix in zip(tasks, idxs):
        models = [_NOTHING, *ix.split(1)]  # the control first, then one model per removed point
        starts.append(t.theta_star.detach().expand(len(models), -1))
        removed += models
        wd = objective.weight_decay if t.weight_decay is None else t.weight_decay
        wds.append(torch.full((len(models),), float(wd), dtype=dtype, device=device))
    params_out, grad_norms = _retrain_without(
        objective,
        torch.cat(starts),
        removed,
        removed_weight,
        x,
        y,
        spec,
        weight_decay=torch.cat(wds),
        chunk_size=chunk_size,
        progress=progress,
        desc="leave-one-out",
    )
    results, offset = [], 0
    for t, ix in zip(tasks, idxs):
        size = ix.numel() + 1
        results.append(
            _summarise(
                objective,
                t.theta_star,
                ix,
                params_out[offset : offset + size],
                float(grad_norms[offset]),
                t.x_test,
                t.y_test,
                keep_params,
            )
        )
        offset += size
    return results


_NOTHING = torch.empty(0, dtype=torch.long)
"""The removed indices of a control model: none."""


def _retrain_without(
    objective: Objective,
    starts: torch.Tensor,
    removed: Sequence[torch.Tensor],
    removed_weight: float,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    *,
    weight_decay: torch.Tensor | None,
    chunk_size: int,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one model per row of ``starts`` (M, p), model r with example weight ``removed_weight`` on the indices
    ``removed[r]`` and 1 elsewhere, as stacks of ``chunk_size`` models on the same minibatch order (``spec.seed``).

    Returns the trained parameters (M, p) and each model's full-batch gradient norm (M,). ``weight_decay`` (M,) gives
    each model its own L2 coefficient (None: the objective's). One progress bar: over the stacks when there are
    several, over the one stack's steps otherwise. Cost: ``ceil(M/chunk_size)·spec.steps`` stacked steps; the example
    weights are built a stack at a time, so memory is ``chunk_size`` models' activations and ``chunk_size·n`` weights.
    """
    total, n = starts.shape[0], x.shape[0]
    dtype, device = starts.dtype, starts.device
    params = torch.empty(total, objective.num_params, dtype=dtype, device=device)
    grad_norms = torch.empty(total, dtype=dtype, device=device)
    chunks = list(range(0, total, chunk_size))
    for start in tqdm(chunks, desc=desc, disable=not progress or len(chunks) == 1):
        rows = slice(start, min(start + chunk_size, total))
        weights = torch.ones(rows.stop - rows.start, n, dtype=dtype, device=device)
        for r, idx in enumerate(removed[rows]):
            weights[r, idx] = removed_weight
        res = fit(
            objective,
            starts[rows],
            x,
            y,
            spec,
            weights=weights,
            weight_decay=None if weight_decay is None else weight_decay[rows],
            progress=progress and len(chunks) == 1,
            desc=desc,
        )
        params[rows] = res.params
        grad_norms[rows] = res.grad_norm
    return params, grad_norms


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
    removal_weight: float | None = None,
) -> LOOResult:
    """The plain loop: the control and each leave-one-out model trained on their own, one after another.

    Same arguments and result as :func:`loo_retrain`; K+1 times the single-model cost. For full-batch
    gradient descent a removed point is deleted from the data; for minibatch optimisers, and for a partial
    ``removal_weight``, it is weighted instead, so that the minibatch order matches the batched version.
    """
    idxs = _check(objective, theta_star, x, y, remove, x_test, y_test, 1)
    n = x.shape[0]
    removed_weight = removal_example_weight(removal_weight, n)
    params = [fit(objective, theta_star, x, y, spec, progress=False).params[0]]
    for i in tqdm(idxs.tolist(), desc="leave-one-out (sequential)", disable=not progress):
        if spec.batch_size is None and removal_weight is None:
            keep = torch.arange(n, device=x.device) != i
            res = fit(objective, theta_star, x[keep], y[keep], spec, progress=False)
        else:
            w = torch.ones(n, dtype=theta_star.dtype, device=theta_star.device)
            w[i] = removed_weight
            res = fit(objective, theta_star, x, y, spec, weights=w, progress=False)
        params.append(res.params[0])
    control_grad = float(objective.grad(params[0], x, y).norm())
    return _summarise(objective, theta_star, idxs, torch.stack(params), control_grad, x_test, y_test, keep_params)


def _summarise(objective, theta_star, idxs, params, control_grad_norm, x_test, y_test, keep_params) -> LOOResult:
    with torch.no_grad():
        loss_star = objective.measurements(theta_star, x_test, y_test)
        losses = torch.stack([objective.measurements(t, x_test, y_test) for t in params])
    control, removed = params[0], params[1:]
    return LOOResult(  # on the CPU whatever the device: these are small and every caller reads them as numbers
        removed=idxs.cpu(),
        test_loss_star=loss_star.cpu(),
        test_loss_control=losses[0].cpu(),
        test_loss_removed=losses[1:].cpu(),
        param_change=(removed - theta_star).norm(dim=1).cpu(),
        param_change_vs_control=(removed - control).norm(dim=1).cpu(),
        control_grad_norm=control_grad_norm,
        params_removed=removed.cpu().clone() if keep_params else None,
    )


@dataclass
class GroupResult(LOOResult):
    """:class:`LOOResult` for groups: row g of every (K, ·) field is the model retrained without group g.

    Attributes:
        groups: the removed groups, as index tensors (``removed`` is their position, 0 … K−1).
    """

    groups: list[torch.Tensor] | None = None


def group_retrain(
    objective: Objective,
    theta_star: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Sequence[Sequence[int]],
    spec: TrainSpec,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    chunk_size: int = 64,
    progress: bool = True,
) -> GroupResult:
    """Warm-started retraining without each *group* of training points, with the drift control (the paper's
    group-influence study, appendix): the control and one model per group train as stacks of ``chunk_size``,
    each group weighted 0 in its own model's objective, every model on the same minibatch order.

    Cost: as :func:`loo_retrain` with one model per group. A group of one point gives that point's
    leave-one-out model.

    Raises:
        InvalidArgumentError: no groups, or a group that is empty, repeats an index, or leaves the range.
    """
    if not groups:
        raise InvalidArgumentError("groups is empty; give at least one group of training indices")
    n = x.shape[0]
    members = [check_indices(f"groups[{g}]", grp, n) for g, grp in enumerate(groups)]
    _check(objective, theta_star, x, y, [0], x_test, y_test, chunk_size)
    params, grad_norms = _retrain_without(
        objective,
        theta_star.detach().expand(len(members) + 1, -1),
        [_NOTHING, *members],  # row 0: the control
        0.0,
        x,
        y,
        spec,
        weight_decay=None,
        chunk_size=chunk_size,
        progress=progress,
        desc="group retraining",
    )
    control_grad_norm = float(grad_norms[0])
    base = _summarise(objective, theta_star, torch.arange(len(members)), params, control_grad_norm, x_test, y_test, False)
    return GroupResult(**{f: getattr(base, f) for f in base.__dataclass_fields__}, groups=[m.cpu() for m in members])


@dataclass
class PBRFResult(LOOResult):
    """:class:`LOOResult` of the proximal response functions (no control: ``test_loss_control`` is θ*'s, so
    ``drift`` is 0).

    Attributes:
        objective_grad_norm: (K,) ‖∇F‖ of each proximal objective at its returned minimiser (how well it was solved).
    """

    objective_grad_norm: torch.Tensor | None = None


FIT_TERMS = ("bregman", "objective")
"""What a proximal response function fits near θ*: the loss's Bregman divergence (the PBRF) or the objective itself."""


def pbrf_retrain(
    objective: Objective,
    theta_star: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    remove: Sequence[int] | torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    damping: float,
    fit_term: str = "bregman",
    epsilon: float | None = None,
    max_iter: int = 500,
    tolerance: float = 1e-10,
    chunk_size: int = 64,
) -> PBRFResult:
    """The proximal Bregman response function (Bae et al. 2022), the quantity damped Gauss–Newton influence
    functions provably approximate, or with ``fit_term="objective"`` their proximal response function: for each
    removed point m,

        θ_m = argmin_θ  (1/n) Σ_j D(z_j(θ), z_j(θ*)) + ((weight_decay + damping)/2) ‖θ − θ*‖² − ε · L(z_m, θ)   (PBRF)
        θ_m = argmin_θ  J(θ) + (damping/2) ‖θ − θ*‖² − ε · L(z_m, θ)                                              (objective)

    with D the loss's Bregman divergence in the model outputs (:meth:`~fragile.core.objective.Objective.output_bregman`;
    for cross-entropy :func:`~fragile.core.objective.bregman_cross_entropy`, the KL of the softmaxes), the
    regulariser's own Bregman divergence folded into the proximity term, J the training objective (mean loss plus
    weight decay), and ``L(z_m) = ℓ(z_m) + (wd/2)‖θ‖²`` the removed point's share of the objective (the estimators'
    convention, :mod:`fragile.estimators.base`). ``epsilon`` defaults to 1/n, a removal; to first order
    θ_m − θ* = ε (G + (wd + λ) I)⁻¹ ∇L(z_m) for the PBRF, G the Gauss–Newton matrix at θ*.

    The objective's version is leave-one-out solved to convergence from θ* and kept near it by the damping: the
    step between warm-started leave-one-out (damping 0, trained to convergence rather than for a fixed number of
    steps) and the PBRF, from which it differs by J's gradient at θ* (non-convergence) and by the loss's curvature
    beyond the outputs' Gauss–Newton part.

    The points' problems are solved together, ``chunk_size`` at a time, as one full-batch L-BFGS run (strong-Wolfe
    line search) on the stack of their parameters from θ* (the problems are independent, so the stack's minimiser
    is each one's): ``max_iter`` iterations at most, each a few vmapped forward/backward passes over the training
    set; memory of ``chunk_size`` models. ``objective_grad_norm`` reports each problem's own final gradient.

    Raises:
        InvalidArgumentError: bad shapes or indices, negative ``damping``, ``fit_term`` not in :data:`FIT_TERMS`,
            non-positive ``epsilon``.
    """
    check_choice("fit_term", fit_term, FIT_TERMS)
    idx = _check(objective, theta_star, x, y, remove, x_test, y_test, chunk_size)
    if not damping >= 0:
        raise InvalidArgumentError(f"damping={damping!r} is not allowed; it must be >= 0")
    n = x.shape[0]
    eps = 1.0 / n if epsilon is None else epsilon
    if not eps > 0:
        raise InvalidArgumentError(f"epsilon={epsilon!r} is not allowed; it must be > 0 (1/n is a removal)")
    check_int("max_iter", max_iter, minimum=1)
    theta_star = theta_star.detach()
    with torch.no_grad():
        z_star = objective.logits(theta_star, x)
        loss_star = objective.measurements(theta_star, x_test, y_test)
    stacked_logits = torch.func.vmap(objective.logits, in_dims=(0, None))
    point_loss = torch.func.vmap(lambda t, xm, ym: objective.sample_losses(t, xm.unsqueeze(0), ym.unsqueeze(0))[0])
    # The regulariser's Bregman divergence is (wd/2)‖θ − θ*‖²: in the PBRF it joins the damping in one proximity term.
    proximity = objective.weight_decay + damping if fit_term == "bregman" else damping

    def fit_values(thetas: torch.Tensor) -> torch.Tensor:
        if fit_term == "bregman":
            return objective.output_bregman(stacked_logits(thetas, x), z_star, y).mean(-1)
        return objective.stacked_train_losses(thetas, x, y)

    losses, changes, grad_norms = [], [], []
    for start in range(0, idx.numel(), chunk_size):
        rows = idx[start : start + chunk_size]
        xm, ym = x[rows], y[rows]

        def f(thetas: torch.Tensor, xm: torch.Tensor = xm, ym: torch.Tensor = ym) -> torch.Tensor:
            diff = thetas - theta_star
            removed = point_loss(thetas, xm, ym) + objective.regulariser(thetas)
            return fit_values(thetas) + 0.5 * proximity * (diff * diff).sum(-1) - eps * removed

        # The problems are independent, so their sum is minimised where each one is: one L-BFGS run on the stack.
        thetas = theta_star.expand(rows.numel(), -1).clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [thetas],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=tolerance,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure(opt: torch.optim.LBFGS = opt, thetas: torch.Tensor = thetas) -> torch.Tensor:
            opt.zero_grad()
            value = f(thetas).sum()
            value.backward()
            return value

        opt.step(closure)
        thetas = thetas.detach()
        grad_norms.append(torch.func.grad(lambda t: f(t).sum())(thetas).norm(dim=1))
        with torch.no_grad():
            losses.append(torch.stack([objective.measurements(t, x_test, y_test) for t in thetas]))
            changes.append((thetas - theta_star).norm(dim=1))
    change = torch.cat(changes)
    return PBRFResult(
        idx.cpu(),
        loss_star.cpu(),
        loss_star.cpu().clone(),
        torch.cat(losses).cpu(),
        change.cpu(),
        change.cpu(),
        float("nan"),
        objective_grad_norm=torch.cat(grad_norms).cpu(),
    )
