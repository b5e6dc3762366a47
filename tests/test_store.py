"""The committed result store: keyed by config and numerics version, tracked (a damaged entry is refused naming
the job, never discarded), pickle-free, within its budget."""

import json

import numpy as np
import pytest

import fragile.run.store as store_module
from fragile.run.cache import DIGEST_FILE, _entry_digest
from fragile.run.store import NUMERICS_VERSION, JobCompute, ResultStore, StoredJob, StoreError
from fragile.run.sweep import Job

TOOK = JobCompute(1.5, 2.0, "cpu", "cpu Test CPU, torch 0")


def _result() -> dict:
    return {"spearman": 0.25, "predicted": np.arange(6.0).reshape(2, 3), "n": 7}


def test_a_stored_job_comes_back_bit_for_bit_under_its_config_and_numerics_version(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    assert store.load("iris/d1", {"depth": 1}) is None and not store.holds("iris/d1", {"depth": 1})
    store.save("iris/d1", {"depth": 1}, _result(), TOOK)
    back = store.load("iris/d1", {"depth": 1})
    assert back["spearman"] == 0.25 and back["n"] == 7 and np.array_equal(back["predicted"], _result()["predicted"])
    assert store.load("iris/d1", {"depth": 2}) is None
    assert store.compute("iris/d1", {"depth": 1}) == TOOK and store.compute("iris/d1", {"depth": 2}) is None
    saved = json.loads((store.path("iris/d1", {"depth": 1}) / "config.json").read_text())
    assert saved == {"depth": 1, "numerics": NUMERICS_VERSION}
    assert store.entries() == [StoredJob("iris/d1", store.path("iris/d1", {"depth": 1}).name)]
    monkeypatch.setattr(store_module, "NUMERICS_VERSION", NUMERICS_VERSION + 1)  # numbers moved: retired, not reused
    assert store.load("iris/d1", {"depth": 1}) is None and not store.holds("iris/d1", {"depth": 1})
    assert len(store.entries()) == 1  # still on disk, for `fragile verify` to report


def test_a_damaged_or_planted_entry_is_refused_naming_the_job_and_left_in_place(tmp_path):
    store = ResultStore(tmp_path)
    store.save("table1/lenet", {"a": 1}, _result(), TOOK)
    entry = store.path("table1/lenet", {"a": 1})
    (entry / "payload.json").write_text('{"spearman": 0.99}')  # an edited number
    with pytest.raises(StoreError, match=r"stored job 'table1/lenet' cannot be used .*digest mismatch.*git checkout"):
        store.load("table1/lenet", {"a": 1})
    assert entry.is_dir()
    (entry / "payload.json").write_text(json.dumps({"r": {"__record__": "os:system", "fields": {"command": "true"}}}))
    (entry / DIGEST_FILE).write_text(_entry_digest(entry))
    with pytest.raises(StoreError, match="outside this package"):
        store.load("table1/lenet", {"a": 1})
    with pytest.raises(StoreError, match="may not hold 'numerics'"):
        store.save("x", {"numerics": 3}, {}, TOOK)


def test_a_save_past_the_budget_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.save("small", {"a": 1}, {"x": np.zeros(10)}, TOOK)
    used = store.size()
    assert used == sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) > 0
    monkeypatch.setattr(store_module, "BUDGET_BYTES", used + 1000)
    with pytest.raises(StoreError, match="past its budget"):
        store.save("big", {"a": 2}, {"x": np.zeros(10_000)}, TOOK)
    assert not store.holds("big", {"a": 2}) and store.size() == used
    store.save("small", {"a": 1}, {"x": np.ones(10)}, TOOK)  # already stored: kept as it was, the budget not consulted
    assert np.array_equal(store.load("small", {"a": 1})["x"], np.zeros(10))


def test_a_sweep_takes_stored_jobs_from_the_store_and_publishes_what_it_finished(tmp_path):
    from sweep_jobs import square

    from fragile.run.sweep import Job, run_sweep

    store = ResultStore(tmp_path / "store")
    jobs = [Job(f"sq{x}", square, {"x": x}) for x in (2, 3)]
    first = run_sweep(jobs[:1], cache_dir=str(tmp_path / "c"), progress=False, store=store, publish=True)
    assert first.done == ["sq2"] and store.load("sq2", {"x": 2}) == {"square": 4}
    # a fresh machine: no cache, the store committed
    second = run_sweep(jobs, cache_dir=str(tmp_path / "fresh"), progress=False, store=store)
    assert second.stored == ["sq2"] and second.done == ["sq3"] and second.results["sq2"] == {"square": 4}
    assert not store.holds("sq3", {"x": 3})  # not published without publish=True
    assert second.outcome()["stored"] == 1 and second.summary().endswith("1 from the store")
    # what the cache held is published too
    third = run_sweep(jobs, cache_dir=str(tmp_path / "fresh"), progress=False, store=store, publish=True)
    assert third.stored == ["sq2"] and third.cached == ["sq3"] and store.load("sq3", {"x": 3}) == {"square": 9}
    (store.path("sq2", {"x": 2}) / "payload.npz").write_bytes(b"")
    with pytest.raises(StoreError, match="stored job 'sq2'"):
        run_sweep(jobs, cache_dir=str(tmp_path / "fresh"), progress=False, store=store)
    with pytest.raises(Exception, match="publish=True needs a store"):
        run_sweep(jobs, cache_dir=str(tmp_path / "fresh"), progress=False, publish=True)


def test_a_chapter_takes_its_jobs_from_the_store_and_publishes_to_it_when_asked(tmp_path):
    from sweep_jobs import square

    from fragile.chapters.protocol import run_jobs
    from fragile.chapters.small_mnist import SmallMnistConfig

    jobs = [Job(f"sq{x}", square, {"x": x}) for x in (4, 5)]
    common = dict(scheduler="in-process", store_dir=str(tmp_path / "store"))
    results, report = run_jobs(SmallMnistConfig(**common, cache_dir=str(tmp_path / "a"), publish=True), jobs, progress=False)
    assert report.done == ["sq4", "sq5"] and ResultStore(tmp_path / "store").load("sq5", {"x": 5}) == {"square": 25}
    results, report = run_jobs(SmallMnistConfig(**common, cache_dir=str(tmp_path / "b")), jobs, progress=False)
    assert report.stored == ["sq4", "sq5"] and results == [{"square": 16}, {"square": 25}]
    _, report = run_jobs(
        SmallMnistConfig(scheduler="in-process", store_dir="", cache_dir=str(tmp_path / "c")), jobs, progress=False
    )
    assert report.stored == [] and report.done == ["sq4", "sq5"]


def test_each_job_is_published_as_it_lands_even_when_a_later_one_stops_the_run(tmp_path):
    from sweep_jobs import always_die, square

    store = ResultStore(tmp_path / "store")
    first, fatal = Job("sq7", square, {"x": 7}), Job("boom", always_die, {})
    jobs = [first, fatal]  # in-process, in order: the second kills the process running the sweep
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_sweep_in_child, args=(jobs, str(tmp_path / "c"), str(tmp_path / "store")))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 1  # killed by the second job, before the sweep could end
    assert store.load("sq7", {"x": 7}) == {"square": 49}


def _sweep_in_child(jobs, cache_dir, store_dir):
    from fragile.run.sweep import run_sweep

    run_sweep(jobs, cache_dir=cache_dir, progress=False, store=ResultStore(store_dir), publish=True)


def test_an_entry_without_its_compute_record_is_refused(tmp_path):
    store = ResultStore(tmp_path)
    store._entries.save("bare", store.keyed({"a": 1}), {"spearman": 0.5})  # a cache entry put where the store reads
    with pytest.raises(StoreError, match=r"stored job 'bare' is not a store entry"):
        store.load("bare", {"a": 1})
