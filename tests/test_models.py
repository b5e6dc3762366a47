import math

import pytest
import torch

from fragile import InvalidArgumentError, build_model, count_parameters


def test_koh_liang_cnn_has_2616_parameters_and_the_papers_shapes():
    model = build_model("koh_liang_cnn", seed=0)
    assert count_parameters(model) == 2616
    x = torch.zeros(2, 1, 28, 28, dtype=torch.float64)
    sizes = []
    for conv in model.convs:
        x = torch.tanh(conv(x))
        sizes.append(x.shape[-1])
    assert sizes == [26, 12, 10, 4, 2, 2]
    assert model(torch.zeros(3, 1, 28, 28, dtype=torch.float64)).shape == (3, 10)


@pytest.mark.parametrize("depth", range(1, 9))
def test_iris_mlp_parameter_count_by_depth(depth):
    model = build_model("mlp", seed=0, in_features=4, num_classes=3, depth=depth, width=5)
    assert count_parameters(model) == 43 + 30 * (depth - 1)


@pytest.mark.parametrize("width", [8, 14, 20, 30, 40, 50])
def test_iris_mlp_parameter_count_by_width(width):
    model = build_model("mlp", seed=0, in_features=4, num_classes=3, depth=1, width=width)
    assert count_parameters(model) == 8 * width + 3


def test_initialisation_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("mlp", seed=5, in_features=4, num_classes=3)
    b = build_model("mlp", seed=5, in_features=4, num_classes=3)
    c = build_model("mlp", seed=6, in_features=4, num_classes=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "resnet"}, "name="),
        ({"name": "mlp", "in_features": 4, "num_classes": 3, "depth": -1}, "depth=-1"),
        ({"name": "mlp", "in_features": 4, "num_classes": 3, "activation": "gelu2"}, "activation="),
        ({"name": "mlp", "in_features": 4, "num_classes": 3, "colour": 1}, "colour"),
    ],
)
def test_bad_model_arguments_name_the_argument(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(InvalidArgumentError, match=match):
        build_model(name, seed=0, **kwargs)


def test_he_initialisation_draws_the_kaiming_scale_and_default_is_pytorchs():
    he = build_model("mlp", seed=2, in_features=400, num_classes=100, depth=2, width=300, init="he")
    default = build_model("mlp", seed=2, in_features=400, num_classes=100, depth=2, width=300)
    layers = [m for m in he.modules() if isinstance(m, torch.nn.Linear)]
    for layer in layers:
        fan_in = layer.weight.shape[1]
        assert float(layer.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.03)
        assert not layer.bias.any()
    with torch.random.fork_rng():
        torch.manual_seed(2)
        reference = torch.nn.Linear(400, 300).double()  # what the default draws first: PyTorch's own layer
    first = next(m for m in default.modules() if isinstance(m, torch.nn.Linear))
    assert torch.equal(first.weight, reference.weight) and torch.equal(first.bias, reference.bias)
    with pytest.raises(InvalidArgumentError, match="init='xavier'"):
        build_model("mlp", seed=0, in_features=4, num_classes=3, init="xavier")
