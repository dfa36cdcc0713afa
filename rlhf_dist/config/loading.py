"""YAML + dotted overrides -> typed dataclasses, generically over any dataclass in ``schema.py``.

Every failure is a ``ConfigError`` whose message is one line: the key path, the bad value and the fix.
"""
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from .schema import RunConfig

# The embedded default: the repo's configs/tiny_cpu.yaml (rlhf_dist/config/loading.py -> repo root).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"

# PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; float fields accept such numeric strings.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A bad config: ``key`` is the dotted path (None when the problem is not one key)."""

    def __init__(self, key: str | None, message: str):
        self.key = key
        text = f"{key}: {message}" if key else message
        super().__init__(" ".join(text.split()))  # one line, whatever went into it


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The config file itself is missing; catchable as either parent."""


class _Mismatch(ConfigError):
    """The value has the wrong type (a union tries its next member on this one only)."""


def _show(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return f"a mapping of {_describe(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (a section)"
    return {bool: "bool (true/false)"}.get(tp, getattr(tp, "__name__", str(tp)))


def _section_type(tp: Any) -> type | None:
    """The dataclass behind a field type (also inside `X | None`), else None."""
    for t in (typing.get_args(tp) if _is_union(tp) else (tp,)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        sub = _section_type(tp)
        out += _leaf_paths(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return out


def _unknown_key(cls: type, prefix: str, name: Any, root: type) -> ConfigError:
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
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, root)
            except _Mismatch:
                pass  # other errors (unknown key inside a section, bad choice) are precise already: let them out
        raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}; write it as `{key}: {{...}}`")
        return from_dict(tp, value, key + ".", root)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        hint = difflib.get_close_matches(str(value), list(map(str, choices)), n=1)
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, choices))}"
                               + (f"; did you mean {hint[0]}?" if hint else ""))
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}")
        return [coerce(v, typing.get_args(tp)[0], f"{key}[{i}]", root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}")
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
    raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}")


def from_dict(cls: type, data: dict, prefix: str = "", root: type = RunConfig) -> Any:
    """Build dataclass `cls` from a plain dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in hints:
            raise _unknown_key(cls, prefix, name, root)
    return cls(**{name: coerce(value, hints[name], prefix + name, root) for name, value in data.items()})


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | os.PathLike | None = None) -> str:
    """The config as YAML (loads back to an equal config); written to `path` when given."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigFileNotFoundError(None, f"config file {str(path)!r} not found (cwd {os.getcwd()}); pass the path "
                                            f"of a YAML file, e.g. configs/tiny_cpu.yaml")
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader)
    except _DuplicateKey as err:
        raise ConfigError(None, f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(None, f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}; fix the syntax") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(None, f"{path}: the top level must be a mapping of sections (model:, train:, ...), "
                                f"got {_show(data)}")
    return data


def _accepts_str(tp: Any) -> bool:
    return tp is str or (_is_union(tp) and str in typing.get_args(tp))


def _parse_override_value(raw: str, tp: Any) -> Any:
    raw = raw.strip()
    try:
        parsed = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        parsed = raw  # not YAML (e.g. 'a: b: c'): only a str field can take it, and coerce says so otherwise
    if _accepts_str(tp) and parsed is not None and not isinstance(parsed, str):
        return raw  # name=2024 or a path like /data/x:y stays the text the user typed
    return parsed


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def apply_override(data: dict, text: str, root: type = RunConfig) -> None:
    """Apply one `a.b.c=value` to the raw dict tree; the value is YAML (3, 1e-5, null, true, [a, b], {k: v})."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(None, f"override {text!r}: expected KEY=VALUE, e.g. train.iterations=10")
    cls, node, parts = root, data, key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        prefix = ".".join(parts[:i])
        if part not in hints:
            raise _unknown_key(cls, prefix + "." if prefix else "", part, root)
        tp = hints[part]
        if i == len(parts) - 1:
            value = _parse_override_value(raw, tp)
            if _section_type(tp) and isinstance(value, dict) and isinstance(node.get(part), dict):
                _merge(node[part], value)
            else:
                node[part] = value
            return
        cls = _section_type(tp)
        if cls is None:
            raise ConfigError(".".join(parts[:i + 1]), f"is a value ({_describe(tp)}), not a section; "
                                                       f"override it as {'.'.join(parts[:i + 1])}=VALUE")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def resolve_paths(cfg: Any, base: str | os.PathLike) -> None:
    """Make relative `path=True` fields absolute against `base` (in place): actors may run in another cwd."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            resolve_paths(value, base)
        elif f.metadata.get("path") and isinstance(value, str) and value:
            setattr(cfg, f.name, os.path.normpath(os.path.join(base, os.path.expanduser(value))))


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read YAML (None = the embedded default tiny_cpu.yaml), apply overrides, type-check and validate."""
    from .validate import validate  # imported here: validate.py imports this module

    if isinstance(overrides, str):
        overrides = [overrides]
    data = read_yaml(DEFAULT_CONFIG if path is None else path)
    for text in overrides:
        apply_override(data, text)
    cfg = from_dict(RunConfig, data)
    # Relative paths are relative to the cwd of whoever loads the config. Locally (embedded Ray or `auto` on the
    # head node) that cwd is known here, so pin it; through `ray://` they name paths on the cluster, left as given.
    if not (cfg.ray.address or "").startswith("ray://"):
        resolve_paths(cfg, os.getcwd())
    return validate(cfg)
