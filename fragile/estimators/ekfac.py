"""EK-FAC influence: a Kronecker-factored Gauss–Newton approximation with refitted eigenvalues.

George et al. (2018), "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis"; used for
influence functions by Grosse et al. (2023), "Studying Large Language Model Generalization with Influence
Functions". The curvature of the mean training objective is approximated layer by layer (block-diagonal over
layers, zero between them) by the Gauss–Newton matrix of the loss: for the softmax cross-entropy it equals
the *true Fisher*, the expectation over labels drawn from the model's own predictive distribution; for
``loss="mse"`` (½ the squared error, whose Hessian in the outputs is the identity) it is ``E[JᵀJ]``.

For a layer ``s = W ā`` with input ``ā = [a, 1]`` (the constant 1 carries the bias, so one block covers
``[W | b]``) and output gradient ``g = ∂ℓ/∂s``, the per-example weight gradient is ``G = g āᵀ``. K-FAC
approximates the block's Fisher ``E[vec(G) vec(G)ᵀ]`` by ``S ⊗ A`` with ``A = E[ā āᵀ]`` and ``S = E[g gᵀ]``;
EK-FAC keeps the Kronecker eigenbasis ``Q_S ⊗ Q_A`` of that product and refits the eigenvalues to the diagonal
of the exact block in that basis, ``Λ = E_n E_{c∼p(·|x_n)} [(Q_Sᵀ G_{n,c} Q_A)²]`` (elementwise square), which
is the best diagonal in that basis in Frobenius norm. The estimator's matrix is then
``M = blockdiag_l (Q_S ⊗ Q_A) diag(Λ_l + weight_decay + λ) (Q_S ⊗ Q_A)ᵀ``: the regulariser's Hessian is
``weight_decay·I``, unchanged by any rotation, so it adds to every eigenvalue exactly, as does the damping λ.

Expectations over labels are exact, not sampled: for each example and each of the K classes, the backward pass
of the loss with label ``c`` is weighted by ``softmax(z)_c`` (K backward passes per chunk; deterministic). For
``mse`` the K output directions ``e_c`` play the labels' part: ``Σ_c e_c e_cᵀ = I`` is the output Hessian exactly.

Vectorisation convention: a block ``V`` (out × cols) is read row-major, ``vec(V)[o·cols + i] = V[o, i]``, so
``vec(Q_Sᵀ V Q_A) = (Q_S ⊗ Q_A)ᵀ vec(V)`` with ``⊗`` as in :func:`torch.kron`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fragile.core.objective import Objective
from fragile.core.solvers import Solve, relative_residual
from fragile.errors import InvalidArgumentError, SingularSystemError, check_int
from fragile.estimators.base import EstimatorOptions, SolvingEstimator, option
from fragile.estimators.registry import register

log = logging.getLogger(__name__)

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class LayerFactors:
    """The fitted EK-FAC block of one layer.

    Attributes:
        name: the module's name in the model (``named_modules()``).
        kind: ``"linear"`` or ``"conv2d"``.
        weight: name of the weight parameter in the objective's θ.
        bias: name of the bias parameter in θ, or None when the block has no bias column.
        weight_slice, bias_slice: where the weight (read as out × rest, row-major) and the bias lie in θ.
        out_features: rows of the block (output units or channels).
        in_features: columns of the block: inputs (``C·kh·kw`` patch entries for a convolution), plus 1 for the bias.
        A: (cols, cols) input factor ``E_n[Σ_t ā_t ā_tᵀ]`` (a sum over spatial positions t for convolutions).
        S: (out, out) output-gradient factor ``E_n E_c[(1/T)·Σ_t g_t g_tᵀ]`` (a mean over the T positions).
        eigvals_A, Q_A, eigvals_S, Q_S: eigendecompositions of ``A`` and ``S`` (ascending eigenvalues; eigenvectors
            in columns).
        eigenvalues: (out, cols) the corrected eigenvalues Λ; entry (o, i) belongs to the basis vector
            ``Q_S[:, o] ⊗ Q_A[:, i]``. K-FAC's own would be ``outer(eigvals_S, eigvals_A)``.
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    weight_slice: slice
    bias_slice: slice | None
    out_features: int
    in_features: int
    A: torch.Tensor | None = None
    S: torch.Tensor | None = None
    eigvals_A: torch.Tensor | None = None
    Q_A: torch.Tensor | None = None
    eigvals_S: torch.Tensor | None = None
    Q_S: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None

    def block(self, vs: torch.Tensor) -> torch.Tensor:
        """This layer's ``[W | b]`` blocks of flat vectors: (m, p) → (m, out, cols)."""
        w = vs[:, self.weight_slice].reshape(vs.shape[0], self.out_features, -1)
        if self.bias_slice is None:
            return w
        return torch.cat([w, vs[:, self.bias_slice].unsqueeze(-1)], dim=-1)

    def scatter(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """Write (m, out, cols) blocks into their places in the flat (m, p) ``out``."""
        m = blocks.shape[0]
        if self.bias_slice is None:
            out[:, self.weight_slice] = blocks.reshape(m, -1)
        else:
            out[:, self.weight_slice] = blocks[..., :-1].reshape(m, -1)
            out[:, self.bias_slice] = blocks[..., -1]


def _layer_blocks(objective: Objective) -> dict[str, LayerFactors]:
    """Map every parameter of θ to the block of a supported layer; raise naming the first that has none."""
    modules = dict(objective.model.named_modules())
    found: dict[str, dict[str, Any]] = {}
    offset = 0
    for pname, numel in zip(objective.names, objective.numels):
        where = slice(offset, offset + numel)
        offset += numel
        mod_name, _, attr = pname.rpartition(".")
        module = modules.get(mod_name)
        if not isinstance(module, SUPPORTED_LAYERS) or attr not in ("weight", "bias"):
            raise InvalidArgumentError(
                f"method='ekfac' cannot cover parameter {pname!r} (of a {type(module).__name__}): it supports the weights "
                "and biases of nn.Linear and nn.Conv2d layers only; leave that parameter out of θ (Objective(trainable=…)) "
                "or use another method"
            )
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            raise InvalidArgumentError(
                f"method='ekfac' cannot cover parameter {pname!r}: its nn.Conv2d has groups={module.groups}, "
                f"padding_mode={module.padding_mode!r}, padding={module.padding!r}; supported are groups=1, "
                "padding_mode='zeros' and numeric padding"
            )
        found.setdefault(mod_name, {"module": module})[attr] = (pname, where)
    layers: dict[str, LayerFactors] = {}
    for mod_name, entry in found.items():
        module = entry["module"]
        if "weight" not in entry:
            raise InvalidArgumentError(
                f"method='ekfac' cannot cover parameter {entry['bias'][0]!r} without its layer's weight in θ: the block is "
                "[W | b]; make the weight trainable too"
            )
        out = module.weight.shape[0]
        bias = entry.get("bias")
        layers[mod_name] = LayerFactors(
            name=mod_name,
            kind="conv2d" if isinstance(module, nn.Conv2d) else "linear",
            weight=entry["weight"][0],
            bias=None if bias is None else bias[0],
            weight_slice=entry["weight"][1],
            bias_slice=None if bias is None else bias[1],
            out_features=out,
            in_features=module.weight[0].numel() + (bias is not None),
        )
    return layers


@dataclass(frozen=True)
class EKFACOptions(EstimatorOptions):
    """Options of :class:`EKFACInfluence`."""

    vector_chunk: int = option(
        64, "vectors whose residual HVPs against H + λI are vmapped together (memory grows with it); an integer >= 1"
    )

    def __post_init__(self) -> None:
        check_int("vector_chunk", self.vector_chunk, minimum=1)


@register
class EKFACInfluence(SolvingEstimator):
    """Influence through the EK-FAC approximation of the damped Gauss–Newton matrix (see the module doc).

    ``inverse_hvp(v)`` applies, per layer block ``V`` of ``v``, ``Q_S [(Q_Sᵀ V Q_A) / (Λ + weight_decay + λ)] Q_Aᵀ``:
    the exact inverse of the EK-FAC matrix, not of ``H + λI``. Its residual against the true ``H + λI`` (one exact
    HVP per vector) is reported, and is nonzero by design: it measures the block-diagonal, Gauss–Newton and
    eigenbasis approximations together.

    Assumptions: every parameter of θ is the weight or bias of an ``nn.Linear`` or ``nn.Conv2d`` (groups=1, zero
    padding given as numbers) that the model calls exactly once per forward pass as a module (forward hooks capture
    its input and output); examples do not interact in the forward pass (no batch-norm in training mode); the
    model's output is (n, K): logits of the softmax cross-entropy, or the K outputs of ``loss="mse"`` (a callable
    loss raises, naming ``loss``). Any other parameter in θ raises
    :class:`~fragile.errors.InvalidArgumentError` at construction, before any work; a layer that runs twice, or not
    as a module, raises in the first forward pass of :meth:`prepare`. The training labels do not enter the
    curvature (the true Fisher takes labels from the model), only the training gradients.

    Convolutions follow KFC (Grosse & Martens 2016): the input factor sums the unfolded patches' outer products
    over the T output positions of each example, the output-gradient factor averages over them, so that
    ``S ⊗ A`` is KFC's Fisher approximation. The eigenvalue correction uses the exact per-example weight
    gradient ``Σ_t g_t ā_tᵀ``, so the scale convention of A and S affects neither Λ nor the influences.

    Cost: two passes over the data, ``data_chunk`` rows at a time, each one forward and K backward passes
    (K classes or outputs): the first accumulates A and S, the second Λ; then O(Σ_l (d_in³ + d_out³)) for the float64
    eigendecompositions. Memory: O(Σ_l (d_in² + d_out² + d_out·d_in)) for the factors, plus a chunk's layer
    inputs (unfolded patches: ``kh·kw`` times a convolution's input) and output gradients. Per vector, O(Σ_l
    d_out·d_in·(d_out + d_in)) to apply the inverse, plus the one HVP of the residual.

    Options: :class:`EKFACOptions`. After :meth:`prepare`, ``self.factors`` holds the fitted :class:`LayerFactors`
    by module name.
    """

    method = "ekfac"
    Options = EKFACOptions
    options: EKFACOptions

    def _check_problem(self) -> None:
        self.objective.require_loss(("cross_entropy", "mse"), "method='ekfac'")
        self.factors = _layer_blocks(self.objective)

    @property
    def residual_by_design(self) -> bool:
        return True

    # -- fitting ----------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Logits with the graph kept, each layer's input in the (n, T, cols) float64 layout and its output."""
        modules = dict(self.objective.model.named_modules())
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                if name in outputs:
                    raise InvalidArgumentError(
                        f"method='ekfac': layer {name!r} ran twice in one forward pass (shared weights); each covered layer "
                        "must run once per forward pass"
                    )
                inputs[name] = _layer_inputs(module, args[0], self.factors[name].bias is not None)
                outputs[name] = output
                # A later in-place operation (e.g. ReLU(inplace=True)) would overwrite the tensor the output
                # gradients are taken against: the rest of the model gets a copy.
                return output.clone()

            return record

        handles = [modules[name].register_forward_hook(hook(name)) for name in self.factors]
        try:
            theta = self.theta.detach().requires_grad_(True)  # so that every layer output is in the graph
            with torch.enable_grad():
                logits = self.objective.logits(theta, x)
        finally:
            for h in handles:
                h.remove()
        missing = sorted(set(self.factors) - set(outputs))
        if missing:
            raise InvalidArgumentError(
                f"method='ekfac': layers {missing} did not run as modules in the forward pass (a functional call on their "
                "weights?); forward hooks cannot see them"
            )
        if logits.ndim != 2:
            raise InvalidArgumentError(f"method='ekfac' needs (n, K) outputs; the model returned shape {tuple(logits.shape)}")
        return logits, inputs, outputs

    def _label_gradients(self, x: torch.Tensor):
        """For each class c, every layer's output gradients of the loss with label c, scaled by √softmax(z)_c
        (for ``mse``: of the output direction ``e_c``).

        Yields ``(inputs, {layer: (n, T, out) float64})`` once per class: summing squares over the classes gives
        the expectation over labels drawn from the model, exactly (for ``mse``, the output Hessian I).
        """
        logits, inputs, outputs = self._forward(x)
        mse = self.objective.loss_name == "mse"
        probs = None if mse else torch.softmax(logits.detach(), dim=-1)
        k = logits.shape[1]
        names = list(self.factors)
        for c in range(k):
            if mse:
                direction = torch.zeros_like(logits.detach())
                direction[:, c] = 1.0
            else:
                # ∂ℓ(z, c)/∂z = softmax(z) − e_c; the weight √p_c enters squared.
                direction = probs.clone()
                direction[:, c] -= 1.0
                direction *= probs[:, c : c + 1].sqrt()
            grads = torch.autograd.grad(logits, [outputs[nm] for nm in names], grad_outputs=direction, retain_graph=c < k - 1)
            yield inputs, {nm: _layer_output_grads(self.factors[nm].kind, g) for nm, g in zip(names, grads)}

    def _chunks(self, desc: str):
        step = self.data_chunk or self.n
        for start in tqdm(range(0, self.n, step), desc=desc, disable=not self.progress, leave=False):
            yield self.x_train[start : start + step]

    def _prepare(self) -> None:
        dev = self.theta.device
        for f in self.factors.values():
            f.A = torch.zeros(f.in_features, f.in_features, dtype=torch.float64, device=dev)
            f.S = torch.zeros(f.out_features, f.out_features, dtype=torch.float64, device=dev)
            f.eigenvalues = torch.zeros(f.out_features, f.in_features, dtype=torch.float64, device=dev)
        for x in self._chunks("ekfac factors"):
            for c, (inputs, grads) in enumerate(self._label_gradients(x)):
                for name, f in self.factors.items():
                    if c == 0:  # the inputs do not depend on the label
                        f.A += torch.einsum("nti,ntj->ij", inputs[name], inputs[name])
                    g = grads[name]
                    f.S += torch.einsum("nto,ntq->oq", g, g) / g.shape[1]
        for f in self.factors.values():
            f.A /= self.n
            f.S /= self.n
            f.eigvals_A, f.Q_A = torch.linalg.eigh(f.A)
            f.eigvals_S, f.Q_S = torch.linalg.eigh(f.S)
        for x in self._chunks("ekfac eigenvalues"):
            for inputs, grads in self._label_gradients(x):
                for name, f in self.factors.items():
                    # Q_Sᵀ G Q_A per example, with G = Σ_t g_t ā_tᵀ: rotate the factors, then contract over t.
                    rotated = torch.einsum("nto,nti->noi", grads[name] @ f.Q_S, inputs[name] @ f.Q_A)
                    f.eigenvalues += (rotated * rotated).sum(dim=0)
        for f in self.factors.values():
            f.eigenvalues /= self.n
        self._shift = self.objective.weight_decay + self.damping
        self._check_invertible()
        log.info(
            "ekfac: %d layers, eigenvalues in [%.3g, %.3g] before weight decay and damping",
            len(self.factors),
            min(float(f.eigenvalues.min()) for f in self.factors.values()),
            max(float(f.eigenvalues.max()) for f in self.factors.values()),
        )

    def _check_invertible(self) -> None:
        top = max(float(f.eigenvalues.max()) for f in self.factors.values())
        for f in self.factors.values():
            d = f.eigenvalues + self._shift
            # Λ is a mean of squares (>= 0); within its own round-off of 0 the inverse is noise.
            tol = math.sqrt(d.numel()) * torch.finfo(d.dtype).eps * max(top, 1.0)
            if float(d.min()) <= tol:
                why = (
                    "; softmax output gradients sum to zero over the classes, so a read-out layer has one"
                    if self.objective.loss_name == "cross_entropy"
                    else ""
                )
                raise SingularSystemError(
                    f"method='ekfac': the EK-FAC matrix is singular in layer {f.name!r} (an eigenvalue of {float(d.min()):.3g} "
                    f"with weight_decay={self.objective.weight_decay} and damping={self.damping}{why}); increase damping"
                )

    # -- solving ----------------------------------------------------------------------------------
    def apply_inverse(self, vs: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ v`` for each row of ``vs`` (m, p), M the damped EK-FAC matrix; no residual. O(Σ_l d_out·d_in·(d_out+d_in))
        per row.
        """
        self.prepare()
        v64 = vs.double()
        xs = torch.zeros_like(v64)
        for f in self.factors.values():
            rotated = f.Q_S.T @ f.block(v64) @ f.Q_A
            f.scatter(f.Q_S @ (rotated / (f.eigenvalues + self._shift)) @ f.Q_A.T, xs)
        return xs.to(vs.dtype)

    def inverse_hvp(self, v: torch.Tensor) -> Solve:
        x = self.apply_inverse(v.unsqueeze(0))[0]
        return Solve(x, relative_residual(self.hvp, self.damping, x, v), 0)

    def inverse_hvps(self, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = self.apply_inverse(vs)
        step = self.options.vector_chunk
        # The residuals' exact HVPs are vmapped ``vector_chunk`` at a time: one HVP each dominates the cost here.
        r = torch.cat(
            [self.hvp(xs[i : i + step]) + self.damping * xs[i : i + step] - vs[i : i + step] for i in range(0, len(vs), step)]
        )
        return xs, r.norm(dim=1) / vs.norm(dim=1).clamp_min(torch.finfo(vs.dtype).tiny)

    def _details(self) -> dict[str, Any]:
        return {**self.options.to_dict(), "layers": list(self.factors)}


def _layer_inputs(module: nn.Module, a: torch.Tensor, bias: bool) -> torch.Tensor:
    """A layer's input as (n, T, cols) float64 rows ``ā_t`` (patches for a convolution, with a 1 for the bias)."""
    a = a.detach().double()
    if isinstance(module, nn.Conv2d):
        if a.ndim != 4:
            raise InvalidArgumentError(
                f"method='ekfac' needs batched (n, C, H, W) inputs to nn.Conv2d; got shape {tuple(a.shape)}"
            )
        # Channel-major patches (C, kh, kw): the same order as the weight's view (out, C·kh·kw).
        a = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride).transpose(
            1, 2
        )
    else:
        a = a.reshape(a.shape[0], -1, a.shape[-1])  # extra dims are positions sharing the weight, like a convolution's
    if bias:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], dim=-1)
    return a


def _layer_output_grads(kind: str, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as (n, T, out) float64."""
    g = g.double()
    if kind == "conv2d":
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


__all__ = ["SUPPORTED_LAYERS", "EKFACInfluence", "EKFACOptions", "LayerFactors"]
