"""YAML + dotted overrides -> typed dataclasses, generically over any dataclass in ``schema.py``.

Every failure is a ``ConfigError`` whose message is one line: the key path, the bad value and the fix.
"""

import dataclasses
import os
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .coerce import config_to_dict, describe_type, from_dict, is_union, section_type, show_value, unknown_key
from .errors import ConfigError, ConfigFileNotFoundError
from .schema import RunConfig
from .validate import validate

# The embedded default: the repo's configs/tiny_cpu.yaml (rlhf_dist/config/loading.py -> repo root).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


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
        raise ConfigFileNotFoundError(
            None,
            f"config file {str(path)!r} not found (cwd {os.getcwd()}); pass the path "
            f"of a YAML file, e.g. configs/tiny_cpu.yaml",
        )
    try:
        data = yaml.load(p.read_text(), Loader=_StrictLoader)
    except _DuplicateKey as err:
        raise ConfigError(None, f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            None, f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}; fix the syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            None, f"{path}: the top level must be a mapping of sections (model:, train:, ...), got {show_value(data)}"
        )
    return data


def _accepts_str(tp: Any) -> bool:
    return tp is str or (is_union(tp) and str in typing.get_args(tp))


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
            raise unknown_key(cls, prefix + "." if prefix else "", part, root)
        tp = hints[part]
        if i == len(parts) - 1:
            value = _parse_override_value(raw, tp)
            if section_type(tp) and isinstance(value, dict) and isinstance(node.get(part), dict):
                _merge(node[part], value)
            else:
                node[part] = value
            return
        cls = section_type(tp)
        if cls is None:
            raise ConfigError(
                ".".join(parts[: i + 1]),
                f"is a value ({describe_type(tp)}), not a section; override it as {'.'.join(parts[: i + 1])}=VALUE",
            )
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
