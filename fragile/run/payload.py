"""Job results on disk without pickle: the structure as JSON, every array in one ``.npz`` read with
``allow_pickle=False``. Loading either runs no code, whoever wrote the files.

What a result may hold: ``None``, ``bool``, ``int``, ``float`` (NaN and infinities included), ``str``, lists, tuples,
dicts with string keys, numpy arrays and scalars of a numeric or boolean dtype, torch tensors (stored as
arrays and restored as CPU tensors of the same dtype), and frozen dataclasses registered with :func:`record`
(stored field by field and rebuilt by their constructor; a name that is not a registered record of this package is
refused on load, so a payload can only ever build the package's own result types). Anything else is refused by
name when the result is saved, so an unsupported value fails its job loudly instead of being stored in a form
that loads differently.
Values come back as they went in, bit for bit: arrays are stored raw, floats by their shortest round-trip
``repr``; a numpy scalar comes back as the Python number of the same value.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
from typing import Any, TypeVar

import numpy as np
import torch

from fragile.errors import FragileError

# Tags of the JSON objects that stand for a value JSON has no type for; no result's own dict may use them as keys.
ARRAY, TENSOR, TUPLE, RECORD = "__array__", "__tensor__", "__tuple__", "__record__"
TAGS = (ARRAY, TENSOR, TUPLE, RECORD)
# Only this package's modules may be imported to find a record type named in a payload.
PACKAGE = "fragile."

_RECORDS: dict[str, type] = {}
R = TypeVar("R", bound=type)


class PayloadError(FragileError, TypeError):
    """A result holds a value the payload format cannot store exactly; the message names where it is."""


def record_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def record(cls: R) -> R:
    """Register the frozen dataclass ``cls`` as a type job results may hold (a class decorator)."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__qualname__}: only frozen dataclasses can be payload records")
    if not cls.__module__.startswith(PACKAGE):
        raise TypeError(f"{cls.__qualname__}: payload records are this package's types only")
    _RECORDS[record_name(cls)] = cls
    return cls


def _record_type(name: str) -> type:
    """The registered record ``name``; its module (this package's only) is imported when it is not yet."""
    if name not in _RECORDS:
        module = name.partition(":")[0]
        if not module.startswith(PACKAGE):
            raise PayloadError(f"the payload names a record type {name!r} outside this package")
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise PayloadError(f"the payload names a record type {name!r} whose module does not exist") from exc
    if name not in _RECORDS:
        raise PayloadError(f"the payload names a record type {name!r} that is not registered")
    return _RECORDS[name]


def encode(result: Any) -> tuple[str, bytes]:
    """``result`` as ``(JSON text, .npz bytes)``; raises :class:`PayloadError` naming the first value it cannot store."""
    arrays: dict[str, np.ndarray] = {}

    def store(array: np.ndarray, where: str) -> str:
        if array.dtype.kind not in "biufc":
            raise PayloadError(f"{where}: an array of dtype {array.dtype} cannot be stored without pickle")
        key = f"a{len(arrays)}"
        arrays[key] = array
        return key

    def enc(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):
            if value.dtype.kind not in "biuf":
                raise PayloadError(f"{where}: a numpy scalar of dtype {value.dtype} cannot be stored")
            return value.item()
        if isinstance(value, np.ndarray):
            return {ARRAY: store(value, where)}
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bfloat16:
                raise PayloadError(f"{where}: a bfloat16 tensor has no numpy dtype; convert it before returning it")
            return {TENSOR: store(value.detach().cpu().numpy(), where)}
        if isinstance(value, tuple):
            return {TUPLE: [enc(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            name = record_name(type(value))
            if _RECORDS.get(name) is not type(value):
                raise PayloadError(f"{where}: a {type(value).__name__} is not a registered record (see payload.record)")
            fields = {f.name: enc(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
            return {RECORD: name, "fields": fields}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str) or k in TAGS:
                    raise PayloadError(f"{where}: the key {k!r} is not allowed (keys must be strings other than {list(TAGS)})")
                out[k] = enc(v, f"{where}[{k!r}]")
            return out
        raise PayloadError(f"{where}: a {type(value).__name__} cannot be stored in a job result")

    tree = enc(result, "result")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return json.dumps(tree, allow_nan=True), buffer.getvalue()


def decode(text: str, npz: bytes) -> Any:
    """The result :func:`encode` stored; raises :class:`PayloadError` when the two parts do not belong together."""
    with np.load(io.BytesIO(npz), allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}

    def array(key: str) -> np.ndarray:
        if key not in arrays:
            raise PayloadError(f"the payload names an array {key!r} that its .npz does not hold")
        return arrays[key]

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if isinstance(value, dict):
            if len(value) == 1 and ARRAY in value:
                return array(value[ARRAY])
            if len(value) == 1 and TENSOR in value:
                return torch.from_numpy(array(value[TENSOR]).copy())
            if len(value) == 1 and TUPLE in value:
                return tuple(dec(v) for v in value[TUPLE])
            if RECORD in value:
                cls = _record_type(value[RECORD])
                fields = {k: dec(v) for k, v in value["fields"].items()}
                names = {f.name for f in dataclasses.fields(cls)}
                if set(fields) != names:
                    raise PayloadError(f"the payload's {value[RECORD]} has fields {sorted(fields)}, the type {sorted(names)}")
                return cls(**fields)
            return {k: dec(v) for k, v in value.items()}
        return value

    return dec(json.loads(text))
