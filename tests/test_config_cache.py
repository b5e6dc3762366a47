import os

import pytest
import torch

from fragile.chapters.iris import IrisConfig
from fragile.config import from_dict, load_yaml
from fragile.errors import InvalidArgumentError
from fragile.run.cache import DIGEST_FILE, CacheCorruptError, CacheMismatchError, ResultCache, _entry_digest


def test_from_dict_is_strict():
    cfg = from_dict(IrisConfig, {"n_seeds": 3, "depths": [1, 2], "lr": 1})
    assert cfg.depths == (1, 2) and cfg.lr == 1.0
    with pytest.raises(InvalidArgumentError, match=r"unknown parameter\(s\) \['colour'\]"):
        from_dict(IrisConfig, {"colour": 1})
    with pytest.raises(InvalidArgumentError, match="n_seeds=2.5 has the wrong type"):
        from_dict(IrisConfig, {"n_seeds": 2.5})
    with pytest.raises(InvalidArgumentError, match="use_cache=1 has the wrong type"):
        from_dict(IrisConfig, {"use_cache": 1})
    with pytest.raises(InvalidArgumentError, match="depths=13"):
        from_dict(IrisConfig, {"depths": [1, 13]})
    with pytest.raises(InvalidArgumentError, match="profile='huge'"):
        from_dict(IrisConfig, {"profile": "huge"})


def test_yaml_duplicate_keys_are_rejected(tmp_path):
    p = tmp_path / "x.yml"
    p.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(InvalidArgumentError, match="duplicate key 'a'"):
        load_yaml(p)


def test_cache_round_trip_and_mismatch_refused(tmp_path):
    cache = ResultCache(tmp_path)
    calls = []
    value = cache.get_or_compute("x", {"a": 1}, lambda: calls.append(1) or {"t": torch.arange(3)})
    again = cache.get_or_compute("x", {"a": 1}, lambda: calls.append(1) or {"t": torch.zeros(3)})
    assert calls == [1] and torch.equal(again["t"], value["t"])
    # Tamper with the saved config: the entry must be refused, not reused; with its digest rewritten to match, the
    # config itself still does not match the one looked up.
    entry = cache.path("x", {"a": 1})
    (entry / "config.json").write_text('{"a": 2}')
    with pytest.raises(CacheCorruptError, match="digest mismatch"):
        cache.load("x", {"a": 1})
    (entry / DIGEST_FILE).write_text(_entry_digest(entry))
    with pytest.raises(CacheMismatchError, match="different config"):
        cache.load("x", {"a": 1})
    assert issubclass(CacheMismatchError, CacheCorruptError)  # so a sweep discards and recomputes it
    again = cache.get_or_compute("x", {"a": 1}, lambda: calls.append(1) or {"t": torch.ones(3)})
    assert calls == [1, 1] and torch.equal(again["t"], torch.ones(3))


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: (entry / "config.json").unlink(),
        lambda entry: (entry / "config.json").write_text("{not json"),
        lambda entry: (entry / "config.json").write_text('{"a": 1, "b": 2}'),
        lambda entry: (entry / DIGEST_FILE).unlink(),
        lambda entry: (entry / "payload.json").unlink(),
        lambda entry: (entry / "payload.npz").write_bytes(b""),
    ],
    ids=["config deleted", "config garbled", "config edited", "digest deleted", "payload deleted", "arrays emptied"],
)
def test_a_damaged_entry_is_refused_and_recomputed_by_the_sweep(tmp_path, damage):
    from sweep_jobs import square

    from fragile.run.sweep import Job, run_sweep

    jobs = [Job("sq", square, {"x": 3}), Job("other", square, {"x": 4})]
    first = run_sweep(jobs, cache_dir=str(tmp_path), progress=False)
    assert first.done == ["sq", "other"]
    cache = ResultCache(tmp_path)
    damage(cache.path("sq", jobs[0].cache_config))
    with pytest.raises(CacheCorruptError):
        cache.load("sq", jobs[0].cache_config)
    second = run_sweep(jobs, cache_dir=str(tmp_path), progress=False)
    assert second.done == ["sq"] and second.cached == ["other"] and not second.failed
    assert second.results == first.results
    assert cache.load("sq", jobs[0].cache_config) == first.results["sq"]  # republished whole


def test_interrupted_save_leaves_no_entry(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path)

    def boom(*a, **k):
        raise KeyboardInterrupt

    import fragile.run.cache

    monkeypatch.setattr(fragile.run.cache, "encode", boom)  # interrupted while the payload is written
    with pytest.raises(KeyboardInterrupt):
        cache.save("x", {"a": 1}, {"t": 1})
    assert cache.load("x", {"a": 1}) is None
    assert os.listdir(tmp_path / "x") == []


def test_disabled_cache_always_computes(tmp_path):
    cache = ResultCache(tmp_path, enabled=False)
    calls = []
    cache.get_or_compute("x", {}, lambda: calls.append(1))
    cache.get_or_compute("x", {}, lambda: calls.append(1))
    assert calls == [1, 1] and not (tmp_path / "x").exists()


def test_truncated_entry_is_detected_and_recomputed(tmp_path):
    from fragile.run.cache import CacheCorruptError

    cache = ResultCache(tmp_path)
    cache.save("x", {"a": 1}, {"t": torch.arange(1000)})
    payload = cache.path("x", {"a": 1}) / "payload.npz"
    payload.write_bytes(payload.read_bytes()[:100])
    with pytest.raises(CacheCorruptError, match="corrupt"):
        cache.load("x", {"a": 1})
    calls = []
    value = cache.get_or_compute("x", {"a": 1}, lambda: calls.append(1) or {"t": torch.arange(3)})
    assert calls == [1] and torch.equal(value["t"], torch.arange(3))
    assert torch.equal(cache.load("x", {"a": 1})["t"], torch.arange(3))


@pytest.mark.parametrize(
    "bad, name",
    [
        ({"seed": -1}, "seed"),
        ({"profile": "huge"}, "profile"),
        ({"device": "tpu"}, "device"),
        ({"scheduler": "carrier-pigeon"}, "scheduler"),
        ({"n_workers": -2}, "n_workers"),
        ({"n_seeds": 0}, "n_seeds"),
    ],
)
def test_every_chapter_config_checks_the_common_fields_by_name(bad, name):
    from fragile.book.chapter import ChapterConfig
    from fragile.chapters.small_mnist import SmallMnistConfig

    for cls in (IrisConfig, SmallMnistConfig):
        assert issubclass(cls, ChapterConfig)
        with pytest.raises(InvalidArgumentError, match=name):
            cls(**bad)
