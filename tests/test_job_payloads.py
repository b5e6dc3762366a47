"""Every chapter's real job results survive the pickle-free cache bit for bit: each chapter's smoke study is run
once into a fresh cache and once from it, and the two sets of results must be identical."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fragile.chapters.registry import CHAPTERS
from fragile.config import from_dict
from fragile.run import runner

ROOT = Path(__file__).resolve().parents[1]


def identical(a, b, where="result"):
    assert type(a) is type(b) or (isinstance(a, float) and isinstance(b, float)), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            identical(x, y, f"{where}[{i}]")
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            identical(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()), where
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", list(CHAPTERS))
def test_a_chapters_job_results_come_back_from_the_cache_unchanged(name, tmp_path):
    chapter = CHAPTERS[name]
    section = runner.find_section(name, ROOT)
    overrides = {"scheduler": "in-process", "use_cache": True, "results_dir": str(tmp_path / "results")}
    params = runner.resolve_parameters(section, "smoke", overrides, ROOT)
    cfg = from_dict(chapter.config, {**params, "cache_dir": str(tmp_path / "cache")})
    *computed, first = chapter.run(cfg, progress=False)
    *loaded, second = chapter.run(cfg, progress=False)
    assert not first.failed and first.done and not first.cached
    assert not second.done and sorted(second.cached) == sorted(first.done)
    identical(computed, loaded)
