"""Provenance says what ran: dirty only when code differs from the commit, the device resolved, the code digest."""

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from fragile.book import chapter
from fragile.errors import InvalidArgumentError
from fragile.run.code import module_code_digest
from fragile.run.devices import DEVICE_CHOICES
from fragile.run.provenance import MAX_DIRTY_FILES, collect, devices_used, git_commit

FILES = (
    "fragile/core.py",
    "notebooks/01_x.ipynb",
    "book/params/default.yml",
    "book/sections/01_x.ipynb",
    "results/01_x/default/summary.json",
    "README.md",
)


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_rewritten_outputs_are_not_dirty_changed_code_is(repo):
    for name in ("book/sections/01_x.ipynb", "results/01_x/default/summary.json", "README.md"):
        (repo / name).write_text("v2\n")
    (repo / "results" / "new.json").write_text("{}")
    clean = git_commit(repo / "fragile")
    assert clean["dirty"] is False and clean["dirty_files"] == [] and len(clean["commit"]) == 40

    (repo / "fragile" / "core.py").write_text("v2\n")
    (repo / "book" / "params" / "default.yml").write_text("v2\n")
    dirty = git_commit(repo)
    assert dirty["dirty"] is True and dirty["dirty_files"] == ["book/params/default.yml", "fragile/core.py"]
    assert dirty["dirty_count"] == 2 and dirty["commit"] == clean["commit"]


def test_dirty_files_are_capped(repo):
    for i in range(MAX_DIRTY_FILES + 5):
        (repo / "fragile" / f"m{i:02d}.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "more")
    for i in range(MAX_DIRTY_FILES + 5):
        (repo / "fragile" / f"m{i:02d}.py").write_text("x = 2\n")
    info = git_commit(repo)
    assert len(info["dirty_files"]) == MAX_DIRTY_FILES and info["dirty_count"] == MAX_DIRTY_FILES + 5


def test_outside_git_the_commit_is_unknown(tmp_path):
    assert git_commit(tmp_path) == {"commit": "unknown", "dirty": None, "dirty_files": [], "dirty_count": None}


def _collect(device):
    return collect(
        {}, profile="smoke", dataset="d", device=device, code_module="fragile.chapters.iris", started=0.0, finished=1.0
    )


def test_auto_is_recorded_as_the_device_it_resolves_to(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prov = _collect("auto")
    assert prov["device"] == "cpu" and prov["device_description"].startswith("CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Test GPU {index}")
    prov = _collect("auto")
    assert prov["device"] == "cuda" and prov["device_description"].startswith("Test GPU 0")


def test_collect_records_the_chapters_code_digest_beside_the_commit():
    prov = _collect("cpu")
    assert prov["code"] == {"module": "fragile.chapters.iris", "digest": module_code_digest("fragile.chapters.iris")}
    assert "commit" in prov["git"]


def test_devices_reported_by_jobs_are_merged(monkeypatch):
    assert devices_used(["cuda:0", "cpu", "cuda:0", "cuda:1"]) == "cpu, cuda:0, cuda:1"
    assert devices_used(iter(["cuda"])) == "cuda"
    for bad in (["auto"], ["gpu"], [0]):
        with pytest.raises(InvalidArgumentError, match="values holds"):
            devices_used(bad)
    with pytest.raises(InvalidArgumentError, match="values is empty"):
        devices_used([])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prov = _collect(devices_used(["cpu", "cuda:1"]))
    assert prov["device"] == "cpu, cuda:1" and "cuda:1 (not visible in this process)" in prov["device_description"]


@dataclass(frozen=True)
class AnyDeviceConfig(chapter.ChapterConfig):
    DEVICES: ClassVar[tuple[str, ...]] = DEVICE_CHOICES


def test_finish_records_the_resolved_device_or_the_jobs_devices(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = AnyDeviceConfig(device="auto", results_dir=str(tmp_path), scheduler="in-process")
    timer = chapter.Timer()
    summary = chapter.finish(cfg, section="01_x", dataset="d", timer=timer, results={})
    assert summary["provenance"]["device"] == "cpu"
    assert summary["provenance"]["code"] == {"module": __name__, "digest": module_code_digest(__name__)}
    summary = chapter.finish(cfg, section="01_x", dataset="d", timer=timer, results={}, device=devices_used(["cuda:0"]))
    assert summary["provenance"]["device"] == "cuda:0"


def test_the_provenance_list_and_glue_quote_the_written_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = AnyDeviceConfig(device="cpu", results_dir=str(tmp_path), scheduler="in-process")
    summary = chapter.finish(cfg, section="01_x", dataset="Iris, 120 points", timer=chapter.Timer(), results={})
    prov = summary["provenance"]
    text = chapter.provenance_markdown(summary)
    assert f"- **profile**: `{cfg.profile}`; **data**: Iris, 120 points; **device**: cpu" in text
    assert f"- **git commit**: `{prov['git']['commit']}`" in text
    assert ("(with uncommitted changes)" in text) == bool(prov["git"]["dirty"])
    assert f"**duration**: {prov['duration_s']} s" in text and f"`{summary['path']}`" in text
    glued = {}
    monkeypatch.setattr("myst_nb.glue", lambda name, value, display: glued.setdefault(name, value))
    chapter.glue_provenance("ch", summary)
    assert glued == {
        "ch_commit": prov["git"]["commit"][:10],
        "ch_duration_s": float(prov["duration_s"]),
        "ch_profile": cfg.profile,
    }


def test_the_summary_records_what_the_chapters_sweeps_did(tmp_path, monkeypatch):
    from sweep_jobs import fail_if

    from fragile.run.sweep import Job, run_sweep

    run_sweep([Job("before", fail_if, {"seed": 0, "bad": 1})], cache_dir=str(tmp_path / "c"), progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = AnyDeviceConfig(device="cpu", results_dir=str(tmp_path), scheduler="in-process")
    timer = chapter.Timer()  # the chapter starts: earlier sweeps of this process are not its own
    jobs = [Job(f"s{s}", fail_if, {"seed": s, "bad": 1}) for s in range(2)]
    run_sweep(jobs, cache_dir=str(tmp_path / "c"), progress=False)
    summary = chapter.finish(cfg, section="01_x", dataset="d", timer=timer, results={})
    assert summary["sweeps"] == [
        {
            "done": 1,
            "cached": 0,
            "stored": 0,
            "failed": {"s1": {"error": "ValueError: seed 1 is the bad one", "config": {"seed": 1, "bad": 1}}},
        }
    ]
    assert json.loads(Path(summary["path"]).read_text())["sweeps"] == summary["sweeps"]


def test_every_banner_says_what_its_profiles_verdicts_are_worth():
    from fragile.book.chapter import PROFILE_NOTES, banner_markdown
    from fragile.config import PROFILES

    assert set(PROFILE_NOTES) == set(PROFILES)
    quick = banner_markdown(profile="default", data="d", device="cpu", section="01_iris", compute="**Compute**: x.")
    assert "these verdicts are the `default` profile's" in quick and "**Compute**: x." in quick
    assert "Published edition" in banner_markdown(profile="published", data="d", device="cpu", section="01_iris")
