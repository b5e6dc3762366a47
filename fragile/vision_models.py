"""The deeper image networks of the paper's Table 1 (LeNet, VGG, ResNet), sized for 28×28 and 32×32 inputs.

Influence needs each example's loss to depend on that example only, and the flat-parameter code
(:mod:`fragile.objective`) needs a network without mutable state. Batch normalisation breaks both (batch
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
            nn.Conv2d(in_channels, 6, 5, padding=2 if image_size == 28 else 0), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class VGG(nn.Module):
    """torchvision's VGG-11/13 convolutions (no batch norm) for 32×32 inputs: after five poolings the map is
    1×1, so the 4,096-unit classifier of the 224×224 version becomes one linear layer from 512 features."""

    def __init__(self, depth: str = "vgg11", in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        check_choice("depth", depth, tuple(VGG_CONFIGS))
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def resnet(depth: int = 18, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18/50 with the small-image stem (a 3×3 stride-1 convolution, no max pooling) and
    group normalisation in place of batch normalisation (module docstring)."""
    from torchvision.models import resnet18, resnet50

    check_choice("depth", depth, (18, 50))
    check_int("in_channels", in_channels, minimum=1)
    check_int("num_classes", num_classes, minimum=2)
    model = (resnet18 if depth == 18 else resnet50)(weights=None, num_classes=num_classes, norm_layer=_group_norm)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
