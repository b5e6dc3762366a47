"""Every chapter parameter is declared once, with its help text and its check: a value out of range is refused by
name before any work, and ``fragile params`` lists what each parameter means."""

import dataclasses
import functools

import pytest
from click.testing import CliRunner

from fragile import config as settings
from fragile.chapters.registry import CHAPTERS
from fragile.config import from_dict, settings_help
from fragile.errors import InvalidArgumentError
from fragile.run.cli import main


def out_of_range(check):
    """A value the declared ``check`` must refuse, derived from the check itself (None where none is derivable)."""
    if check in (settings.positive, settings.non_negative):
        return -1.0
    if isinstance(check, functools.partial):
        fn, kw = check.func, check.keywords
        if fn is settings._check_int_in:
            return kw["minimum"] - 1
        if fn is settings._check_choice_in:
            return "no-such-choice"
        if fn is settings._check_fraction:
            return kw["high"] + 1.0
        if fn is settings._check_each:
            inner = out_of_range(kw["check"])
            return None if inner is None else (inner,)
        if fn is settings._check_optional:
            return out_of_range(kw["check"])
    return None


@pytest.mark.parametrize("name", list(CHAPTERS))
def test_every_parameter_has_help_text(name):
    config = CHAPTERS[name].config
    declared = {row[0] for row in settings_help(config)}
    assert declared == {f.name for f in dataclasses.fields(config)}
    assert all(help_text.strip() for *_, help_text in settings_help(config))


@pytest.mark.parametrize("name", list(CHAPTERS))
def test_every_checked_parameter_refuses_a_value_out_of_its_range_by_name(name):
    config = CHAPTERS[name].config
    checked = 0
    for f in dataclasses.fields(config):
        bad = out_of_range(f.metadata.get("check"))
        if bad is None:
            continue
        checked += 1
        with pytest.raises(InvalidArgumentError, match=rf"\b{f.name}\b"):
            from_dict(config, {f.name: bad})
    assert checked >= 10, checked  # the checks are there, not only the help


def test_the_defaults_pass_their_own_checks():
    for chapter in CHAPTERS.values():
        settings.check_settings(chapter.config())


def test_a_redeclared_solver_default_keeps_its_help_and_check():
    from fragile.chapters.imagenet import ImageNetConfig
    from fragile.chapters.protocol import SolverSettings

    base = {f.name: f for f in dataclasses.fields(SolverSettings)}
    here = {f.name: f for f in dataclasses.fields(ImageNetConfig)}
    assert here["chunk_size"].default == 4 and base["chunk_size"].default == 8
    assert here["chunk_size"].metadata == base["chunk_size"].metadata
    with pytest.raises(InvalidArgumentError, match="chunk_size=0"):
        ImageNetConfig(chunk_size=0)


def test_fragile_params_lists_each_parameter_with_its_meaning_and_the_profiles_value():
    result = CliRunner().invoke(main, ["params", "iris", "--profile", "smoke"])
    assert result.exit_code == 0, result.output
    assert "train_steps = " in result.output and "full-batch GD steps" in result.output
    from fragile.run import runner

    smoke = runner.load_profile("smoke")["01_iris"]
    assert f"n_seeds = {smoke['n_seeds']!r}  [int]" in result.output
    bad = CliRunner().invoke(main, ["params", "no_such_chapter"])
    assert bad.exit_code == 2 and "section='no_such_chapter' is not allowed" in bad.output
