"""The Table 1 networks: parameter counts from their layer arithmetic, and that an example's output does not
depend on the rest of its batch (no batch normalisation), which per-example influence needs."""

import pytest
import torch

from fragile import Objective, build_model, count_parameters
from fragile.errors import InvalidArgumentError


def conv(c_in, c_out, k, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_lenet_and_vgg_counts_follow_their_layers():
    lenet = conv(1, 6, 5) + conv(6, 16, 5) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert count_parameters(build_model("lenet", seed=0)) == lenet == 61_706
    widths = [64, 128, 256, 256, 512, 512, 512, 512]
    vgg11 = sum(conv(a, b, 3) for a, b in zip([3] + widths[:-1], widths, strict=True)) + 512 * 10 + 10
    assert count_parameters(build_model("vgg11", seed=0)) == vgg11
    narrow = [w // 8 for w in widths]  # width 8: every layer at 1/8 of the channels
    vgg11_w8 = sum(conv(a, b, 3) for a, b in zip([1] + narrow[:-1], narrow, strict=True)) + 64 * 10 + 10
    assert count_parameters(build_model("vgg11", seed=0, width=8, in_channels=1)) == vgg11_w8


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_at_full_width_has_torchvisions_layers(depth):
    # The same parameter shapes, in the same order, as torchvision's ResNet with the small-image stem.
    from torch import nn
    from torchvision.models import resnet18, resnet50

    ref = (resnet18 if depth == 18 else resnet50)(weights=None, num_classes=10, norm_layer=lambda c: nn.GroupNorm(min(32, c), c))
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ours = build_model(f"resnet{depth}", seed=0)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]


def test_resnet_width_scales_every_stage():
    # width 8, one input channel: stem 1->8, stages 8/16/32/64 (BasicBlock), head 64->10, GroupNorm affine 2 per channel.
    def basic(c_in, c_out, stride):
        down = conv(c_in, c_out, 1, bias=False) + 2 * c_out if stride != 1 or c_in != c_out else 0
        return conv(c_in, c_out, 3, bias=False) + 2 * c_out + conv(c_out, c_out, 3, bias=False) + 2 * c_out + down

    total = conv(1, 8, 3, bias=False) + 2 * 8
    c = 8
    for stage in range(4):
        out = 8 * 2**stage
        total += basic(c, out, 1 if stage == 0 else 2) + basic(out, out, 1)
        c = out
    total += 64 * 10 + 10
    assert count_parameters(build_model("resnet18", seed=0, width=8, in_channels=1)) == total


def test_resnet18_has_the_small_image_count():
    # 11,173,962 is the standard count of CIFAR ResNet-18 (3x3 stem, 10 classes); group norm has batch norm's
    # affine parameters, so the count is the same.
    assert count_parameters(build_model("resnet18", seed=0)) == 11_173_962


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("lenet", {}, (4, 1, 28, 28)),
        ("lenet", {"in_channels": 3, "image_size": 32}, (4, 3, 32, 32)),
        ("vgg11", {}, (4, 3, 32, 32)),
        ("resnet18", {"in_channels": 1}, (4, 1, 28, 28)),
        ("resnet50", {"in_channels": 1, "width": 8}, (4, 1, 28, 28)),
    ],
)
def test_an_example_does_not_see_its_batch(name, kwargs, shape):
    model = build_model(name, seed=1, dtype=torch.float64, **kwargs)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    together = Objective(model).logits(Objective(model).initial_params(), x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(together, alone, rtol=1e-10, atol=1e-12)


def test_same_seed_same_weights_and_bad_arguments_are_named():
    a, b = build_model("vgg13", seed=3), build_model("vgg13", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(InvalidArgumentError, match="image_size=30 is not allowed"):
        build_model("lenet", seed=0, image_size=30)
    with pytest.raises(InvalidArgumentError, match="in_channels"):
        build_model("resnet50", seed=0, in_channels=0)
