"""The ``fragile`` command: list sections, run one, build the book, check the book is current."""

from __future__ import annotations

import logging
import sys

import click
import yaml

from fragile import runner
from fragile.errors import FragileError


def _parse_value(text: str):
    """Command-line values are YAML scalars/lists: ``3`` is an int, ``[1, 2]`` a list, ``true`` a bool."""
    return yaml.safe_load(text)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log progress")
def main(verbose: bool) -> None:
    """Reproduce "Influence Functions in Deep Learning Are Fragile" section by section."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


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


@main.command("run")
@click.argument("section")
@click.option("--profile", default="default", show_default=True, type=click.Choice(runner.PROFILES))
@click.option("-p", "--param", "params", nargs=2, multiple=True, metavar="KEY VALUE", help="override a parameter")
@click.option("-o", "--output", type=click.Path(), default=None, help="executed notebook path (default: runs/…)")
def run_cmd(section: str, profile: str, params: tuple[tuple[str, str], ...], output: str | None) -> None:
    """Run SECTION (e.g. iris) with a profile and overrides; writes under runs/, never into the book."""
    try:
        path = runner.run_section(section, profile, {k: _parse_value(v) for k, v in params}, output=output, progress=True)
    except FragileError as exc:
        _fail(exc)
    click.echo(f"executed notebook: {path}")


@main.command("book")
@click.option("--profile", default="default", show_default=True, type=click.Choice(runner.PROFILES))
@click.option("--no-run", is_flag=True, help="only build the HTML from the committed executed chapters")
@click.option("--section", "only", multiple=True, help="re-run only these sections")
def book_cmd(profile: str, no_run: bool, only: tuple[str, ...]) -> None:
    """Execute every chapter into book/sections/ and build the HTML book."""
    try:
        if not no_run:
            runner.run_book_sections(profile, only=list(only) or None)
        html = runner.build_html()
    except FragileError as exc:
        _fail(exc)
    click.echo(f"book: {html / 'index.html'}")


@main.command("check")
def check_cmd() -> None:
    """Fail if an executed chapter is missing or stale against its template and parameter profile."""
    try:
        problems = runner.stale_sections()
    except FragileError as exc:
        _fail(exc)
    for p in problems:
        click.echo(f"stale: {p}")
    if problems:
        sys.exit(1)
    click.echo("book is current: every chapter matches its template and profile")
