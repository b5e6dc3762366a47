import pytest
import torch

from fragile.errors import InvalidArgumentError
from fragile.run.devices import resolve_device


def test_auto_picks_cuda_only_where_torch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InvalidArgumentError, match="device='cuda:2' is not allowed here: torch sees 2 CUDA device"):
        resolve_device("cuda:2")


def test_unknown_or_absent_devices_are_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidArgumentError, match="device='cuda' is not allowed here: torch sees 0 CUDA"):
        resolve_device("cuda")
    for bad in ("tpu", "CUDA", "cuda:x", 0):
        with pytest.raises(InvalidArgumentError, match="is not allowed; choose one of"):
            resolve_device(bad)
