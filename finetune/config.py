"""Typed configuration from YAML plus dotted command-line overrides.

Precedence: command line > YAML file > dataclass defaults. Every key is checked against the
dataclass tree: an unknown key is an error naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key, the value and the fix."""


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level.")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    return build(cls, raw, source=str(path) if path else "config")


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``--optim.lr 1e-4`` or ``--optim.lr=1e-4``; values are parsed as YAML scalars."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --max_steps 50 or --optim.lr=1e-4")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value, e.g. {arg} 10")
            key, text = arg[2:], argv[i + 1]
            i += 2
        out.append((key.replace("-", "_"), yaml.safe_load(text) if text != "" else ""))
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def build(cls: type[T], raw: dict[str, Any], source: str, prefix: str = "") -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' must be a mapping, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(fields))}."
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'.{hint}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(hints[name], value, source, f"{prefix}{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required key '{prefix}{missing[0]}'.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = f" in '{prefix.rstrip('.')}'" if prefix else ""
        raise ConfigError(f"{source}{where}: {e}") from None


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for alternative in args[:-1]:  # the first alternative that takes the value, else the last's error
            try:
                return _convert(alternative, value, source, key)
            except ConfigError:
                pass
        return _convert(args[-1], value, source, key)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return build(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}.")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(inner, v, source, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}.")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-able dict (for run_dir/args.yaml)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
