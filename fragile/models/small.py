"""Model architectures used by the paper's experiments.

Every model is an ordinary ``torch.nn.Module``; the influence code treats it as a pure function of its
flattened parameters through ``torch.func.functional_call`` (see :mod:`fragile.core.objective`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fragile.errors import InvalidArgumentError, check_choice, check_int

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}


INITS = ("default", "he")
"""How an :class:`MLP` draws its weights: PyTorch's default for ``nn.Linear`` (uniform in ±1/√fan_in, weights
and biases), or He et al.'s (normal with standard deviation √(2/fan_in) for the weights, zero biases), which keeps
the activations' scale through ReLU layers."""


class MLP(nn.Module):
    """Fully connected network: ``depth`` hidden layers of ``width`` units, then a linear read-out.

    ``depth=0`` is multinomial logistic regression (a convex objective), which the tests use as the
    case where influence functions are exact up to second order. With ``depth`` hidden layers of width
    ``w`` on ``d`` inputs and ``c`` classes there are ``(d+1)w + (depth-1)(w+1)w + (w+1)c`` parameters
    (43 + 30(depth-1) for Iris at width 5).

    Args:
        in_features: input dimension ``d``.
        num_classes: number of output logits ``c``.
        depth: number of hidden layers (>= 0).
        width: units per hidden layer (>= 1; ignored when ``depth=0``).
        activation: one of :data:`ACTIVATIONS`.
        init: one of :data:`INITS`.
    """

    def __init__(
        self, in_features: int, num_classes: int, depth: int = 1, width: int = 5, activation: str = "relu", init: str = "default"
    ):
        super().__init__()
        check_int("in_features", in_features, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("depth", depth, minimum=0)
        check_int("width", width, minimum=1)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("init", init, INITS)
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), ACTIVATIONS[activation]()]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        if init == "he":
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
        self.net = nn.Sequential(*layers)
        self.depth, self.width, self.activation, self.init = depth, width, activation, init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def sequential_layers(self) -> list[nn.Module]:
        """The layers whose composition is :meth:`forward` on a batch (for :mod:`fragile.core.blocked_hessian`)."""
        return list(self.net)


class KohLiangCNN(nn.Module):
    """The small-MNIST convolutional network of Koh & Liang (2017), reused by Basu et al.: 2,616 parameters.

    Five 3×3 convolutions with 8 channels, VALID padding and strides 1,2,1,2,1 (28→26→12→10→4→2),
    a 1×1 convolution to 10 channels, tanh after every convolution, global average pooling and a
    10×10 linear layer. Initialisation follows the released code: truncated-normal weights with
    standard deviation 2/√fan_in for convolutions and 1/√10 for the linear layer, zero biases.

    Args:
        in_channels: image channels (1 for MNIST).
        num_classes: number of output logits.
        channels: channels of the 3×3 convolutions (8 in the paper).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 8):
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("channels", channels, minimum=1)
        convs = []
        c_in = in_channels
        for stride in (1, 2, 1, 2, 1):
            convs.append(nn.Conv2d(c_in, channels, kernel_size=3, stride=stride, padding=0))
            c_in = channels
        convs.append(nn.Conv2d(channels, 10, kernel_size=1))
        self.convs = nn.ModuleList(convs)
        self.linear = nn.Linear(10, num_classes)
        for conv in self.convs:
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            nn.init.trunc_normal_(conv.weight, std=2.0 / math.sqrt(fan_in), a=-4.0 / math.sqrt(fan_in), b=4.0 / math.sqrt(fan_in))
            nn.init.zeros_(conv.bias)
        nn.init.trunc_normal_(self.linear.weight, std=1.0 / math.sqrt(10), a=-2.0 / math.sqrt(10), b=2.0 / math.sqrt(10))
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # a single image under vmap, or (C, H, W)
            x = x.unsqueeze(0)
            return self._body(x).squeeze(0)
        return self._body(x)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.tanh(conv(x))
        return self.linear(x.mean(dim=(-2, -1)))

    def sequential_layers(self) -> list[nn.Module]:
        """The layers whose composition is :meth:`forward` on a batch (N, C, H, W), sharing this network's parameters
        (for :mod:`fragile.core.blocked_hessian`): each convolution with its tanh, the global average pooling, the
        linear layer."""
        return [*(nn.Sequential(conv, nn.Tanh()) for conv in self.convs), _GlobalAveragePool(), self.linear]


class _GlobalAveragePool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


MODEL_NAMES = ("mlp", "koh_liang_cnn", "lenet", "vgg11", "vgg13", "resnet18", "resnet50")


def build_model(name: str, *, seed: int, dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    """Build a model by name with parameters initialised from ``seed``.

    Args:
        name: one of :data:`MODEL_NAMES`.
        seed: seed of the initialisation (the global RNG is left untouched).
        dtype: parameter dtype; float64 by default so that exact Hessians and the equality checks of
            batched retraining are not limited by float32 round-off.
        **kwargs: the architecture's own arguments (see :class:`MLP`, :class:`KohLiangCNN` and
            :mod:`fragile.models.vision`).
    """
    check_choice("name", name, MODEL_NAMES)
    check_int("seed", seed, minimum=0)
    from fragile.models.vision import VGG, LeNet, resnet

    cls = {
        "mlp": MLP,
        "koh_liang_cnn": KohLiangCNN,
        "lenet": LeNet,
        "vgg11": lambda **kw: VGG("vgg11", **kw),
        "vgg13": lambda **kw: VGG("vgg13", **kw),
        "resnet18": lambda **kw: resnet(18, **kw),
        "resnet50": lambda **kw: resnet(50, **kw),
    }[name]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**kwargs)
    except TypeError as exc:
        raise InvalidArgumentError(f"bad arguments for model {name!r}: {exc}") from exc
    return model.to(dtype)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
