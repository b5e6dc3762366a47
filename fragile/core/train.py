"""Training K models at once on flat parameter stacks: full-batch gradient descent, minibatch SGD, Adam.

One code path serves single models (K=1), seed sweeps and leave-one-out retraining: the K models'
objectives are summed, so one backward pass gives every model its own gradient (see
:meth:`~fragile.core.objective.Objective.stacked_train_losses`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from fragile.core.curvature import objective_top_eigenvalue
from fragile.core.objective import Objective, check_weights
from fragile.errors import InvalidArgumentError, check_choice, check_int, check_positive

log = logging.getLogger(__name__)

OPTIMIZERS = ("gd", "sgd", "adam", "rmsprop")


@dataclass(frozen=True)
class TrainSpec:
    """How to train. Weight decay is not here: it is part of the :class:`Objective`.

    Attributes:
        optimizer: ``"gd"`` (full batch), ``"sgd"`` (minibatch, optional momentum), ``"adam"`` or ``"rmsprop"``;
            each follows the update of its ``torch.optim`` namesake (without its weight decay: that is in the
            objective), so results match torch's optimisers step for step.
        lr: learning rate.
        steps: number of parameter updates.
        batch_size: minibatch size for ``sgd``/``adam``/``rmsprop``; None means the full batch (required for ``gd``).
        momentum: momentum for ``sgd`` and ``rmsprop`` (0 for none).
        nesterov: Nesterov momentum for ``sgd`` (needs ``momentum > 0``).
        alpha: RMSprop's decay rate of the squared-gradient average.
        betas: Adam's moment decay rates.
        eps: Adam's and RMSprop's denominator constant.
        seed: seed of the minibatch order; every model in a stack sees the same order.
    """

    optimizer: str = "gd"
    lr: float = 0.01
    steps: int = 1000
    batch_size: int | None = None
    momentum: float = 0.0
    nesterov: bool = False
    alpha: float = 0.99
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_positive("lr", self.lr)
        check_int("steps", self.steps, minimum=0)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)
            if self.optimizer == "gd":
                raise InvalidArgumentError("batch_size must be None for optimizer='gd' (full-batch gradient descent)")
        if not 0.0 <= self.momentum < 1.0:
            raise InvalidArgumentError(f"momentum={self.momentum!r} is not allowed; it must be in [0, 1)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise InvalidArgumentError("nesterov=True is not allowed here; it needs optimizer='sgd' and momentum > 0")
        if not 0.0 <= self.alpha < 1.0:
            raise InvalidArgumentError(f"alpha={self.alpha!r} is not allowed; it must be in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise InvalidArgumentError(f"betas={self.betas!r} is not allowed; two numbers in [0, 1)")
        check_positive("eps", self.eps)
        check_int("seed", self.seed, minimum=0)

    def replace(self, **changes) -> TrainSpec:
        """A copy with some fields changed (validated again)."""
        return TrainSpec(**{**asdict(self), **changes})


@dataclass
class TrainResult:
    """Output of :func:`fit`.

    Attributes:
        params: trained parameters, (K, p).
        losses: objective value of each model before each step, (steps, K) (minibatch values for
            minibatch optimisers).
        grad_norm: norm of each model's full-batch objective gradient at the end, (K,).
        checkpoints: with ``fit(checkpoint_every=e)``, the parameters after steps ``0, e, 2e, …`` and after the
            last step, (C, K, p) (``checkpoints[0]`` is the start, ``checkpoints[-1]`` equals ``params``); else None.
        checkpoint_steps: the step count at which each checkpoint was taken (C ints); None without checkpoints.
    """

    params: torch.Tensor
    losses: torch.Tensor
    grad_norm: torch.Tensor
    checkpoints: torch.Tensor | None = None
    checkpoint_steps: list[int] | None = None


def _batches(n: int, spec: TrainSpec):
    """Minibatch index stream: shuffled epochs from a seeded generator (full batch for ``gd``)."""
    if spec.batch_size is None or spec.batch_size >= n:
        while True:
            yield None
    gen = torch.Generator().manual_seed(spec.seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - spec.batch_size + 1, spec.batch_size):
            yield perm[start : start + spec.batch_size]


def fit(
    objective: Objective,
    params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    *,
    weights: torch.Tensor | None = None,
    weight_decay: torch.Tensor | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint_every: int | None = None,
) -> TrainResult:
    """Train a stack of K models that share architecture, data and minibatch order.

    Args:
        objective: the training objective (weight decay included).
        params: starting parameters, (p,) for one model or (K, p) for a stack; finite, of ``x``'s dtype and device.
        x, y: training inputs and targets, finite (integer labels in ``[0, outputs)`` for cross-entropy:
            :meth:`~fragile.core.objective.Objective.check_inputs`, which raises before any step).
        spec: optimiser settings.
        weights: per-example weights, (n,) shared or (K, n) per model; 0 removes an example from a
            model's objective (how leave-one-out retraining is batched). None means all ones.
        weight_decay: (K,) per-model L2 coefficients overriding ``objective.weight_decay`` (so that
            runs with and without weight decay share one stack).
        progress: show a tqdm bar (also off when ``TQDM_DISABLE=1``).
        checkpoint_every: keep a copy of the parameters every this many steps (the start included) and after the
            last step, in :attr:`TrainResult.checkpoints` (what TracIn sums over); None keeps none. Storing copies
            changes no update: the parameters are the same with and without checkpoints.

    Returns:
        A :class:`TrainResult` with (K, p) parameters, even for a single (p,) start.

    Cost: ``steps`` stacked forward/backward passes; memory O(K·batch·activations), plus O(C·K·p) for C
    checkpoints; the input checks add one pass over ``x``, ``y`` and ``params`` and one forward pass on one row.
    Deterministic on CPU for a given seed.
    """
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every, minimum=1)
    objective.check_data("x", x, "y", y)
    if isinstance(params, torch.Tensor) and params.ndim == 1:
        params = params.unsqueeze(0)
    objective.check_params("params", params, stacked=True)
    # Before any step: NaN data or parameters would otherwise surface as a diverged loss blamed on the learning rate.
    objective.check_model_inputs("params", params, "x", x, "y", y)
    k, n = params.shape[0], x.shape[0]
    check_weights("weights", weights, n, k)
    if weights is not None and weights.ndim == 1:
        weights = weights.unsqueeze(0).expand(k, n)
    if weight_decay is not None:
        if (
            not isinstance(weight_decay, torch.Tensor)
            or tuple(weight_decay.shape) != (k,)
            or not bool(((weight_decay >= 0) & torch.isfinite(weight_decay)).all())
        ):
            raise InvalidArgumentError(f"weight_decay must be a tensor of {k} finite values >= 0 (one per model)")

    theta = params.detach().clone()
    losses = torch.empty(spec.steps, k, dtype=theta.dtype, device=theta.device)
    m = torch.zeros_like(theta) if spec.optimizer == "adam" or spec.momentum > 0 else None
    v = torch.zeros_like(theta) if spec.optimizer in ("adam", "rmsprop") else None
    b1, b2 = spec.betas
    stream = _batches(n, spec)
    saved: list[torch.Tensor] = []
    saved_steps: list[int] = []
    for step in tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False):
        if checkpoint_every is not None and step % checkpoint_every == 0:
            saved.append(theta.clone())
            saved_steps.append(step)
        idx = next(stream)
        xb, yb, wb = (x, y, weights) if idx is None else (x[idx], y[idx], None if weights is None else weights[:, idx])
        g, val = _stacked_grads(objective.stacked_train_losses, theta, xb, yb, wb, weight_decay)
        losses[step] = val
        if spec.optimizer == "adam":
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = m / (1 - b1 ** (step + 1))
            v_hat = v / (1 - b2 ** (step + 1))
            theta -= spec.lr * m_hat / (v_hat.sqrt() + spec.eps)
        elif spec.optimizer == "rmsprop":
            v.mul_(spec.alpha).addcmul_(g, g, value=1 - spec.alpha)
            step_dir = g / (v.sqrt() + spec.eps)
            if m is not None:
                m.mul_(spec.momentum).add_(step_dir)
                step_dir = m
            theta -= spec.lr * step_dir
        elif m is not None:
            m.mul_(spec.momentum).add_(g)
            theta -= spec.lr * (g + spec.momentum * m if spec.nesterov else m)
        else:
            theta -= spec.lr * g
        if not torch.isfinite(val).all():
            bad = torch.nonzero(~torch.isfinite(val)).flatten().tolist()
            raise InvalidArgumentError(
                f"training diverged at step {step} (non-finite loss for models {bad[:5]}); lower lr={spec.lr}"
            )
    if checkpoint_every is not None:
        saved.append(theta.clone())
        saved_steps.append(spec.steps)
    return TrainResult(
        theta,
        losses,
        _full_batch_grads(objective, theta, x, y, weights, weight_decay).norm(dim=1),
        torch.stack(saved) if checkpoint_every is not None else None,
        saved_steps if checkpoint_every is not None else None,
    )


def _stacked_grads(
    losses: Callable[..., torch.Tensor], thetas: torch.Tensor, *batch: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients and values of K models' objectives, ((K, p), (K,)), from one forward and one backward pass: row k
    of ``losses(thetas, *batch)`` depends on ``thetas[k]`` alone, so the gradient of their sum is each model's own."""
    thetas = thetas.detach().requires_grad_(True)
    with torch.enable_grad():
        values = losses(thetas, *batch)
        (g,) = torch.autograd.grad(values.sum(), thetas)
    return g, values.detach()


def _full_batch_grads(objective, theta, x, y, weights, weight_decay, chunk: int = 1024) -> torch.Tensor:
    """Each model's full-batch objective gradient, ``chunk`` examples at a time: a stack of large networks over
    all training images at once does not fit in memory (8 ResNet-18s over 4,500 images ran an H200 out of its
    139 GiB). Up to ``chunk`` examples it is the one-pass gradient, bit for bit."""
    n = x.shape[0]
    if n <= chunk:
        return _stacked_grads(objective.stacked_train_losses, theta, x, y, weights, weight_decay)[0]
    k = theta.shape[0]
    w = torch.ones(k, n, dtype=theta.dtype, device=theta.device) if weights is None else weights
    total = w.sum(dim=1)
    total = torch.where(total > 0, total, torch.ones_like(total))
    no_decay = torch.zeros(k, dtype=theta.dtype, device=theta.device)
    wd = (
        torch.full((k,), objective.weight_decay, dtype=theta.dtype, device=theta.device) if weight_decay is None else weight_decay
    )
    g = wd[:, None] * theta
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        share = w[:, sl].sum(dim=1) / total  # the chunk's weighted mean enters the full mean with this share
        gc, _ = _stacked_grads(objective.stacked_train_losses, theta, x[sl], y[sl], w[:, sl], no_decay)
        g = g + share[:, None] * gc
    return g


@dataclass(frozen=True)
class ConvergenceReport:
    """How close a trained model is to the optimum influence functions assume.

    Attributes:
        grad_norm: norm of the full-batch objective gradient.
        lambda_max: largest Hessian eigenvalue (power iteration on HVPs).
        lr_times_lambda_max: ``lr·λmax``; full-batch gradient descent stops converging near 2
            (the edge of stability). NaN when no learning rate is given.
    """

    grad_norm: float
    lambda_max: float
    lr_times_lambda_max: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def convergence_report(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float | None = None,
    data_chunk: int | None = None,
) -> ConvergenceReport:
    """Diagnostics recorded with every trained model (docs/conventions.md#convergence). Cost: one gradient and up to a few
    hundred HVPs."""
    objective.check_inputs("theta", theta, "x", x, "y", y)
    g = objective.grad(theta, x, y)
    lam = objective_top_eigenvalue(objective, theta, x, y, data_chunk=data_chunk)
    return ConvergenceReport(float(g.norm()), lam, float("nan") if lr is None else lr * lam)
