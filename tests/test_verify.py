"""`fragile verify`'s comparison and recomputation: identical bits, close within the tolerance, or different with
the first place it differs."""

import math
import shutil

import numpy as np
import pytest
from sweep_jobs import square

from fragile.chapters.results import Agreement as Corr
from fragile.run.arithmetic import machine_arithmetic
from fragile.run.store import JobCompute, ResultStore
from fragile.run.sweep import Job
from fragile.run.verify import Agreement, compare, verify


def test_identical_close_and_different_results_are_told_apart():
    base = {"r": Corr(0.5, 0.25), "x": np.array([1.0, 2.0, np.nan]), "n": 3, "name": "lenet"}
    assert compare(base, {"r": Corr(0.5, 0.25), "x": np.array([1.0, 2.0, np.nan]), "n": 3, "name": "lenet"}) == (
        Agreement.IDENTICAL,
        "",
        0.0,
    )
    nudged = {**base, "x": np.array([1.0, 2.0 * (1 + 1e-9), np.nan])}
    agreement, where, worst = compare(base, nudged)
    assert agreement is Agreement.CLOSE and where == "result['x']" and worst == pytest.approx(1e-9, rel=1e-3)
    moved = {**base, "r": Corr(0.5, 0.26)}
    agreement, where, worst = compare(base, moved)
    assert agreement is Agreement.DIFFERENT and where == "result['r'].pearson" and worst == pytest.approx(0.01 / 0.26)
    assert compare(base, {**base, "name": "vgg"})[:2] == (Agreement.DIFFERENT, "result['name']")
    assert compare(base, {**base, "x": np.array([1.0, 2.0, 3.0])})[1] == "result['x'] (NaN in one only)"
    assert compare(base, {**base, "x": np.zeros(2)})[2] == math.inf
    assert compare(base, {k: v for k, v in base.items() if k != "n"})[1] == "result (keys)"
    timed = {"fit": {"seconds": 1.0, "train_seconds": 2.0, "loss": 0.5}}
    assert compare(timed, {"fit": {"seconds": 9.0, "train_seconds": 7.0, "loss": 0.5}})[0] is Agreement.IDENTICAL


def test_verify_recomputes_a_sample_of_the_stored_jobs(tmp_path):
    store = ResultStore(tmp_path)
    jobs = [Job(f"sq{x}", square, {"x": x}) for x in range(6)]
    here = JobCompute(0.1, 0.1, "cpu", machine_arithmetic("cpu"))
    for job in jobs[:5]:
        store.save(job.name, job.config, square(**job.config), here)
    store.save("sq3-moved", {"x": 3}, {"square": 10}, here)
    checked = verify([*jobs, Job("sq3-moved", square, {"x": 3})], store)
    assert [v.name for v in checked] == ["sq0", "sq1", "sq2", "sq3", "sq4", "sq3-moved"]  # sq5 is not stored
    assert [v.agreement for v in checked] == [Agreement.IDENTICAL] * 5 + [Agreement.DIFFERENT]
    assert [v.passed for v in checked] == [True] * 5 + [False] and all(v.same_arithmetic for v in checked)
    assert checked[-1].where == "result['square']"
    sample = verify(jobs, store, sample=2, seed=1)
    assert len(sample) == 2 and {v.name for v in sample} <= {j.name for j in jobs[:5]}
    assert [v.name for v in verify(jobs, store, sample=2, seed=1)] == [v.name for v in sample]


def test_fragile_verify_recomputes_a_published_chapter_and_fails_on_a_moved_number(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from click.testing import CliRunner

    from fragile.chapters import iris
    from fragile.chapters.protocol import run_jobs
    from fragile.config import from_dict
    from fragile.run import cli, runner
    from fragile.run.cache import DIGEST_FILE, _entry_digest

    root = Path(__file__).resolve().parents[1]
    section = runner.find_section("iris", root)
    params = runner.resolve_parameters(section, "smoke", {"depths": [1], "widths": [8]}, root)
    cfg = from_dict(iris.IrisConfig, {**params, "store_dir": str(tmp_path), "publish": True, "cache_dir": str(tmp_path / "c")})
    jobs = iris.architecture_jobs(cfg)
    run_jobs(cfg, jobs, progress=False)
    store = ResultStore(tmp_path)
    assert jobs and all(store.holds(j.name, j.config) for j in jobs)
    monkeypatch.chdir(root)
    monkeypatch.setattr(runner, "resolve_parameters", lambda s, p, o, r: params)  # the smaller grid above
    args = ["verify", "--section", "iris", "--profile", "smoke", "--store", str(tmp_path)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    here = machine_arithmetic("cpu")
    assert result.output.splitlines()[-1] == (
        f"{len(jobs)} identical, 0 close, 0 different of {len(jobs)} stored jobs recomputed on {here}: 0 failed"
    )
    # move one stored number, as an unannounced numerics change would, keeping the entry's digest valid
    entry = store.path(jobs[0].name, jobs[0].config)
    text = (entry / "payload.json").read_text()
    key, value = re.search(r'"(train_loss)": ([0-9.e-]+)', text).groups()
    (entry / "payload.json").write_text(text.replace(f'"{key}": {value}', f'"{key}": {float(value) * 1.5!r}', 1))
    (entry / DIGEST_FILE).write_text(_entry_digest(entry))
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 1
    assert (
        result.output.startswith(f"different FAILS: {jobs[0].name} at result") and "train_loss" in result.output.splitlines()[0]
    )
    assert result.output.splitlines()[-1].endswith(
        f"0 close, 1 different of {len(jobs)} stored jobs recomputed on {here}: 1 failed"
    )


def test_fragile_publish_stores_what_is_missing_and_a_second_publish_computes_nothing(tmp_path, monkeypatch):
    from pathlib import Path

    from click.testing import CliRunner

    from fragile.chapters import iris
    from fragile.config import from_dict
    from fragile.run import cli, runner

    root = Path(__file__).resolve().parents[1]
    section = runner.find_section("iris", root)
    params = runner.resolve_parameters(section, "smoke", {"depths": [1], "widths": [8]}, root)
    monkeypatch.setattr(runner, "resolve_parameters", lambda s, p, o, r: {**params, "cache_dir": str(tmp_path / "c")})
    args = ["publish", "--section", "iris", "--profile", "smoke", "--store", str(tmp_path / "store")]
    first = CliRunner().invoke(cli.main, args)
    assert first.exit_code == 0, first.output
    jobs = iris.architecture_jobs(from_dict(iris.IrisConfig, params))
    store = ResultStore(tmp_path / "store")
    assert sorted(e.name for e in store.entries()) == sorted(j.name for j in jobs)
    assert f"01_iris: {len(jobs)} done, 0 cached, 0 failed" in first.output, first.output
    again = CliRunner().invoke(cli.main, args)
    assert again.exit_code == 0, again.output
    assert f"01_iris: 0 done, 0 cached, 0 failed, {len(jobs)} from the store" in again.output, again.output
    # what publish stored is what a run of the chapter computes from scratch
    assert all(verify([j], store)[0].agreement is Agreement.IDENTICAL for j in jobs)
    took = [store.compute(j.name, j.config) for j in jobs]
    assert all(t.device == "cpu" and 0 < t.seconds == t.cpu_seconds and t.wall_seconds > 0 for t in took), took
    assert {t.arithmetic for t in took} == {machine_arithmetic("cpu")}


def test_fragile_publish_refuses_an_unknown_section_before_any_work(tmp_path):
    from click.testing import CliRunner

    from fragile.run import cli

    result = CliRunner().invoke(cli.main, ["publish", "--section", "irsi", "--store", str(tmp_path)])
    assert result.exit_code != 0 and "--section ['irsi'] is not allowed" in result.output
    assert not any(tmp_path.iterdir())


def test_verify_within_a_budget_draws_only_jobs_whose_recorded_time_fits(tmp_path, monkeypatch):
    from pathlib import Path

    from fragile.chapters import iris
    from fragile.chapters.protocol import run_jobs
    from fragile.config import from_dict
    from fragile.errors import InvalidArgumentError
    from fragile.run import runner

    root = Path(__file__).resolve().parents[1]
    section = runner.find_section("iris", root)
    params = runner.resolve_parameters(section, "smoke", {"depths": [1, 2], "widths": [8]}, root)
    cfg = from_dict(iris.IrisConfig, {**params, "store_dir": str(tmp_path), "publish": True, "cache_dir": str(tmp_path / "c")})
    jobs = iris.architecture_jobs(cfg)
    run_jobs(cfg, jobs, progress=False)
    store = ResultStore(tmp_path)
    took = {j.name: store.compute(j.name, j.config).seconds for j in jobs}
    monkeypatch.setattr(runner, "resolve_parameters", lambda s, p, o, r: params)

    def names(**kw):
        return sorted(v.name for v in runner.verify_sections("smoke", root, ["iris"], store_dir=tmp_path, **kw))

    assert names(within=10 * sum(took.values())) == sorted(took)
    assert names(within=min(took.values()) / 2) == []
    budget = sorted(took.values())[1] * 1.01  # room for the shortest job, or the second shortest, not for both
    for seed in range(4):
        drawn = names(within=budget, seed=seed)
        assert drawn and sum(took[n] for n in drawn) <= budget
    with pytest.raises(InvalidArgumentError, match="sample and within are exclusive"):
        runner.verify_sections("smoke", root, ["iris"], store_dir=tmp_path, sample=1, within=1.0)


def test_under_the_same_arithmetic_only_identical_passes_and_under_another_close_does_too(tmp_path):
    store = ResultStore(tmp_path)
    here, there = machine_arithmetic("cpu"), "cpu Another CPU AVX2, torch 0"
    job = Job("sq2", square, {"x": 2})
    nudged = {"square": 4 * (1 + 1e-9)}  # within the default tolerance, not the same bits
    for arithmetic, passes in ((here, False), (there, True), (None, True)):
        for stored, agreement, passed in ((nudged, Agreement.CLOSE, passes), ({"square": 5}, Agreement.DIFFERENT, False)):
            shutil.rmtree(tmp_path, ignore_errors=True)
            store.save(job.name, job.config, stored, JobCompute(0.1, 0.1, "cpu", arithmetic))
            (checked,) = verify([job], store)
            assert checked.agreement is agreement and checked.passed is passed
            assert checked.same_arithmetic is (arithmetic == here)
            assert checked.arithmetic == here and checked.stored_arithmetic == arithmetic


def test_the_arithmetic_names_the_cpu_by_vendor_family_model_and_stepping(tmp_path, monkeypatch):
    from fragile.run import arithmetic

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel Xeon\n"
        "stepping\t: 8\n\nprocessor\t: 1\nvendor_id\t: Other\n"
    )
    monkeypatch.setattr(arithmetic, "CPUINFO", info)
    arithmetic.cpu_model.cache_clear()
    try:
        assert arithmetic.cpu_model() == "GenuineIntel family 6 model 143 stepping 8 (Intel Xeon)"
        assert arithmetic.machine_arithmetic("cpu").startswith("cpu GenuineIntel family 6 model 143 stepping 8 (Intel Xeon) ")
    finally:
        arithmetic.cpu_model.cache_clear()


def test_fragile_publish_with_job_patterns_stores_only_the_matching_jobs(tmp_path, monkeypatch):
    from pathlib import Path

    from click.testing import CliRunner

    from fragile.run import cli, runner

    root = Path(__file__).resolve().parents[1]
    section = runner.find_section("iris", root)
    params = runner.resolve_parameters(section, "smoke", {"depths": [1, 2], "widths": [8]}, root)
    monkeypatch.setattr(runner, "resolve_parameters", lambda s, p, o, r: {**params, "cache_dir": str(tmp_path / "c")})
    store_dir = tmp_path / "store"
    args = ["publish", "--section", "iris", "--profile", "smoke", "--store", str(store_dir)]
    result = CliRunner().invoke(cli.main, [*args, "--job", "iris/d2-*"])
    assert result.exit_code == 0, result.output
    assert [e.name for e in ResultStore(store_dir).entries()] == ["iris/d2-w5"]
    refused = CliRunner().invoke(cli.main, [*args, "--job", "iris/d9-*", "--job", "table1/*"])
    assert refused.exit_code != 0 and "--job ['iris/d9-*', 'table1/*'] matches no job of ['iris']" in refused.output
    assert [e.name for e in ResultStore(store_dir).entries()] == ["iris/d2-w5"]  # nothing computed for the refusal


def test_fragile_prune_removes_only_entries_that_no_profiles_job_is_keyed_by(tmp_path, monkeypatch):
    from pathlib import Path

    from click.testing import CliRunner

    from fragile.run import cli, runner

    root = Path(__file__).resolve().parents[1]
    section = runner.find_section("iris", root)
    real = runner.resolve_parameters
    tiny = real(section, "smoke", {"depths": [1], "widths": [8]}, root)

    def params(s, p, o, r):  # the smoke profile's Iris sized down; every other section as it is
        return {**tiny, "cache_dir": str(tmp_path / "c")} if s.short == "iris" and p == "smoke" else real(s, p, o, r)

    monkeypatch.setattr(runner, "resolve_parameters", params)
    store_dir = tmp_path / "store"
    published = CliRunner().invoke(cli.main, ["publish", "--section", "iris", "--profile", "smoke", "--store", str(store_dir)])
    assert published.exit_code == 0, published.output
    store = ResultStore(store_dir)
    kept = store.entries()
    store.save("iris/d1-w5", {"depth": 1, "moved": True}, {"x": 1.0}, JobCompute(1.0, 1.0, "cpu", None))  # a stale key
    store.save("iris/d9-w5", {"depth": 9}, {"x": 1.0}, JobCompute(1.0, 1.0, "cpu", None))  # a job that no longer exists
    stale = sorted(set(store.entries()) - set(kept))
    dry = CliRunner().invoke(cli.main, ["prune", "--store", str(store_dir), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines() == [f"would remove: {e.name}/{e.key}" for e in stale] + ["2 entries to remove"]
    assert len(store.entries()) == len(kept) + 2
    done = CliRunner().invoke(cli.main, ["prune", "--store", str(store_dir)])
    assert done.exit_code == 0 and done.output.splitlines()[-1] == "2 entries removed", done.output
    assert store.entries() == kept and not (store_dir / "iris" / "d9-w5").exists()
