"""LiSSA influence (Koh & Liang's stochastic estimator): a truncated Neumann series with minibatch HVPs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from fragile.core.curvature import Spectrum, hvp, top_eigenvalue
from fragile.core.solvers import LissaRecursion, Solve, check_optional_bound, lissa_ihvps, solve_in_chunks
from fragile.errors import check_int, check_positive
from fragile.estimators.base import EstimatorOptions, SolvingEstimator, check_optional_int, option
from fragile.estimators.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LissaOptions(EstimatorOptions):
    """Options of :class:`LissaInfluence`."""

    depth: int = option(5000, "recursion steps (minibatch HVPs) per repeat; an integer >= 1")
    repeats: int = option(1, "independent recursions averaged; an integer >= 1")
    batch_size: int | None = option(
        None, "training examples per minibatch HVP; an integer in [1, n], or None for the full batch (deterministic)"
    )
    scale: float | None = option(
        None,
        (
            "the series' scale s (it converges when the spectrum of H + λI lies in (0, 2s)); a finite number > 0, "
            "or None for scale_margin·(|λmax| + λ) with λmax from power iteration on HVPs"
        ),
    )
    scale_margin: float = option(1.5, "the factor on |λmax| + λ when scale is None; a finite number > 0")
    power_rtol: float = option(
        1e-6,
        (
            "the power iteration for λmax stops when it changes by less than this, relative; a finite number > 0 (the "
            "margin makes 1e-3 enough for the scale, and it saves most of the iteration's full-data HVPs)"
        ),
    )
    seed: int = option(0, "seed of the minibatch draws and of the power iteration's start; an integer >= 0")
    growth_tolerance: float = option(
        10.0,
        (
            "divergence test: a recursion whose iterate passes ‖h_j‖ > growth_tolerance·(j+1)·‖v‖ has diverged (and raises); "
            "a finite number > 0"
        ),
    )
    max_residual: float | None = option(
        10.0,
        (
            "the largest final relative residual ‖(H+λI)x − v‖/‖v‖ returned as a solution; a solve above it raises "
            "SolverDivergedError (the growth test misses slow divergence). A finite number > 0, or None to return every "
            "solve; the default 10 is ten times worse than returning x = 0, whose residual is 1"
        ),
    )
    vector_chunk: int = option(
        8, "right-hand sides whose recursions run together, one vmapped minibatch HVP per step; an integer >= 1"
    )

    def __post_init__(self) -> None:
        check_int("depth", self.depth, minimum=1)
        check_int("repeats", self.repeats, minimum=1)
        check_optional_int("batch_size", self.batch_size, minimum=1)
        if self.scale is not None:
            check_positive("scale", self.scale)
        check_positive("scale_margin", self.scale_margin)
        check_positive("power_rtol", self.power_rtol)
        check_int("seed", self.seed, minimum=0)
        check_positive("growth_tolerance", self.growth_tolerance)
        check_optional_bound("max_residual", self.max_residual)
        check_int("vector_chunk", self.vector_chunk, minimum=1)


@register
class LissaInfluence(SolvingEstimator):
    """Koh & Liang's stochastic estimator (LiSSA): a truncated Neumann series with minibatch HVPs.

    :meth:`inverse_hvps` (hence :meth:`influences`) runs ``vector_chunk`` right-hand sides' recursions together
    (:func:`~fragile.core.solvers.lissa_ihvps`): the same minibatches, in the same seeded order, as each would draw
    alone, with one HVP vmapped over the chunk per step. Cost: ``depth·repeats`` such HVPs per chunk, plus the
    power iteration's full-data HVPs once when ``scale`` is None; memory O(vector_chunk·p) for the iterates plus
    ``vector_chunk`` times one minibatch HVP's activations. Options: :class:`LissaOptions`. Divergence raises
    :class:`~fragile.errors.SolverDivergedError`: an iterate that grows past the growth test, or a final relative
    residual above ``max_residual`` (checked on each chunk's residuals, which are computed anyway: no extra HVP).
    """

    method = "lissa"
    Options = LissaOptions
    options: LissaOptions

    def _check_problem(self) -> None:
        if self.options.batch_size is not None:
            check_int("batch_size", self.options.batch_size, minimum=1, maximum=self.n)

    def _prepare(self) -> None:
        o = self.options
        lam = top_eigenvalue(self.hvp, self.p, dtype=self.theta.dtype, rtol=o.power_rtol, seed=o.seed, device=self.theta.device)
        self._spectrum = Spectrum(lam, float("nan"), -1, 0.0)
        self.scale = float(o.scale) if o.scale is not None else o.scale_margin * (abs(lam) + self.damping)
        log.info("lissa: λmax=%.4g, scale=%.4g", lam, self.scale)

    def _batch_hvp(self, v: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """``H_b v`` on the minibatch ``idx`` (None: all data); ``v`` (p,) or (m, p), vmapped by :func:`hvp`."""
        if idx is None:
            return self.hvp(v)
        return hvp(self.objective, self.theta, self.x_train[idx], self.y_train[idx], v, data_chunk=self.data_chunk)

    def _recursion(self) -> LissaRecursion:
        o = self.options
        return LissaRecursion(
            n=self.n,
            damping=self.damping,
            scale=self.scale,
            depth=o.depth,
            repeats=o.repeats,
            batch_size=o.batch_size,
            seed=o.seed,
            growth_tolerance=o.growth_tolerance,
            max_residual=o.max_residual,
        )

    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        self.prepare()
        return lissa_ihvps(self._batch_hvp, v.unsqueeze(0), self._recursion(), exact_matvec=self.hvp)[0]

    def inverse_hvps(self, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.prepare()
        recursion = self._recursion()
        solves = solve_in_chunks(
            lambda chunk: lissa_ihvps(self._batch_hvp, chunk, recursion, exact_matvec=self.hvp), vs, self.options.vector_chunk
        )
        return solves.x, solves.residuals.cpu()  # residuals on the CPU, as the one-at-a-time path returned them

    def _details(self) -> dict[str, Any]:
        return {**self.options.to_dict(), "scale_used": getattr(self, "scale", None)}


__all__ = ["LissaInfluence", "LissaOptions"]
