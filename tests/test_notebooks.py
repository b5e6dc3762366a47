"""Every section notebook under the smoke profile through papermill, and the parameter contract."""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from fragile.book.verdicts import Verdict
from fragile.chapters.estimands import GROUND_TRUTHS, EstimandsConfig
from fragile.chapters.iris import IrisConfig
from fragile.chapters.registry import CHAPTERS
from fragile.errors import InvalidArgumentError
from fragile.run import runner

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = runner.sections(ROOT)
CONFIGS = {c.notebook: c.config for c in CHAPTERS.values()}


def test_every_template_is_a_chapter_of_the_registry_in_book_order():
    assert [s.name for s in SECTIONS] == sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == list(CONFIGS)
    assert [c.number for c in CHAPTERS.values()] == list(range(1, len(CHAPTERS) + 1))


def test_the_committed_toc_is_the_one_the_registry_writes():
    assert (ROOT / "book" / "_toc.yml").read_text() == runner.toc_yaml()


def _every_figure_names_the_command_that_regenerates_it(nb: dict, section, results: Path) -> None:
    """Under every saved figure, the command that regenerates it; the file it names is the one this run wrote (the
    test's results_dir stands where `fragile run` writes, runs/results)."""
    import re

    from fragile.book.plotting import REGENERATE

    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    named = []
    for i, o in enumerate(outputs):
        text = "".join(o.get("data", {}).get("text/markdown", ""))
        if REGENERATE in text:
            assert "image/png" in outputs[i - 1].get("data", {}), "a regenerate line without a figure above it"
            command, path = re.search(r"`(fragile run [^`]+)` \(it writes `runs/results/([^`]+)`\)", text).groups()
            assert command == f"fragile run {section.name} --profile smoke"
            assert (results / path).is_file(), path
            named.append(path)
    saved = sorted(str(p.relative_to(results)) for p in (results / section.name / "smoke" / "figures").glob("*.png"))
    assert sorted(named) == saved  # every figure the chapter saves is shown with its command, and only those


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.name)
def test_section_runs_under_smoke_and_writes_its_summary(section, tmp_path):
    out = runner.run_section(
        section.name, "smoke", {"results_dir": str(tmp_path / "results")}, output=tmp_path / "nb.ipynb", root=ROOT
    ).path
    nb = json.loads(out.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert nb["metadata"]["fragile"]["profile"] == "smoke"
    _every_figure_names_the_command_that_regenerates_it(nb, section, tmp_path / "results")
    summary = json.loads((tmp_path / "results" / section.name / "smoke" / "summary.json").read_text())
    assert summary["provenance"]["profile"] == "smoke"
    smoke = runner.load_profile("smoke", ROOT)[section.name]
    for key, value in smoke.items():
        if key != "results_dir":
            assert summary["provenance"]["parameters"][key] == value, key
    if section.name == "01_iris":
        head = summary["results"]["headline"]
        for key in ("with_wd", "without_wd"):
            s = head[key]["spearman"]
            assert len(s["values"]) == smoke["n_seeds"]
            assert all(v is None or -1.0 <= v <= 1.0 for v in s["values"])
        allowed = {str(v) for v in Verdict}
        for c in summary["results"]["claims"]:  # a verdict, or a verdict with why ("inconclusive: …")
            assert c["verdict"] in allowed or c["verdict"].split(":")[0] in allowed, c["verdict"]
    if section.name == "02_small_mnist":
        res = summary["results"]
        assert set(res["estimators"]) >= {"exact", "lissa", "arnoldi"}
        assert res["estimators"]["exact"]["error_vs_exact"] == 0.0
        rows = res["correlations"]
        assert {r["band"] for r in rows} == {"top", "band", "random"}
        assert {r["weight_decay"] for r in rows} == set(smoke["weight_decays"])
        assert all(r["spearman"] is None or -1.0 <= r["spearman"] <= 1.0 for r in rows)
        assert {c["key"] for c in res["claims"]} == {"range", "band", "wd_fall"}
        assert all(c["data"]["label"] == "reduced" for c in res["claims"])
    if section.name == "03_mnist_cifar10":
        res = summary["results"]
        assert res["stand_in"] == {"mnist": False, "cifar10": True}
        rows = res["correlations"]
        assert {(r["dataset"], r["architecture"]) for r in rows} == {("mnist", a) for a in smoke["mnist_architectures"]} | {
            ("cifar10", a) for a in smoke["cifar10_architectures"]
        }
        assert {r["test_point"] for r in rows} == {"highest loss", "median loss"}
        assert all(r["spearman"] is None or -1.0 <= r["spearman"] <= 1.0 for r in rows)
        assert any("STAND-IN" in column for column in res["table1"])  # the stand-in says so in the table itself
        assert {c["key"] for c in res["claims"]} == {"resnet50", "varies", "vgg_wd", "lissa_inaccurate", "lissa_deeper"}
    if section.name == "04_imagenet":
        res = summary["results"]
        assert res["stand_in"] == {"imagenet": True, "cifar100": True}
        assert len(res["drift"]) == 2 and all(
            r["median_abs_removal_vs_control"] > 0 for r in res["drift"]
        )  # two random test points
        assert len({r["test_point"] for r in res["drift"]}) == 2
        assert len(res["cifar100"]) == 2 * smoke["cifar100_test_points_per_kind"] * smoke["cifar100_n_seeds"]
        assert {c["key"] for c in res["claims"]} == {"imagenet_corr", "imagenet_drift", "cifar100"}
        assert all(c["verdict"].startswith("needs the real data set") for c in res["claims"])  # stand-ins confirm nothing
    if section.name == "05_appendix":
        res = summary["results"]
        assert res["stand_in"] == {"mnist": False, "cifar100": True}
        assert {r["optimizer"] for r in res["optimizer"]} == {"adam", "gd", "nesterov", "rmsprop"}
        assert {(r["architecture"], r["seed"]) for r in res["initialisation"]} == {
            (a, s) for a in ("small_cnn", "lenet") for s in range(smoke["init_seeds"])
        }
        assert {(r["dataset"], r["architecture"]) for r in res["summed"]} == {
            tuple(m.split("/")) for m in smoke["summed_group_models"]
        }
        assert all(r["spearman"] is None or -1.0 <= r["spearman"] <= 1.0 for r in res["summed"] + res["groups"])
        assert {c["key"] for c in res["claims"]} == {
            "optimizer",
            "init",
            "summed_mnist",
            "summed_cifar100",
            "group_mnist",
            "group_cifar100",
            "table2",
        }
        verdicts = {c["key"]: c["verdict"] for c in res["claims"]}
        assert verdicts["summed_cifar100"].startswith("needs the real data set") and verdicts["group_cifar100"].startswith(
            "needs the real data set"
        )
        assert all(r["training"] > 0 for r in res["timing"])
    if section.name == "06_estimands":
        res = summary["results"]
        assert {k: v["label"] for k, v in res["data"].items()} == {"Iris": "real", "small MNIST": "reduced"}
        settings = {r["setting"] for r in res["grid"]}
        assert settings == {f"iris/d{d}" for d in smoke["iris_depths"]} | {"mnist"}
        assert {r["ground_truth"] for r in res["grid"]} == set(GROUND_TRUTHS)
        assert {r["estimator"] for r in res["grid"] if r["setting"] == "mnist"} == set(EstimandsConfig().mnist_estimators)
        assert all(r["spearman"] is None or -1.0 <= r["spearman"] <= 1.0 for r in res["grid"])
        assert {c["key"] for c in res["pbrf_claims"]} <= {"iris_headline_with_wd", "iris_depth_drop", "smnist_range"}
        assert {r["gap"] for r in res["chain"]} >= {"warm start", "linearisation", "non-convergence of θ*"}


@pytest.mark.parametrize("name, config", [(c.name, c.config) for c in CHAPTERS.values()])
def test_parameters_cell_matches_its_config(name, config):
    section = runner.find_section(name, ROOT)
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    declared = section.parameters
    assert set(runner.COMMON_PARAMETERS) <= set(declared)
    # Every declared parameter is a config field, and the notebook's literal defaults are the config's.
    for param, info in declared.items():
        assert param in fields, param
        value = eval(info["default"])  # noqa: S307 - literals from our own template
        expected = fields[param]
        assert (list(value) if isinstance(value, (list, tuple)) else value) == (
            list(expected) if isinstance(expected, tuple) else expected
        ), param


@pytest.mark.parametrize("profile", runner.PROFILES)
def test_profiles_only_name_declared_parameters_and_make_valid_configs(profile):
    for section in SECTIONS:
        params = runner.resolve_parameters(section, profile, None, ROOT)
        config = CONFIGS[section.name]
        assert set(params) <= {f.name for f in dataclasses.fields(config)}
        config(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


def test_unknown_parameter_fails_before_execution(tmp_path):
    out = tmp_path / "nb.ipynb"
    with pytest.raises(InvalidArgumentError, match="unknown parameter.*'n_sedes'"):
        runner.run_section("iris", "smoke", {"n_sedes": 3}, output=out, root=ROOT)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "override,match",
    [({"n_seeds": "ten"}, "n_seeds='ten' has the wrong type"), ({"depths": [0, 1]}, "depths=0"), ({"lr": -1}, "lr=-1")],
)
def test_bad_parameter_value_fails_before_papermill_starts_and_leaves_nothing(tmp_path, override, match, monkeypatch):
    import papermill

    def never(*args, **kwargs):
        raise AssertionError("papermill started although a parameter was bad")

    monkeypatch.setattr(papermill, "execute_notebook", never)
    out = tmp_path / "nb.ipynb"
    with pytest.raises(InvalidArgumentError, match=match):
        runner.run_section("iris", "smoke", {**override, "results_dir": str(tmp_path / "r")}, output=out, root=ROOT)
    assert not out.exists()
    assert not (tmp_path / "r").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unknown_profile_and_section_are_named():
    with pytest.raises(InvalidArgumentError, match="profile='fast'"):
        runner.load_profile("fast", ROOT)
    with pytest.raises(InvalidArgumentError, match="section='cifar'"):
        runner.find_section("cifar", ROOT)


def test_committed_book_is_current():
    assert runner.stale_sections(ROOT) == []


def test_committed_summary_matches_the_executed_chapter():
    for section in SECTIONS:
        nb = json.loads((ROOT / "book" / "sections" / f"{section.name}.ipynb").read_text())
        meta = nb["metadata"]["fragile"]
        summary = json.loads((ROOT / "results" / section.name / meta["profile"] / "summary.json").read_text())
        assert summary["provenance"]["parameters"]["n_seeds"] == meta["parameters"].get(
            "n_seeds", summary["provenance"]["parameters"]["n_seeds"]
        )
        assert not math.isnan(summary["provenance"]["duration_s"])


def test_cli_bad_scheduler_fails_fast_naming_it(tmp_path):
    import subprocess
    import sys

    from fragile.run.sweep import CONNECT_TIMEOUT_S

    cli = [sys.executable, "-m", "fragile", "run", "iris", "--profile", "smoke", "-o", str(tmp_path / "nb.ipynb")]
    bad = subprocess.run([*cli, "--scheduler", "tcp://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True)
    # Failing fast = at the connect timeout, before any notebook runs (nothing is written below): the message
    # says which timeout ran out, so no clock is needed.
    assert bad.returncode == 2 and "scheduler='tcp://127.0.0.1:9'" in bad.stderr
    assert f"no Dask scheduler answered within {CONNECT_TIMEOUT_S} s" in bad.stderr
    typo = subprocess.run([*cli, "--scheduler", "locall"], cwd=ROOT, capture_output=True, text=True)
    assert typo.returncode == 2 and "scheduler='locall' is not allowed" in typo.stderr
    assert not list(tmp_path.iterdir())


def test_section_on_a_local_cluster_started_by_the_runner(tmp_path):
    """`fragile run` with scheduler local: the runner starts the cluster, prints its dashboard, and the
    chapter's jobs run on it (the kernel gets the cluster's address through the environment); the numbers equal an
    in-process computation of the same study."""
    import subprocess
    import sys

    from fragile.chapters import iris

    small = {"n_seeds": 1, "depths": [1], "widths": [8]}
    cli = [
        sys.executable,
        "-m",
        "fragile",
        "run",
        "iris",
        "--profile",
        "smoke",
        "--scheduler",
        "local",
        "--workers",
        "2",
        "-p",
        "results_dir",
        str(tmp_path / "res"),
        "-o",
        str(tmp_path / "nb.ipynb"),
    ]
    for key, value in small.items():
        cli += ["-p", key, json.dumps(value)]
    done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dashboard: http" in done.stderr
    nb = json.loads((tmp_path / "nb.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "2 done, 0 cached, 0 failed" in text
    assert nb["metadata"]["fragile"]["parameters"]["scheduler"] == "local"
    # the cluster's address reached the kernel through the environment: no cell shows this run's ephemeral address
    address = re.search(r"Dask scheduler (tcp://[0-9.:]+)", done.stderr).group(1)
    assert address not in "".join("".join(c["source"]) for c in nb["cells"])

    summary = json.loads((tmp_path / "res" / "01_iris" / "smoke" / "summary.json").read_text())
    params = runner.resolve_parameters(runner.find_section("iris", ROOT), "smoke", {**small, "scheduler": "in-process"}, ROOT)
    fields = {f.name for f in dataclasses.fields(IrisConfig)}
    cfg = IrisConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in fields})
    groups, _ = iris.run_study(cfg, progress=False)
    head = iris.headline(groups, cfg.headline_width, cfg.criteria)
    for key in ("with_wd", "without_wd"):
        assert summary["results"]["headline"][key]["spearman"]["values"] == head[key]["spearman"]["values"], key


def test_execution_parameters_do_not_make_the_book_stale():
    section = runner.find_section("iris", ROOT)
    base = runner.resolve_parameters(section, "default", None, ROOT)
    moved = runner.resolve_parameters(section, "default", {"scheduler": "tcp://10.0.0.1:8786", "n_workers": 8}, ROOT)
    assert runner.params_digest(base) == runner.params_digest(moved)
    assert runner.params_digest(base) != runner.params_digest({**base, "n_seeds": 3})
    with pytest.raises(InvalidArgumentError, match=r"only execution overrides.*\['n_seeds'\]"):
        runner.run_book_sections("smoke", ROOT, overrides={"n_seeds": 3})
