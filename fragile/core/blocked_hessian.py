"""The exact Hessian of a chain of layers, one block row per layer.

For a model ``f = s_K ∘ … ∘ s_1`` whose stage ``s_ℓ`` holds the parameters ``θ_ℓ``, a forward tangent along ``θ_ℓ``
is zero below stage ℓ, and the gradient in ``θ_k`` for ``k ≥ ℓ`` needs the backward pass through the stages ≥ ℓ only.
So the block row ``H[θ_ℓ, θ_{≥ℓ}]`` is forward-over-reverse on the sub-chain ``s_K ∘ … ∘ s_ℓ`` applied to the stage's
input, computed once per chunk of data without tangents, and the blocks below the diagonal are the transposes of
those above it. For the small-MNIST CNN most parameters sit in layers whose sub-chain is a fraction of the network.

A model is a chain when it is an ``nn.Sequential`` (its ``forward`` not overridden; nested plain ``nn.Sequential``
children are flattened into their layers), or when it has a method ``sequential_layers()`` returning the modules whose
composition, applied to a batch, is its forward pass (:class:`~fragile.models.small.MLP` and
:class:`~fragile.models.small.KohLiangCNN` do). The chain is checked against the model's forward on two rows before
any work. For any other model :func:`layer_blocked_hessian` raises :class:`NotAChainError`, and
:func:`fragile.core.curvature.hessian_matrix` falls back to HVPs through the whole model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from fragile.core.objective import Objective
from fragile.errors import InvalidArgumentError, check_int

log = logging.getLogger(__name__)

# Elements of one call's tangent activations, summed over the layers it runs through (images × tangents × outputs of
# those layers per image). One op touches one layer's share, a few tens of MB in float32: about a CPU's last-level
# cache. Measured on the small-MNIST CNN on one core (whole Hessian, 1,000 digits, a shared machine, ±15%): 2^24 and
# 2^25 were fastest, 2^23 and 2^22 took 1.2-1.6× as long (more calls, each paying torch.func's ~10 ms of dispatch).
CALL_ELEMENTS = 1 << 24
MAX_TANGENTS = 128
"""Unit tangents vmapped together when ``vector_chunk`` does not cap them (more did not pay on the CNN)."""


class NotAChainError(InvalidArgumentError):
    """The model cannot be decomposed into a chain of layers (module doc); the message says why."""


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain (:func:`chain_stages`): its module, its parameters held fixed, and where its parameters in
    θ sit (``index``; ``size`` of them). Called as ``layer(theta_l, h)`` with ``theta_l = theta[index]``."""

    module: nn.Module
    fixed: dict[str, torch.Tensor]  # by local name, detached
    names: tuple[str, ...]  # local names of its parameters in θ, in the module's order
    shapes: tuple[torch.Size, ...]
    index: torch.Tensor  # (p_ℓ,) their positions in θ, concatenated in that order

    @property
    def size(self) -> int:
        return int(self.index.numel())

    def __call__(self, theta_l: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        params = dict(self.fixed)
        if self.names:
            split = theta_l.split([s.numel() for s in self.shapes])
            params.update({k: v.view(s) for k, v, s in zip(self.names, split, self.shapes)})
        return functional_call(self.module, params, (h,))


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flatten(modules: list[nn.Module]) -> list[nn.Module]:
    out = []
    for m in modules:
        out.extend(_flatten(list(m)) if _plain_sequential(m) else [m])
    return out


def _layers(model: nn.Module) -> list[nn.Module]:
    method = getattr(model, "sequential_layers", None)
    if callable(method):
        return _flatten(list(method()))
    if _plain_sequential(model):
        return _flatten(list(model))
    raise NotAChainError(
        f"the layer-blocked Hessian needs a chain of layers, and {type(model).__name__} is not one: it is not an "
        "nn.Sequential (with its own forward) and has no sequential_layers() method"
    )


def chain_stages(objective: Objective) -> list[ChainLayer]:
    """The objective's model as its chain of layers over θ (module doc); metadata only, no forward pass.

    Raises:
        NotAChainError: when the model is not a chain, a parameter is in two layers (tied weights), or a parameter of
            θ is in none.
    """
    model = objective.model
    full_name = {id(p): k for k, p in model.named_parameters(remove_duplicate=False)}
    offsets, start = {}, 0
    for name, numel in zip(objective.names, objective.numels):
        offsets[name] = (start, numel)
        start += numel
    seen: set[str] = set()
    stages = []
    for i, module in enumerate(_layers(model)):
        fixed, names, shapes, index = {}, [], [], []
        for local, param in module.named_parameters():
            name = full_name.get(id(param))
            if name is None:
                raise NotAChainError(f"layer {i} ({type(module).__name__}) has a parameter {local!r} that is not the model's")
            if name in seen:
                raise NotAChainError(f"parameter {name!r} is in two layers of the chain (tied weights)")
            seen.add(name)
            if name in offsets:
                s, n = offsets[name]
                names.append(local)
                shapes.append(param.shape)
                index.append(torch.arange(s, s + n))
            else:
                fixed[local] = param.detach()
        idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        stages.append(ChainLayer(module, fixed, tuple(names), tuple(shapes), idx))
    missing = [k for k in objective.names if k not in seen]
    if missing:
        raise NotAChainError(f"parameters {missing} of θ are in no layer of the chain")
    return stages


def _run(stages: list[ChainLayer], thetas: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    for stage, t in zip(stages, thetas):
        h = stage(t, h)
    return h


def _activation_sizes(objective: Objective, stages: list[ChainLayer], theta: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Each layer's output elements per row, after checking that the chain reproduces the model's forward on two rows.

    Raises:
        NotAChainError: when it does not.
    """
    sizes = []
    with torch.no_grad():
        h = x[:2]
        for stage in stages:
            h = stage(theta[stage.index.to(theta.device)], h)
            sizes.append(h[0].numel())
        want = objective.logits(theta, x[:2])
    tol = 100 * torch.finfo(theta.dtype).eps * max(1.0, float(want.abs().max()))
    if h.shape != want.shape or float((h - want).abs().max()) > tol:
        raise NotAChainError(
            f"the chain of layers of {type(objective.model).__name__} (sequential_layers() or its nn.Sequential "
            "children) does not reproduce its forward pass"
        )
    return sizes


def layer_blocked_hessian(
    objective: Objective,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_chunk: int | None = None,
    vector_chunk: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The p×p Hessian of the mean training objective, regulariser ``weight_decay·I`` included, of a chain of layers.

    Block row ℓ (the rows of layer ℓ's parameters in θ) is forward-over-reverse (``jvp`` of ``grad``, vmapped over
    unit tangents) through the layers ≥ ℓ only, from their input computed without tangents, and gives the columns of
    the layers ≥ ℓ; the blocks below the diagonal are the transposes of those above. The diagonal blocks are returned
    as computed, so their symmetry is a check of the computation. Rows and columns are in θ's order, whatever the
    chain's.

    Each call takes at most ``vector_chunk`` tangents (None: 128) and ``data_chunk`` images (None: all); within those
    caps the sizes are chosen per layer so that one call's tangent activations hold about 2²⁴ elements
    (:data:`CALL_ELEMENTS`: each layer's share about a CPU's last-level cache in float32).
    Chunk sums are weighted by chunk size, so the result does not depend on the chunking up to round-off.

    Cost: p HVP-equivalents, each restricted to the layers ≥ its parameter's, over the whole data set, plus one forward
    pass without tangents up to each layer; memory O(p²) for the result plus one call's tangent activations.

    Raises:
        NotAChainError: (an :class:`~fragile.errors.InvalidArgumentError`) when the model is not a chain of layers
            (module doc), before any work beyond a forward pass on two rows.
    """
    from tqdm.auto import tqdm

    if data_chunk is not None:
        check_int("data_chunk", data_chunk, minimum=1)
    if vector_chunk is not None:
        check_int("vector_chunk", vector_chunk, minimum=1)
    stages = chain_stages(objective)
    theta = theta.detach()
    sizes = _activation_sizes(objective, stages, theta, x)
    n, p, device = x.shape[0], objective.num_params, theta.device
    thetas = [theta[s.index.to(device)] for s in stages]
    trainable = [i for i, s in enumerate(stages) if s.size]
    loss = objective.output_losses

    def block_rows(i: int, h: torch.Tensor, yc: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
        upper = stages[i:]

        def mean_loss(t_i: torch.Tensor, rest: list[torch.Tensor]) -> torch.Tensor:
            return loss(_run(upper, [t_i, *rest], h), yc).mean()

        def flat_grad(t_i: torch.Tensor) -> torch.Tensor:
            g_i, g_rest = grad(mean_loss, argnums=(0, 1))(t_i, thetas[i + 1 :])
            return torch.cat([g_i, *g_rest])

        return vmap(lambda v: jvp(flat_grad, (thetas[i],), (v,))[1])(tangents)

    plan = []
    for i in trainable:
        per_image = sum(sizes[i:])
        vc = min(stages[i].size, vector_chunk or MAX_TANGENTS)
        dc = max(1, min(n, data_chunk or n, CALL_ELEMENTS // (vc * per_image)))
        plan.append((i, vc, dc))
    calls = sum(-(-n // dc) * -(-stages[i].size // vc) for i, vc, dc in plan)
    log.debug("layer-blocked Hessian, p=%d, n=%d: %d calls; (layer, tangents, images) per call: %s", p, n, calls, plan)
    # Rows and columns in the chain's order (trainable layers only), mapped to θ's order at the end.
    order = torch.cat([stages[i].index for i in trainable]).to(device)
    out = torch.empty(p, p, dtype=theta.dtype, device=device)
    bar = tqdm(total=calls, desc="Hessian blocks", disable=not progress, leave=False)
    r0 = 0
    for i, vc, dc in plan:
        start = time.perf_counter()
        r1 = r0 + stages[i].size
        rows = torch.zeros(r1 - r0, p - r0, dtype=theta.dtype, device=device)
        eye = torch.eye(r1 - r0, dtype=theta.dtype, device=device)
        for d0 in range(0, n, dc):
            xc, yc = x[d0 : d0 + dc], y[d0 : d0 + dc]
            with torch.no_grad():
                h = _run(stages[:i], thetas[:i], xc)
            for v0 in range(0, r1 - r0, vc):
                rows[v0 : v0 + vc] += block_rows(i, h, yc, eye[v0 : v0 + vc]) * (xc.shape[0] / n)
                bar.update()
        rows[:, : r1 - r0] += objective.weight_decay * eye
        out[r0:r1, r0:] = rows
        out[r1:, r0:r1] = rows[:, r1 - r0 :].T
        log.debug("block row of layer %d (%d rows × %d columns): %.1f s", i, r1 - r0, p - r0, time.perf_counter() - start)
        r0 = r1
    bar.close()
    if torch.equal(order, torch.arange(p, device=device)):
        return out
    permuted = torch.empty_like(out)
    permuted[order[:, None], order[None, :]] = out
    return permuted


__all__ = ["CALL_ELEMENTS", "MAX_TANGENTS", "ChainLayer", "NotAChainError", "chain_stages", "layer_blocked_hessian"]
