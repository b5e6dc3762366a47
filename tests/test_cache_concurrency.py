"""Several processes on one cache: concurrent publishes of one entry, and a second run of an in-flight job."""

import json
import logging
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
from sweep_jobs import computed_once

from fragile.run.cache import ResultCache
from fragile.run.sweep import Job, run_sweep

PATIENCE_S = 120.0  # a guard against a hang, not a measure of speed


def _save_many(root: str, start: str, times: int) -> str:
    while not Path(start).exists():  # every process starts saving at once
        time.sleep(0.001)
    cache = ResultCache(root)
    try:
        for i in range(times):
            cache.save("job", {"a": 1}, {"x": np.arange(50), "i": i})
    except Exception as exc:  # noqa: BLE001 - the test reports what escaped
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_concurrent_saves_of_one_entry_are_safe_and_leave_one_whole_entry(tmp_path):
    start = tmp_path / "start"
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        pending = [pool.apply_async(_save_many, (str(tmp_path / "cache"), str(start), 200)) for _ in range(4)]
        start.touch()
        errors = [p.get(PATIENCE_S) for p in pending]
    assert errors == [""] * 4
    loaded = ResultCache(tmp_path / "cache").load("job", {"a": 1})
    assert np.array_equal(loaded["x"], np.arange(50)) and 0 <= loaded["i"] < 200
    folder = tmp_path / "cache" / "job"
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == [
        ResultCache(folder.parent).path("job", {"a": 1}).name
    ]


def _run(cache_dir: str, folder: str, log_file: str) -> dict:
    logging.basicConfig(filename=log_file, level=logging.INFO, force=True)
    report = run_sweep([Job("once", computed_once, {"folder": folder, "value": 7})], cache_dir=cache_dir, progress=False)
    return {"done": report.done, "cached": report.cached, "value": report.results["once"]["value"]}


def _wait_for(condition, what: str) -> None:
    give_up = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < give_up, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_a_second_run_of_an_in_flight_job_waits_for_it_and_reuses_its_result(tmp_path):
    folder, cache_dir = tmp_path / "work", str(tmp_path / "cache")
    folder.mkdir()
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        first = pool.apply_async(_run, (cache_dir, str(folder), str(tmp_path / "first.log")))
        _wait_for(lambda: list(folder.glob("computed-*")), "the first run to start computing")
        second = pool.apply_async(_run, (cache_dir, str(folder), str(tmp_path / "second.log")))
        second_log = tmp_path / "second.log"
        _wait_for(lambda: second_log.exists() and "being computed by another process" in second_log.read_text(), "the wait")
        (folder / "gate").touch()
        one, two = first.get(PATIENCE_S), second.get(PATIENCE_S)
    assert len(list(folder.glob("computed-*"))) == 1  # computed once, by the first run
    assert one == {"done": ["once"], "cached": [], "value": 7}
    assert two == {"done": [], "cached": ["once"], "value": 7}
    assert (
        json.loads(
            (
                ResultCache(cache_dir).path("once", Job("once", computed_once, {"folder": str(folder), "value": 7}).cache_config)
                / "config.json"
            ).read_text()
        )["value"]
        == 7
    )


def test_an_entry_published_by_another_writer_just_before_this_one_renames_is_kept(tmp_path, monkeypatch):
    """The race the processes above hit only now and then, made certain: another writer publishes the entry
    between this writer's check and its rename."""
    import os

    import fragile.run.cache as cache_module

    cache = ResultCache(tmp_path)
    real_rename = os.rename

    def publish_first(src, dst):
        monkeypatch.setattr(cache_module.os, "rename", real_rename)
        cache.save("job", {"a": 1}, {"x": np.arange(3), "writer": "other"})  # the other writer wins
        return real_rename(src, dst)

    monkeypatch.setattr(cache_module.os, "rename", publish_first)
    cache.save("job", {"a": 1}, {"x": np.arange(3), "writer": "this"})
    assert cache.load("job", {"a": 1})["writer"] == "other"
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [cache.path("job", {"a": 1}).name]  # no temporary left
