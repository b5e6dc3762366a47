"""torchvision classifiers with weights from a file or torchvision's cache (written here: nothing is downloaded)."""

import pytest
import torch

from fragile import Objective
from fragile.errors import InvalidArgumentError
from fragile.models.pretrained import cached_weights_path, imagenet_classifier


def test_weights_come_from_a_file_or_torchvisions_cache(tmp_path, monkeypatch):
    source = imagenet_classifier("resnet18", num_classes=1000, seed=3)
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    loaded = imagenet_classifier("resnet18", str(path), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert not loaded.training  # eval mode: batch norm uses its running statistics
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InvalidArgumentError, match="weights='torchvision' is not allowed here: .* is not on torchvision's cache"):
        imagenet_classifier("resnet18", "torchvision")
    cached = cached_weights_path("resnet18")
    assert cached.name == "resnet18-f37072fd.pth" and str(tmp_path) in str(cached)
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    from_cache = imagenet_classifier("resnet18", "torchvision")
    assert torch.equal(from_cache.fc.weight, source.fc.weight)


def test_weights_that_do_not_fit_are_refused_by_name(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(imagenet_classifier("resnet18").state_dict(), path)
    with pytest.raises(InvalidArgumentError, match="does not fit torchvision's resnet18"):
        imagenet_classifier("resnet18", str(path), num_classes=10)
    with pytest.raises(InvalidArgumentError, match="is not on disk"):
        imagenet_classifier("resnet18", str(tmp_path / "missing.pt"))


def test_in_eval_mode_an_examples_loss_does_not_see_its_batch():
    model = imagenet_classifier("resnet18", num_classes=5, seed=1).double()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    objective = Objective(model, 0.0, trainable=("layer4", "fc"))
    theta = objective.initial_params()
    together = objective.logits(theta, x)
    alone = torch.cat([objective.logits(theta, x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)
    assert objective.num_params == sum(p.numel() for n, p in model.named_parameters() if n.startswith(("layer4.", "fc.")))
