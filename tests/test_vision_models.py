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


def test_resnet18_has_the_small_image_count():
    # 11,173,962 is the standard count of CIFAR ResNet-18 (3x3 stem, 10 classes); group norm has batch norm's
    # affine parameters, so the count is the same.
    assert count_parameters(build_model("resnet18", seed=0)) == 11_173_962


@pytest.mark.parametrize("name, kwargs, shape", [
    ("lenet", {}, (4, 1, 28, 28)), ("lenet", {"in_channels": 3, "image_size": 32}, (4, 3, 32, 32)),
    ("vgg11", {}, (4, 3, 32, 32)), ("resnet18", {"in_channels": 1}, (4, 1, 28, 28)),
])
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
