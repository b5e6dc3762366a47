"""Strict configuration: frozen dataclasses built from YAML or notebook parameters.

Unknown keys, wrong types and out-of-range values are errors that name the parameter, raised before
any work starts. YAML files are read with a loader that rejects duplicate keys (a second ``execute:``
block would otherwise silently replace the first).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fragile.errors import InvalidArgumentError

T = TypeVar("T")

# The parameter profiles of book/params/: tests and CI, a reader's laptop, the paper's protocol on a GPU.
PROFILES = ("smoke", "default", "paper")


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
