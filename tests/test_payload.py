"""Job results stored without pickle: every value back bit for bit, nothing that can run code, bad values refused."""

import json
import math

import numpy as np
import pytest
import torch

from fragile.run.cache import CacheCorruptError, ResultCache
from fragile.run.payload import PayloadError, decode, encode


def result():
    return {
        "name": "iris/d1-w5",
        "flags": [True, False, None],
        "floats": [0.1, 1 / 3, math.nan, -math.inf, 1e-300],
        "ints": (1, 2, 3),
        "scalar32": np.float32(0.1),
        "array": np.random.default_rng(0).normal(size=(3, 4)),
        "ints64": np.arange(5),
        "mask": np.array([True, False]),
        "tensor": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "nested": {"runs": [{"predicted": np.linspace(0, 1, 7), "seed": 3}]},
    }


def test_every_value_comes_back_bit_for_bit():
    original = result()
    back = decode(*encode(original))
    assert back["name"] == original["name"] and back["flags"] == original["flags"]
    assert (
        back["floats"][:2] == original["floats"][:2]
        and math.isnan(back["floats"][2])
        and back["floats"][3:] == [-math.inf, 1e-300]
    )
    assert back["ints"] == (1, 2, 3) and isinstance(back["ints"], tuple)
    assert back["scalar32"] == float(np.float32(0.1))  # the same value, as a Python float
    for key in ("array", "ints64", "mask"):
        assert back[key].dtype == original[key].dtype and np.array_equal(back[key], original[key])
    assert isinstance(back["tensor"], torch.Tensor) and back["tensor"].dtype == torch.float32
    assert torch.equal(back["tensor"], original["tensor"])
    assert np.array_equal(back["nested"]["runs"][0]["predicted"], original["nested"]["runs"][0]["predicted"])


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"obj": object()}, "result['obj']"),
        ({1: "int key"}, "key 1"),
        ({"__array__": "a0"}, "__array__"),
        ({"x": [np.array(["a", "b"], dtype=object)]}, "result['x'][0]"),
        ({"t": torch.zeros(2, dtype=torch.bfloat16)}, "bfloat16"),
    ],
)
def test_a_value_that_cannot_be_stored_exactly_is_refused_naming_where_it_is(bad, where):
    with pytest.raises(PayloadError, match=__import__("re").escape(where)):
        encode(bad)


def test_a_cache_entry_is_json_and_arrays_and_loading_it_runs_no_pickle(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path)
    cache.save("job", {"a": 1}, result())
    entry = cache.path("job", {"a": 1})
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "entry.sha256", "payload.json", "payload.npz"]
    json.loads((entry / "payload.json").read_text())  # plain JSON
    with np.load(entry / "payload.npz", allow_pickle=False) as archive:
        assert all(archive[k].dtype != object for k in archive.files)
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a cache load unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    back = cache.load("job", {"a": 1})
    assert np.array_equal(back["array"], result()["array"])


def test_an_entry_whose_parts_do_not_match_is_corrupt_not_loaded(tmp_path):
    cache = ResultCache(tmp_path)
    cache.save("job", {"a": 1}, {"x": np.arange(3)})
    entry = cache.path("job", {"a": 1})
    (entry / "payload.json").write_text('{"x": {"__array__": "a7"}}')  # names an array the .npz does not hold
    with pytest.raises(CacheCorruptError, match="corrupt"):
        cache.load("job", {"a": 1})


def test_a_registered_record_comes_back_as_its_own_type_bit_for_bit():
    from fragile.chapters.results import Estimate, EstimatorFailure, Fit

    rng = np.random.default_rng(1)
    original = {
        "fit": Fit(0.1, 1.0, 0.9, 1e-7, 2.5, 0.34, 0.41, 0.0),
        "estimators": {
            "exact": Estimate("exact", rng.normal(size=(2, 5)), np.zeros(2), 0.01, eigenvalues=np.arange(3.0)),
            "cg": EstimatorFailure("cg", "H + λI is not positive definite"),
        },
    }
    back = decode(*encode(original))
    assert back["fit"] == original["fit"] and type(back["fit"]) is Fit
    exact = back["estimators"]["exact"]
    assert type(exact) is Estimate and not exact.failed and exact.lambda_max is None
    assert np.array_equal(exact.predicted, original["estimators"]["exact"].predicted)
    assert np.array_equal(exact.eigenvalues, np.arange(3.0))
    assert back["estimators"]["cg"] == original["estimators"]["cg"] and back["estimators"]["cg"].failed


def test_a_dataclass_that_is_not_a_registered_record_is_refused_when_saved():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Unregistered:
        x: int

    with pytest.raises(PayloadError, match=r"result\['r'\]: a Unregistered is not a registered record"):
        encode({"r": Unregistered(1)})


@pytest.mark.parametrize(
    "name, match",
    [
        ("os:system", "outside this package"),
        ("fragile.errors:InvalidArgumentError", "not registered"),
        ("fragile.no_such_module:Thing", "does not exist"),
    ],
)
def test_a_payload_can_build_only_this_packages_registered_records(name, match):
    text = json.dumps({"r": {"__record__": name, "fields": {"x": "rm -rf /"}}})
    _, npz = encode({})
    with pytest.raises(PayloadError, match=match):
        decode(text, npz)


def test_a_record_whose_stored_fields_differ_from_its_type_is_refused():
    from fragile.chapters.results import Agreement

    text, npz = encode({"r": Agreement(0.5, 0.4)})
    tampered = text.replace('"pearson"', '"other"')
    with pytest.raises(PayloadError, match="has fields"):
        decode(tampered, npz)


class _RunsOnUnpickle:
    """An object whose unpickling runs a shell command: what a crafted cache entry would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("part", ["payload.npz", "payload.json"])
def test_a_planted_entry_with_a_valid_digest_runs_nothing_and_its_job_is_recomputed(tmp_path, part):
    import io

    from sweep_jobs import square

    from fragile.run.cache import DIGEST_FILE, _entry_digest
    from fragile.run.sweep import Job, run_sweep

    job = Job("sq", square, {"x": 5})
    run_sweep([job], cache_dir=str(tmp_path), progress=False)
    entry = ResultCache(tmp_path).path("sq", job.cache_config)
    marker = tmp_path / "code-ran"
    if part == "payload.npz":  # a pickled object array, as np.save writes one when allowed to
        buffer = io.BytesIO()
        np.savez(buffer, a0=np.array([_RunsOnUnpickle(str(marker))], dtype=object), allow_pickle=True)
        (entry / "payload.npz").write_bytes(buffer.getvalue())
        (entry / "payload.json").write_text(json.dumps({"square": {"__array__": "a0"}}))
    else:  # a record naming a callable outside the package
        (entry / "payload.json").write_text(
            json.dumps({"square": {"__record__": "os:system", "fields": {"command": f"touch {marker}"}}})
        )
    (entry / DIGEST_FILE).write_text(_entry_digest(entry))  # whoever writes the entry can recompute its digest
    report = run_sweep([job], cache_dir=str(tmp_path), progress=False)
    assert not marker.exists()
    assert report.done == ["sq"] and report.results["sq"] == {"square": 25}
    assert ResultCache(tmp_path).load("sq", job.cache_config) == {"square": 25}
