"""Strict configuration: frozen dataclasses built from YAML or notebook parameters.

Unknown keys, wrong types and out-of-range values are errors that name the parameter, raised before
any work starts. YAML files are read with a loader that rejects duplicate keys (a second ``execute:``
block would otherwise silently replace the first).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fragile.errors import InvalidArgumentError, check_choice, check_int, check_positive

T = TypeVar("T")

# The parameter profiles of book/params/: tests and CI, a reader's laptop, the committed book (computed once into
# the result store, then rendered from it), the paper's protocol on a GPU.
PROFILES = ("smoke", "default", "published", "paper")


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise InvalidArgumentError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} of {node.start_mark.name}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file, rejecting duplicate keys."""
    with open(path) as fh:
        return yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int → float, list → tuple), else raise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(name, value, option)
            except InvalidArgumentError:
                continue
        raise InvalidArgumentError(f"{name}={value!r} has the wrong type; expected {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise InvalidArgumentError(f"{name}={value!r} has the wrong type; expected None")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidArgumentError(f"{name}={value!r} has the wrong type; expected a list")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise InvalidArgumentError(f"{name}={value!r} must have {len(args)} elements")
        return tuple(_check_type(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"{name}={value!r} has the wrong type; expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"{name}={value!r} has the wrong type; expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{name}={value!r} has the wrong type; expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{name}={value!r} has the wrong type; expected a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build the frozen dataclass ``cls`` from ``values``, strictly.

    Unknown keys and ill-typed values raise :class:`InvalidArgumentError` naming the key; missing keys
    take the dataclass default; ``__post_init__`` then checks ranges.
    """
    if not isinstance(values, dict):
        raise InvalidArgumentError(f"{cls.__name__} needs a mapping of parameters, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InvalidArgumentError(f"unknown parameter(s) {unknown} for {cls.__name__}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    converted = {k: _check_type(k, v, hints[k]) for k, v in values.items()}
    return cls(**converted)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


# -- declared settings ----------------------------------------------------------------------------------------

Check = typing.Callable[[str, Any], None]


def setting(default: Any, help_text: str, check: Check | None = None) -> Any:
    """A config field: its default, its help text (meaning, and the paper's value where it has one) and the check
    of its range, kept in the field's metadata; :func:`check_settings` runs the checks and :func:`settings_help`
    lists the help."""
    return dataclasses.field(default=default, metadata={"help": help_text, "check": check})


def check_settings(config: Any) -> None:
    """Run the check of every field of ``config`` declared with :func:`setting`; raises
    :class:`InvalidArgumentError` naming the first field out of range."""
    for f in dataclasses.fields(config):
        check = f.metadata.get("check")
        if check is not None:
            check(f.name, getattr(config, f.name))


def settings_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` of every field of the config class ``cls`` declared with :func:`setting`; an
    integer range's bounds are stated at the end of its help."""
    hints = typing.get_type_hints(cls)
    return [
        (f.name, _type_name(hints[f.name]), f.default, f.metadata["help"] + _range_text(f.metadata.get("check")))
        for f in dataclasses.fields(cls)
        if "help" in f.metadata
    ]


def _range_text(check: Check | None) -> str:
    """`` (an integer from 1 to 10,000,000)`` for an integer-range check (directly or per element), else ""."""
    inner = check.keywords.get("check") if isinstance(check, functools.partial) and "check" in check.keywords else check
    if not (isinstance(inner, functools.partial) and inner.func is _check_int_in):
        return ""
    low, high = inner.keywords["minimum"], inner.keywords["maximum"]
    return f" (an integer from {low:,} to {high:,})" if high is not None else f" (an integer, at least {low:,})"


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def positive(name: str, value: Any) -> None:
    """A finite number > 0."""
    check_positive(name, value)


def non_negative(name: str, value: Any) -> None:
    """A finite number >= 0."""
    check_positive(name, value, allow_zero=True)


MAX_COUNT = 10_000_000
"""The largest value any count parameter (steps, points, seeds, sizes) takes unless its field says otherwise: ten
million is beyond every profile of the paper's protocol (its longest run is 500,000 steps), and a typo such as
``train_steps 1000000000`` is refused before it tries to allocate tens of gigabytes."""


def at_least(minimum: int, maximum: int = MAX_COUNT) -> Check:
    """An integer in ``[minimum, maximum]`` (:data:`MAX_COUNT` unless given)."""
    return functools.partial(_check_int_in, minimum=minimum, maximum=maximum)


def between(minimum: int, maximum: int) -> Check:
    """An integer in ``[minimum, maximum]``."""
    return functools.partial(_check_int_in, minimum=minimum, maximum=maximum)


def _check_int_in(name: str, value: Any, *, minimum: int, maximum: int | None) -> None:
    check_int(name, value, minimum=minimum, maximum=maximum)


def one_of(allowed: typing.Iterable[Any]) -> Check:
    """One of ``allowed``."""
    return functools.partial(_check_choice_in, allowed=tuple(allowed))


def _check_choice_in(name: str, value: Any, *, allowed: tuple) -> None:
    check_choice(name, value, allowed)


def fraction(*, low_open: bool = True, high: float = 1.0, high_open: bool = False) -> Check:
    """A number in (0, high] (or with the ends as asked)."""
    return functools.partial(_check_fraction, low_open=low_open, high=high, high_open=high_open)


def _check_fraction(name: str, value: Any, *, low_open: bool, high: float, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 < value if low_open else 0.0 <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}0, {high:g}{')' if high_open else ']'}"
        raise InvalidArgumentError(f"{name}={value!r} is not allowed; it must be in {interval}")


def each(check: Check, *, distinct: bool = False, nonempty: bool = False) -> Check:
    """A sequence whose every element passes ``check`` (named after the sequence), without repeats with
    ``distinct``, not empty with ``nonempty``."""
    return functools.partial(_check_each, check=check, distinct=distinct, nonempty=nonempty)


def _check_each(name: str, values: Any, *, check: Check, distinct: bool, nonempty: bool) -> None:
    if nonempty and not values:
        raise InvalidArgumentError(f"{name} is empty; give at least one value")
    for v in values:
        check(name, v)
    if distinct and len(set(values)) != len(values):
        raise InvalidArgumentError(f"{name}={list(values)} repeats a value")


def optional(check: Check) -> Check:
    """``None``, or a value that passes ``check``."""
    return functools.partial(_check_optional, check=check)


def _check_optional(name: str, value: Any, *, check: Check) -> None:
    if value is not None:
        check(name, value)
