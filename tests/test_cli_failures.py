"""The command line and the runner fail loudly and early: values parsed as written, bad keys named, ad-hoc runs kept
out of the book, outputs checked writable before work, job failures reported with a non-zero exit, progress per job."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fragile.chapters.protocol import AllJobsFailedError, run_jobs
from fragile.chapters.small_mnist import SmallMnistConfig
from fragile.config import MAX_COUNT, settings_help
from fragile.errors import InvalidArgumentError
from fragile.run import cli, runner
from fragile.run.sweep import EVENTS_ENV, SWEEPS, Job, read_events, run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_notebook(monkeypatch):
    """Fail the test if a notebook starts: what is checked must be refused before."""
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a notebook started"))


@pytest.mark.parametrize(
    "text, value",
    [("1e-3", 0.001), ("1.0e-3", 0.001), ("-2E4", -20000.0), ("3", 3), ("0.5", 0.5), ("[1e-3, 2]", [0.001, 2]), ("abc", "abc")],
)
def test_values_are_read_as_written(text, value):
    got = cli._parse_value("k", text)
    assert got == value and type(got) is type(value)


def test_malformed_and_repeated_and_shadowed_parameters_are_refused_by_name():
    with pytest.raises(InvalidArgumentError, match=r"-p depths '\[1,' is not a valid value"):
        cli._overrides((("depths", "[1,"),), {})
    with pytest.raises(InvalidArgumentError, match="-p lr is given twice"):
        cli._overrides((("lr", "0.1"), ("lr", "0.2")), {})
    with pytest.raises(InvalidArgumentError, match="use --profile|with --profile"):
        cli._overrides((("profile", "paper"),), {})
    with pytest.raises(InvalidArgumentError, match="-p scheduler and --scheduler"):
        cli._overrides((("scheduler", "local"),), {"scheduler": "in-process"})
    assert cli._overrides((("lr", "1e-3"),), {"n_workers": 2}) == {"lr": 0.001, "n_workers": 2}


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "iris", "-p", "depths", "[1,"], "-p depths '[1,' is not a valid value"),
        (["run", "iris", "-p", "lr", "0.1", "-p", "lr", "0.2"], "-p lr is given twice"),
        (["run", "iris", "-p", "profile", "paper"], "-p profile is not allowed"),
        (["run", "iris", "-p", "train_steps", "1000000000"], "train_steps=1000000000 is not allowed; it must be <= 10000000"),
        (["run", "iris", "-p", "results_dir", "results"], "results_dir='results' is inside results/"),
        (["run", "iris", "-o", "book/sections/01_iris.ipynb"], "--output='book/sections/01_iris.ipynb' is inside book/"),
        (["book", "--section", "irsi"], "--section ['irsi'] is not allowed"),
        (["run", "irsi"], "section='irsi' is not allowed"),
        (["run", "iris", "-p", "n_sedes", "3"], "unknown parameter(s) ['n_sedes'] for section 'iris'"),
        (["run", "iris", "-p", "n_seeds", "ten"], "n_seeds='ten' has the wrong type"),
        (["run", "iris", "-p", "n_seeds", "1001"], "n_seeds=1001 is not allowed; it must be <= 1000"),
        (["run", "iris", "-p", "n_workers", "5000"], "n_workers=5000 is not allowed; it must be <= 1024"),
        (["run", "iris", "-p", "depths", "[0, 1]"], "depths=0 is not allowed"),
        (["run", "iris", "-p", "lr", "-1"], "lr=-1.0 is not allowed"),
        (["run", "iris", "-p", "seed", "-1"], "seed=-1 is not allowed"),
        (["run", "iris", "-p", "device", "tpu"], "device='tpu' is not allowed"),
        (["run", "iris", "-p", "scheduler", "carrier-pigeon"], "scheduler='carrier-pigeon' is not allowed"),
        (["run", "iris", "--scheduler", "locall"], "scheduler='locall' is not allowed"),
        (["run", "iris", "-p", "use_cache", "1"], "use_cache=1 has the wrong type"),
        (["run", "iris", "-p", "weight_decay", "-1e-3"], "weight_decay=-0.001 is not allowed"),
        (["run", "iris", "-p", "train_steps", "1e9"], "train_steps=1000000000.0 has the wrong type"),
        (["run", "iris", "-p", "scheduler", "local", "--scheduler", "in-process"], "-p scheduler and --scheduler"),
        (["run", "small_mnist", "-p", "n_train", "3"], "n_train=3 is not allowed"),
        (["run", "small_mnist", "-p", "n_train", "100000000"], "n_train=100000000 is not allowed; it must be <= 10000000"),
        (["run", "mnist_cifar10", "-p", "mnist_architectures", "[vgg99]"], "mnist_architectures='vgg99' is not allowed"),
        (["run", "estimands", "-p", "selection", "best"], "selection='best' is not allowed"),
        (["run", "imagenet", "-p", "top_k", "0"], "top_k=0 is not allowed"),
        (["run", "imagenet", "-p", "cifar100_n_seeds", "0"], "cifar100_n_seeds=0 is not allowed"),
        (["run", "appendix", "-p", "optimizers", "[adam, sgd]"], "optimizer_lrs has 4 values but optimizers has 2"),
    ],
)
def test_the_cli_refuses_bad_input_in_one_line_before_any_work(args, message, monkeypatch, no_notebook):
    monkeypatch.setattr(runner, "build_html", lambda *a, **k: pytest.fail("the book was built"))
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1


def test_an_ad_hoc_run_never_writes_the_book_whatever_the_paths(tmp_path):
    for overrides, output in (
        ({"results_dir": str(ROOT / "results" / "x")}, tmp_path / "nb.ipynb"),
        ({"results_dir": "book"}, tmp_path / "nb.ipynb"),
        ({}, ROOT / "results" / "01_iris.ipynb"),
        ({}, Path("book") / ".." / "book" / "sections" / "x.ipynb"),
    ):
        with pytest.raises(InvalidArgumentError, match="only `fragile book` writes"):
            runner.run_section("iris", "smoke", overrides, output=output, root=ROOT)


def test_outputs_that_cannot_be_written_are_refused_before_the_notebook_starts(tmp_path, no_notebook):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InvalidArgumentError, match="--output=.* is an existing folder"):
        runner.run_section("iris", "smoke", {"results_dir": str(tmp_path / "r")}, output=tmp_path, root=ROOT)
    with pytest.raises(InvalidArgumentError, match="results_dir=.*a-file/r.* cannot be written"):
        runner.run_section(
            "iris", "smoke", {"results_dir": str(tmp_path / "a-file" / "r")}, output=tmp_path / "nb.ipynb", root=ROOT
        )


def test_a_failed_notebook_is_kept_for_inspection_and_nothing_is_left_beside_the_output(tmp_path, monkeypatch):
    import papermill

    seen = {}

    def fail(template, output, **kwargs):
        seen["beside"] = sorted(p.name for p in (tmp_path / "out").iterdir())
        shutil.copyfile(template, output)
        raise papermill.PapermillExecutionError(3, 4, "source", "ValueError", "training diverged at step 54", [])

    monkeypatch.setattr(papermill, "execute_notebook", fail)
    out = tmp_path / "out" / "nb.ipynb"
    with pytest.raises(runner.SectionFailedError, match="ValueError: training diverged at step 54") as info:
        runner.run_section("iris", "smoke", {"results_dir": str(tmp_path / "r")}, output=out, root=ROOT)
    kept = Path(str(info.value).rsplit("kept at ", 1)[1].rstrip(")"))
    try:
        assert kept.parent == ROOT / "runs" / "failed" and json.loads(kept.read_text())["cells"]
        assert seen["beside"] == [] and sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    finally:
        kept.unlink()


def test_every_sweep_reports_its_progress_and_outcome_to_the_runner(tmp_path, monkeypatch):
    from sweep_jobs import fail_if

    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(events))
    jobs = [Job(f"s{s}", fail_if, {"seed": s, "bad": 1}) for s in range(3)]
    report = run_sweep(jobs, cache_dir=str(tmp_path / "c"), progress=False)
    got = read_events(events)
    progress = [e for e in got if e["event"] == "progress"]
    assert [(e["done"], e["total"]) for e in progress] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert progress[0]["eta"] == "unknown" and all(e["eta"] != "unknown" for e in progress[1:])
    (outcome,) = [e for e in got if e["event"] == "sweep"]
    assert outcome["done"] == 2 and outcome["cached"] == 0 and outcome["stored"] == 0
    assert outcome["failed"] == {"s1": {"error": "ValueError: seed 1 is the bad one", "config": {"seed": 1, "bad": 1}}}
    assert SWEEPS[-1] == report.outcome() == {k: v for k, v in outcome.items() if k != "event"}
    again = read_events(events)[len(got) :]
    assert again == []  # nothing more was written after the sweep
    events.write_text(events.read_text() + '{"event": "progr')  # a line cut off by a kill is ignored
    assert read_events(events) == got


def test_a_chapter_whose_jobs_all_fail_stops_before_any_table(tmp_path):
    from sweep_jobs import fail_if

    cfg = SmallMnistConfig(scheduler="in-process", cache_dir=str(tmp_path))
    jobs = [Job(f"s{s}", fail_if, {"seed": s, "bad": s}) for s in range(2)]
    with pytest.raises(AllJobsFailedError, match="every one of the 2 jobs failed; s0: ValueError: seed 0 is the bad one"):
        run_jobs(cfg, jobs, progress=False)
    results, report = run_jobs(cfg, jobs[:1] + [Job("ok", fail_if, {"seed": 0, "bad": 1})], progress=False)
    assert results == [{"seed": 0}] and list(report.failed) == ["s0"]


def test_the_cli_lists_failed_jobs_with_their_parameters_and_exits_1(tmp_path, monkeypatch):
    failed = {"done": 1, "cached": 2, "failed": {"iris/d3": {"error": "ValueError: training diverged", "config": {"depth": 3}}}}
    clean = {"done": 3, "cached": 0, "failed": {}}

    def fake(sweeps):
        return lambda *a, **k: runner.SectionRun(tmp_path / "nb.ipynb", sweeps)

    monkeypatch.setattr(runner, "run_section", fake((clean, failed)))
    result = CliRunner().invoke(cli.main, ["run", "iris"])
    assert result.exit_code == 1
    assert "sweep: 3 done, 0 cached, 0 failed" in result.output and "sweep: 1 done, 2 cached, 1 failed" in result.output
    assert "failed iris/d3: ValueError: training diverged" in result.output and 'parameters: {"depth": 3}' in result.output
    monkeypatch.setattr(runner, "run_section", fake((clean,)))
    assert CliRunner().invoke(cli.main, ["run", "iris"]).exit_code == 0


def test_every_count_has_an_upper_bound_stated_in_its_help():
    with pytest.raises(InvalidArgumentError, match=f"train_steps={MAX_COUNT + 1} is not allowed; it must be <= {MAX_COUNT}"):
        SmallMnistConfig(train_steps=MAX_COUNT + 1)
    with pytest.raises(InvalidArgumentError, match="n_seeds=1001"):
        SmallMnistConfig(n_seeds=1001)
    helps = {name: text for name, _, _, text in settings_help(SmallMnistConfig)}
    assert helps["train_steps"].endswith("(an integer from 1 to 10,000,000)")
    assert helps["n_seeds"].endswith("(an integer from 1 to 1,000)")


def test_the_runner_logs_a_line_per_finished_job_and_returns_each_sweeps_outcome(tmp_path, caplog):
    import logging

    section = runner.find_section("iris", ROOT)
    events = tmp_path / "events.jsonl"
    lines = [
        {"event": "progress", "done": 1, "total": 4, "cached": 1, "elapsed": "0:00", "eta": "unknown"},
        {"event": "progress", "done": 2, "total": 4, "cached": 1, "elapsed": "0:07", "eta": "0:14"},
        {"event": "sweep", "done": 3, "cached": 1, "failed": {}},
    ]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines))
    with caplog.at_level(logging.INFO, logger="fragile.run.runner"):
        relay = runner._ProgressRelay(section, events)
        sweeps = relay.stop()
    assert sweeps == ({"done": 3, "cached": 1, "failed": {}},)
    logged = [r.getMessage() for r in caplog.records if r.name == "fragile.run.runner"]
    assert logged == [
        "iris: 1 of 4 jobs (1 already finished: stored or cached), 0:00 elapsed, time left unknown",
        "iris: 2 of 4 jobs (1 already finished: stored or cached), 0:07 elapsed, time left 0:14",
    ]
