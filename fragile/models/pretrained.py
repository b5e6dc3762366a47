"""torchvision's ImageNet classifiers (ResNet-18/50 as torchvision defines them, batch norm included) with
weights from a local file or from torchvision's own cache, never downloaded at run time.

Batch normalisation is used in evaluation mode (its running statistics are constants), so an example's loss
depends on that example alone, which per-example influence needs; the returned model is already in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fragile.errors import InvalidArgumentError, check_choice

ARCHITECTURES = ("resnet18", "resnet50")


def _torchvision_weights(name: str):
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    return {"resnet18": ResNet18_Weights.DEFAULT, "resnet50": ResNet50_Weights.DEFAULT}[name]


def cached_weights_path(name: str) -> Path:
    """Where torchvision keeps the default ImageNet weights of ``name`` once downloaded (``$TORCH_HOME``)."""
    check_choice("name", name, ARCHITECTURES)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_torchvision_weights(name).url).name


def weights_file(name: str, weights: str) -> Path | None:
    """The file ``weights`` names for ``name`` (None for ``""``), checked to exist: call it before any work.

    Raises:
        InvalidArgumentError: an unknown name, or weights that are not on this machine.
    """
    check_choice("name", name, ARCHITECTURES)
    if not weights:
        return None
    path = cached_weights_path(name) if weights == "torchvision" else Path(weights).expanduser()
    if not path.is_file():
        where = "torchvision's cache" if weights == "torchvision" else "disk"
        raise InvalidArgumentError(
            f"weights={weights!r} is not allowed here: {path} is not on {where}; give a state-dict file, "
            f"'torchvision' once its weights are cached, or '' for a random initialisation"
        )
    return path


def imagenet_classifier(name: str, weights: str = "", *, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """torchvision's ``name`` for ImageNet, in eval mode, with ``weights``.

    Args:
        name: ``resnet18`` or ``resnet50``.
        weights: ``""`` for a seeded random initialisation; ``"torchvision"`` for torchvision's default ImageNet
            weights from its cache (:func:`cached_weights_path`; they are not downloaded here); otherwise the path
            of a state-dict file (``torch.save(model.state_dict(), path)``), read with ``weights_only=True``.
        num_classes: outputs of the head; weights for 1,000 classes cannot be loaded into another head.
        seed: seed of the random initialisation (also of a head that the weights do not cover).

    Raises:
        InvalidArgumentError: an unknown name, weights that are not there, or a file that does not fit the model.
    """
    from torchvision import models

    path = weights_file(name, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(models, name)(weights=None, num_classes=num_classes)
    if path is not None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, OSError, EOFError) as exc:
            raise InvalidArgumentError(
                f"weights={weights!r}: {path} does not fit torchvision's {name} ({str(exc)[:300]})"
            ) from None
    return model.eval()
