"""The ``fragile`` command: list sections and their parameters, run one, build the book, check the book is current."""

from __future__ import annotations

import logging
import re
import sys

import click
import yaml

from fragile.config import settings_help
from fragile.errors import FragileError, InvalidArgumentError
from fragile.run import runner, sweep
from fragile.run import verify as verify_module

# YAML 1.1 reads ``1e-3`` (no dot, no sign in the exponent) as a string; every number written as Python would write it
# is a number here.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _parse_value(key: str, text: str):
    """A command-line value, read as YAML: ``3`` is an int, ``1e-3`` and ``0.5`` floats, ``[1, 2]`` a list, ``true`` a
    bool, anything else a string. Malformed YAML is refused naming the key."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise InvalidArgumentError(
            f"-p {key} {text!r} is not a valid value ({problem}); give a number, true/false, a string or a list like [1, 2]"
        ) from None
    return _numbers(value)


def _numbers(value):
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) and not value.strip().lstrip("+-").isdigit():
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _overrides(params: tuple[tuple[str, str], ...], execution: dict) -> dict:
    """The ``-p KEY VALUE`` pairs as parameters: a key given twice, ``profile`` (use ``--profile``) or an execution
    parameter also given by its option (``--scheduler``, ``--workers``) is refused, naming it."""
    out: dict = {}
    for key, text in params:
        if key in out:
            raise InvalidArgumentError(f"-p {key} is given twice ({out[key]!r} and {text!r}); give each parameter once")
        if key == "profile":
            raise InvalidArgumentError("-p profile is not allowed; choose the profile with --profile")
        out[key] = _parse_value(key, text)
    for key, option in (("scheduler", "--scheduler"), ("n_workers", "--workers")):
        if key in out and key in execution:
            raise InvalidArgumentError(f"-p {key} and {option} both set {key}; give it once")
    return out | execution


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log progress")
def main(verbose: bool) -> None:
    """Reproduce "Influence Functions in Deep Learning Are Fragile" section by section."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Which section runs and where the Dask dashboard is are worth seeing without -v.
    logging.getLogger("fragile.run.runner").setLevel(logging.INFO)


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@main.command("list")
def list_cmd() -> None:
    """Sections and the parameters each declares."""
    try:
        for s in runner.sections():
            click.echo(f"{s.short}  ({s.path.name})")
            for name, info in s.parameters.items():
                click.echo(f"    {name} = {info['default']}  [{info['inferred_type_name']}]  {info.get('help', '')}".rstrip())
    except FragileError as exc:
        _fail(exc)


@main.command("params")
@click.argument("section")
@click.option("--profile", default=None, type=click.Choice(runner.PROFILES), help="show this profile's values")
def params_cmd(section: str, profile: str | None) -> None:
    """Every parameter of SECTION: its type, its default (or PROFILE's value) and what it means."""
    try:
        found = runner.find_section(section)
        values = runner.load_profile(profile).get(found.name, {}) if profile else {}
        for name, type_name, default, help_text in settings_help(found.chapter.config):
            value = values.get(name, default)
            click.echo(f"{name} = {value!r}  [{type_name}]")
            click.echo(f"    {help_text}")
    except FragileError as exc:
        _fail(exc)


def _execution(scheduler: str | None, workers: int | None) -> dict:
    out = {}
    if scheduler is not None:
        out["scheduler"] = sweep.check_scheduler(scheduler)
    if workers is not None:
        out["n_workers"] = workers
    return out


_scheduler_option = click.option(
    "--scheduler",
    default=None,
    metavar="WHERE",
    help="where sweep jobs run: in-process, local (a Dask LocalCluster on this machine) or tcp://HOST:PORT "
    "(an existing Dask scheduler; its workers must see .cache/ at the same path). Default: the profile's.",
)
# The options of the commands that work on the result store (publish, verify).
_sections_option = click.option("--section", "only", multiple=True, help="only these sections (default: every one)")
_stored_profile_option = click.option(
    "--profile", default="published", show_default=True, type=click.Choice(runner.PROFILES), help="whose jobs"
)
_store_option = click.option(
    "--store", "store_dir", type=click.Path(file_okay=False), default=None, help="another store than the chapters'"
)
_workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="worker processes of a local cluster (default: one per CPU)"
)


@main.command("run")
@click.argument("section")
@click.option("--profile", default="default", show_default=True, type=click.Choice(runner.PROFILES))
@click.option("-p", "--param", "params", nargs=2, multiple=True, metavar="KEY VALUE", help="override a parameter")
@click.option("-o", "--output", type=click.Path(), default=None, help="executed notebook path (default: runs/…)")
@_scheduler_option
@_workers_option
def run_cmd(
    section: str,
    profile: str,
    params: tuple[tuple[str, str], ...],
    output: str | None,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """Run SECTION (e.g. iris) with a profile and overrides; writes under runs/, never into the book. Exits 1 when a
    job failed (each failure is listed with its parameters), 2 on bad input or a failed notebook."""
    try:
        overrides = _overrides(params, _execution(scheduler, workers))
        run = runner.run_section(section, profile, overrides, output=output, progress=True)
    except FragileError as exc:
        _fail(exc)
    click.echo(f"executed notebook: {run.path}")
    _report([run])


@main.command("book")
@click.option("--profile", default="default", show_default=True, type=click.Choice(runner.PROFILES))
@click.option("--no-run", is_flag=True, help="only build the HTML from the committed executed chapters")
@click.option("--section", "only", multiple=True, help="re-run only these sections")
@click.option("--publish", is_flag=True, help="first compute into the result store the jobs it lacks (as `fragile publish`)")
@_scheduler_option
@_workers_option
def book_cmd(
    profile: str, no_run: bool, only: tuple[str, ...], publish: bool, scheduler: str | None, workers: int | None
) -> None:
    """Execute every chapter into book/sections/ and build the HTML book. Jobs the result store holds are taken
    from it; the others are computed (with --publish, into the store first)."""
    try:
        if no_run and publish:
            raise InvalidArgumentError("--no-run and --publish are exclusive: --no-run executes nothing")
        runs = (
            []
            if no_run
            else runner.run_book_sections(
                profile, only=list(only) or None, overrides=_execution(scheduler, workers), publish=publish
            )
        )
        html = runner.build_html()
    except FragileError as exc:
        _fail(exc)
    click.echo(f"book: {html / 'index.html'}")
    _report(runs)


def _report(runs: list[runner.SectionRun]) -> None:
    """Each section's sweep report; exit 1 when any job failed (its chapter shows it, but a command that succeeds
    must mean that everything ran)."""
    for run in runs:
        if run.sweeps:
            click.echo(f"{run.path.stem}:")
            for line in run.report():
                click.echo(f"  {line}")
    failed = sum(len(run.failed) for run in runs)
    if failed:
        click.echo(f"error: {failed} job(s) failed; see above (the executed notebooks show them too)", err=True)
        sys.exit(1)


@main.command("publish")
@_sections_option
@_stored_profile_option
@_store_option
@_scheduler_option
@click.option(
    "--job",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="only the jobs whose names match this shell pattern (e.g. 'small_mnist/seed0-*'; repeatable)",
)
def publish_cmd(
    only: tuple[str, ...], profile: str, store_dir: str | None, scheduler: str | None, patterns: tuple[str, ...]
) -> None:
    """Compute the jobs the result store lacks and store each as it finishes, without executing any notebook: a
    long computation stopped midway keeps what finished and continues where it stopped. Prints each section's
    sweep report; exits 1 when a job failed, or when --job matches no job of the chosen sections."""
    try:
        reports = runner.publish_sections(
            profile, only=list(only) or None, store_dir=store_dir, scheduler=scheduler, patterns=list(patterns) or None
        )
    except FragileError as exc:
        _fail(exc)
    for name, report in reports:
        click.echo(f"{name}: {report.summary()}")
    failed = sum(len(report.failed) for _, report in reports)
    if failed:
        click.echo(f"error: {failed} job(s) failed; see above", err=True)
        sys.exit(1)


@main.command("prune")
@_store_option
@click.option("--dry-run", is_flag=True, help="list what would be removed, remove nothing")
def prune_cmd(store_dir: str | None, dry_run: bool) -> None:
    """Remove the result store's entries that no job of any profile is keyed by (their configuration or the
    numerics version moved on), so the committed store holds only what the book can use."""
    try:
        removed = runner.prune_store(store_dir=store_dir, dry_run=dry_run)
    except FragileError as exc:
        _fail(exc)
    for entry in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'}: {entry.name}/{entry.key}")
    click.echo(f"{len(removed)} entr{'y' if len(removed) == 1 else 'ies'} {'to remove' if dry_run else 'removed'}")


@main.command("verify")
@_sections_option
@_stored_profile_option
@click.option("--sample", type=click.IntRange(min=1), default=None, help="recompute this many stored jobs, drawn at random")
@click.option(
    "--within",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="recompute stored jobs drawn at random while their recorded seconds add up to at most this",
)
@click.option("--all", "every", is_flag=True, help="recompute every stored job (the default without --sample or --within)")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="seed of the --sample draw")
@click.option("--rtol", type=float, default=verify_module.DEFAULT_RTOL, show_default=True, help="relative tolerance of 'close'")
@_store_option
def verify_cmd(
    only: tuple[str, ...],
    profile: str,
    sample: int | None,
    within: float | None,
    every: bool,
    seed: int,
    rtol: float,
    store_dir: str | None,
) -> None:
    """Recompute stored jobs from scratch and compare them with the store: one line per job, then a count. Exits 1
    when a job fails (not identical although stored under this machine's arithmetic, or beyond --rtol under another
    one: the numerics moved without NUMERICS_VERSION being raised), and when nothing was recomputed (a check that
    checked nothing does not pass)."""
    try:
        if sum((sample is not None, within is not None, every)) > 1:
            raise InvalidArgumentError("--sample, --within and --all are exclusive; give one")
        checked = runner.verify_sections(
            profile, only=list(only) or None, sample=sample, within=within, seed=seed, rtol=rtol, store_dir=store_dir
        )
    except FragileError as exc:
        _fail(exc)
    for v in checked:
        where = f" at {v.where}" if v.where else ""
        other = "" if v.same_arithmetic else f"; stored under other arithmetic: {v.stored_arithmetic or 'not recorded'}"
        verdict = "" if v.passed else " FAILS"
        click.echo(
            f"{v.agreement}{verdict}: {v.name}{where} (max relative difference {v.max_relative:.2g}, {v.seconds:.1f} s{other})"
        )
    if not checked:
        click.echo("error: no stored job was recomputed (none stored for this profile, or none fits --within)", err=True)
        sys.exit(1)
    counts = {a: sum(v.agreement is a for v in checked) for a in verify_module.Agreement}
    others = sum(not v.same_arithmetic for v in checked)
    failed = sum(not v.passed for v in checked)
    click.echo(
        ", ".join(f"{n} {a}" for a, n in counts.items())
        + f" of {len(checked)} stored jobs recomputed on {checked[0].arithmetic}"
        + (f" ({others} stored under other arithmetic)" if others else "")
        + f": {failed} failed"
    )
    if failed:
        sys.exit(1)


@main.command("check")
def check_cmd() -> None:
    """Fail if an executed chapter is missing or stale against its template, parameter profile or library code."""
    try:
        problems = runner.stale_sections()
    except FragileError as exc:
        _fail(exc)
    for p in problems:
        click.echo(f"stale: {p}")
    if problems:
        sys.exit(1)
    click.echo("book is current: every chapter matches its template, profile and library code")
