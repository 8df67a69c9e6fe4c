"""What identifies a metric function across runs, so a resumed computation never reuses results
of a different metric that happens to share its name (or of another lambda)."""

from __future__ import annotations

import dataclasses
import hashlib
import types

import numpy as np

from attrpatch.task import METRICS


class UnidentifiableMetric(ValueError):
    """A metric depends on something whose identity cannot be written down (an arbitrary object)."""


def metric_identity(metric_fn) -> str:
    """A hex digest identifying `metric_fn`: a built-in metric's name, else a hash of its module,
    qualified name, bytecode, constants, defaults, closure values and the globals it reads (in
    turn identified the same way: functions by their code, modules by name, arrays by content).

    Raises :class:`UnidentifiableMetric` naming the part that has no stable identity (an object
    whose repr is its memory address, say): resuming with such a metric cannot be made safe.
    """
    for name, fn in METRICS.items():
        if metric_fn is fn:
            return f"builtin:{name}"
    parts: list[bytes] = []
    _identify(metric_fn, parts, seen=set(), where=getattr(metric_fn, "__qualname__", "metric"))
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def _identify(value, parts: list[bytes], seen: set[int], where: str) -> None:
    """Append bytes that identify `value` to `parts` (recursing through functions and containers)."""
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        parts.append(f"{type(value).__name__}:{value!r}".encode())
    elif isinstance(value, tuple | list | set | frozenset):
        parts.append(f"{type(value).__name__}:{len(value)}".encode())
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        for i, item in enumerate(items):
            _identify(item, parts, seen, f"{where}[{i}]")
    elif isinstance(value, dict):
        parts.append(f"dict:{len(value)}".encode())
        for k in sorted(value, key=repr):
            _identify(k, parts, seen, where)
            _identify(value[k], parts, seen, f"{where}[{k!r}]")
    elif isinstance(value, types.ModuleType):
        parts.append(f"module:{value.__name__}".encode())
    elif isinstance(value, type | types.BuiltinFunctionType):
        parts.append(f"named:{value.__module__}.{value.__qualname__}".encode())
    elif isinstance(value, types.FunctionType):
        if id(value) in seen:  # recursion: the function is already being identified
            parts.append(f"function:{value.__qualname__}".encode())
            return
        seen.add(id(value))
        parts.append(f"function:{value.__module__}.{value.__qualname__}".encode())
        _identify_code(value.__code__, parts, seen, where)
        _identify(value.__defaults__, parts, seen, f"{where} defaults")
        _identify(value.__kwdefaults__, parts, seen, f"{where} keyword defaults")
        for name, cell in zip(value.__code__.co_freevars, value.__closure__ or (), strict=True):
            _identify(cell.cell_contents, parts, seen, f"{where}: captured {name!r}")
        for name in _global_names(value.__code__):
            if name in value.__globals__:
                _identify(value.__globals__[name], parts, seen, f"{where}: global {name!r}")
    elif hasattr(value, "__array__") and hasattr(value, "dtype"):  # numpy and JAX arrays
        a = np.asarray(value)
        parts.append(f"array:{a.dtype}:{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
    elif dataclasses.is_dataclass(value):  # e.g. a Task or Model: identified by its fields
        parts.append(f"dataclass:{type(value).__module__}.{type(value).__qualname__}".encode())
        for f in dataclasses.fields(value):
            _identify(getattr(value, f.name), parts, seen, f"{where}.{f.name}")
    elif " at 0x" in repr(value):
        raise UnidentifiableMetric(
            f"the metric's {where} is a {type(value).__name__} with no stable identity "
            f"({repr(value)[:60]}); pass a plain function of arrays and numbers")
    else:
        parts.append(f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode())


def _identify_code(code: types.CodeType, parts: list[bytes], seen: set[int], where: str) -> None:
    parts += [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # a nested function or lambda
            _identify_code(const, parts, seen, where)
        else:
            _identify(const, parts, seen, f"{where} constant")


def _global_names(code: types.CodeType) -> list[str]:
    """Names `code` (and the functions nested in it) may read as globals."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return list(dict.fromkeys(names))
