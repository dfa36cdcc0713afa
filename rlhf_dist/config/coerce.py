"""Typed coercion of plain YAML values into the schema's dataclasses, generically over any dataclass in
``schema.py``; shared by loading (files, overrides) and validation (re-typing a built config).
"""

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from .errors import ConfigError
from .schema import RunConfig

# PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; float fields accept such numeric strings.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Mismatch(ConfigError):
    """The value has the wrong type (a union tries its next member on this one only)."""


def show_value(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe_type(tp: Any) -> str:
    if is_union(tp):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return f"a list of {describe_type(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return f"a mapping of {describe_type(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (a section)"
    return {bool: "bool (true/false)"}.get(tp, getattr(tp, "__name__", str(tp)))


def section_type(tp: Any) -> type | None:
    """The dataclass behind a field type (also inside `X | None`), else None."""
    for t in typing.get_args(tp) if is_union(tp) else (tp,):
        if dataclasses.is_dataclass(t):
            return t
    return None


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        sub = section_type(tp)
        out += _leaf_paths(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return out


def unknown_key(cls: type, prefix: str, name: Any, root: type) -> ConfigError:
    key = f"{prefix}{name}"
    valid = list(typing.get_type_hints(cls))
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    if close:
        return ConfigError(key, f"unknown key; did you mean {prefix}{close[0]}?")
    # The right name in the wrong section (train.temperature) is the next most common slip.
    elsewhere = [p for p in _leaf_paths(root) if p.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return ConfigError(key, f"unknown key; did you mean {' or '.join(elsewhere)}?")
    return ConfigError(key, f"unknown key; valid keys here: {', '.join(valid)}")


def coerce(value: Any, tp: Any, key: str, root: type = RunConfig) -> Any:
    """Check `value` against the annotation `tp` and return it typed (int -> float, '1e-5' -> float)."""
    if is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, root)
            except _Mismatch:
                pass  # other errors (unknown key inside a section, bad choice) are precise already: let them out
        raise _Mismatch(key, f"expected {describe_type(tp)}, got {show_value(value)}")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch(key, f"expected {describe_type(tp)}, got {show_value(value)}; write it as `{key}: {{...}}`")
        return from_dict(tp, value, key + ".", root)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        hint = difflib.get_close_matches(str(value), list(map(str, choices)), n=1)
        raise ConfigError(
            key,
            f"{value!r} is not one of {', '.join(map(str, choices))}" + (f"; did you mean {hint[0]}?" if hint else ""),
        )
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch(key, f"expected {describe_type(tp)}, got {show_value(value)}")
        return [coerce(v, typing.get_args(tp)[0], f"{key}[{i}]", root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(key, f"expected {describe_type(tp)}, got {show_value(value)}")
        return {str(k): coerce(v, typing.get_args(tp)[1], f"{key}.{k}", root) for k, v in value.items()}
    if tp is float:
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):  # bool is an int subclass; true is not 1 here
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch(key, f"expected {describe_type(tp)}, got {show_value(value)}")


def from_dict(cls: type, data: dict, prefix: str = "", root: type = RunConfig) -> Any:
    """Build dataclass `cls` from a plain dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in hints:
            raise unknown_key(cls, prefix, name, root)
    return cls(**{name: coerce(value, hints[name], prefix + name, root) for name, value in data.items()})


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
