"""The deeper image networks of the paper's Table 1 (LeNet, VGG, ResNet), sized for 28×28 and 32×32 inputs.

Influence needs each example's loss to depend on that example only, and the flat-parameter code
(:mod:`fragile.core.objective`) needs a network without mutable state. Batch normalisation breaks both (batch
statistics, running-average buffers), so these networks have none: VGG is torchvision's configuration
without batch norm, and ResNet uses group normalisation (32 groups, or fewer for narrow layers), a
common choice for per-example gradients. The paper does not say which normalisation it used.
"""

from __future__ import annotations

from torch import nn

from fragile.errors import check_choice, check_int

VGG_CONFIGS = {  # torchvision's configurations "A" (VGG-11) and "B" (VGG-13)
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class LeNet(nn.Module):
    """LeNet-5 (LeCun et al. 1998): two 5×5 convolutions (6 and 16 channels) with 2×2 max pooling, then fully
    connected layers of 120 and 84 units, ReLU. A 28×28 input is padded by 2 so both sizes give 16×5×5 features:
    61,706 parameters for one input channel and 10 classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_choice("image_size", image_size, (28, 32))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2 if image_size == 28 else 0),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class VGG(nn.Module):
    """torchvision's VGG-11/13 convolutions (no batch norm) for 32×32 inputs: after five poolings the map is
    1×1, so the 4,096-unit classifier of the 224×224 version becomes one linear layer from the last features.

    ``width`` is the first layer's channels (torchvision: 64); every layer scales with it, so ``width=8``
    is the same architecture at 1/64 of the cost, for CPU runs."""

    def __init__(self, depth: str = "vgg11", in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        check_choice("depth", depth, tuple(VGG_CONFIGS))
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("width", width, minimum=1)
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v * width // 64, 3, padding=1), nn.ReLU()]
                c = v * width // 64
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def resnet(depth: int = 18, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> nn.Module:
    """torchvision's ResNet-18/50 (its residual blocks and initialisation) with the small-image stem (a 3×3
    stride-1 convolution, no max pooling) and group normalisation in place of batch normalisation (module
    docstring). ``width`` is the stem's channels (torchvision: 64); the four stages have ``width·(1, 2, 4, 8)``
    (times 4 out of a ResNet-50 bottleneck), so ``width=8`` is the same depth and topology at ~1/64 of the cost."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

    check_choice("depth", depth, (18, 50))
    check_int("in_channels", in_channels, minimum=1)
    check_int("num_classes", num_classes, minimum=2)
    check_int("width", width, minimum=1)
    block, counts = (BasicBlock, (2, 2, 2, 2)) if depth == 18 else (Bottleneck, (3, 4, 6, 3))
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False), _group_norm(width), nn.ReLU()]
    inplanes = width
    for stage, count in enumerate(counts):
        planes = width * 2**stage
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    conv1x1(inplanes, planes * block.expansion, stride), _group_norm(planes * block.expansion)
                )
            layers.append(block(inplanes, planes, stride, downsample, norm_layer=_group_norm))
            inplanes = planes * block.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
