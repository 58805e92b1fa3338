"""Typed configuration from YAML plus dotted command-line overrides.

Precedence: command line > YAML file > dataclass defaults. Every key is checked against the
dataclass tree: an unknown key is an error naming the key and the closest valid one, and every error
says whether the mistake is in the YAML file (its path) or on the command line (the option as typed).
Why this is hand-written rather than built on simple-parsing: docs/config.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key, the value and the fix."""


class _Refused(ConfigError):
    """A value the dataclass itself refused (``__post_init__``); load_config names where it came from."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where  # " in 'lora'": the section, for messages about the YAML file


def load_config(
    cls: type[T],
    path: str | Path | None,
    overrides: list[str] | None = None,
    validate: Callable[[T], None] | None = None,
) -> T:
    """Build ``cls`` from the YAML file at ``path`` and ``--key value`` overrides, then ``validate`` it.

    Every error names where the mistake is: ``PATH: ...`` for the file, ``command line: '--key' ...``
    for an option, so a user never searches the YAML file for a typo made on the command line.
    """
    source = str(path) if path is not None else "config"
    raw = _read_yaml(Path(path)) if path is not None else {}
    typed: dict[str, str] = {}  # dotted key -> the option as typed, e.g. "--optim.lr 1e-4"
    for o in _split_overrides(overrides or []):
        value = _parse_value(o.text)
        _check_option(cls, o, value)
        _set_dotted(raw, o.key, value)
        typed[o.key] = o.typed
    try:
        obj = build(cls, raw, source)
    except _Refused as e:
        raise ConfigError(_name_origin(str(e), e.where, typed, source)) from None
    if validate is not None:
        try:
            validate(obj)
        except ValueError as e:
            raise ConfigError(_name_origin(str(e), "", typed, source)) from None
    return obj


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level.")
    return raw


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``--optim.lr 1e-4`` or ``--optim.lr=1e-4``; values are parsed as YAML scalars."""
    return [(o.key, _parse_value(o.text)) for o in _split_overrides(argv)]


class _Override(typing.NamedTuple):
    option: str  # "--max-steps"
    key: str  # "max_steps"
    text: str  # "50"
    typed: str  # "--max-steps 50", for messages


def _split_overrides(argv: list[str]) -> list[_Override]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(
                f"command line: unexpected argument {arg!r}: overrides look like --max_steps 50 or --optim.lr=1e-4"
            )
        if "=" in arg:
            option, text = arg.split("=", 1)
            typed = arg
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: {arg} needs a value, e.g. {arg} 10")
            option, text = arg, argv[i + 1]
            typed = f"{arg} {shlex.quote(text)}"
            i += 2
        out.append(_Override(option, option[2:].replace("-", "_"), text, typed))
    return out


def _parse_value(text: str) -> Any:
    """A command-line value as YAML would read it (``false``, ``null``, ``[wq, wv]``); text that is not
    YAML (``[x``) stays a string, and the field's type decides whether a string is acceptable."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _check_option(cls: type, o: _Override, value: Any) -> None:
    """Resolve a dotted command-line key in the dataclass tree and check its value's type, so that a
    mistake is reported as the option the user typed rather than as a key of the YAML file."""
    tp: Any = cls
    for part in o.key.split("."):
        fields = _init_fields(tp) if _is_section(tp) else {}
        if part not in fields:
            raise ConfigError(f"command line: unknown option '{o.option}'.{_suggest_option(cls, o.key)}")
        tp = typing.get_type_hints(tp)[part]
    try:
        _convert(tp, value, "command line", f"--{o.key}")
    except _Refused as e:  # a whole section given as a mapping, e.g. --lora '{rank: 0}'
        raise ConfigError(f"command line ({o.typed}): {e}") from None


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _option_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the tree: sections (``optim``) and their fields (``optim.lr``)."""
    out = []
    hints = typing.get_type_hints(cls)
    for name in _init_fields(cls):
        out.append(prefix + name)
        if _is_section(hints[name]):
            out += _option_paths(hints[name], f"{prefix}{name}.")
    return out


def _suggest_option(cls: type, key: str) -> str:
    paths = _option_paths(cls)
    leaf = key.rsplit(".", 1)[-1]
    candidates = [p for p in paths if p.endswith("." + leaf)][:3]  # --lr -> --optim.lr
    candidates = candidates or difflib.get_close_matches(key, paths, n=1)  # --optim.lrr -> --optim.lr
    if candidates:
        return " Did you mean " + " or ".join(f"'--{c}'" for c in candidates) + "?"
    return " Options are the config's keys, dotted for nested ones: " + ", ".join(
        f"--{p}" for p in paths if "." not in p
    ) + "."


def _name_origin(message: str, where: str, typed: dict[str, str], source: str) -> str:
    """Prefix a refused value's message with where the value came from: the command-line option the
    message names, else the YAML file (validation messages name their keys as dotted paths)."""
    for key in sorted(typed, key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message):
            return f"command line ({typed[key]}): {message}"
    return f"{source}{where}: {message}"


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for k, v in value.items():  # --lora '{scaling: 1}' overrides that key, not the YAML's whole section
            _set_dotted(node[parts[-1]], k, v)
    else:
        node[parts[-1]] = value


def build(cls: type[T], raw: dict[str, Any], source: str, prefix: str = "") -> T:
    """``raw`` (from YAML) -> ``cls``, checking keys and types; ``source`` prefixes the messages.
    A value ``cls`` itself refuses raises _Refused, which load_config attributes to its origin."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' must be a mapping, got {raw!r}.")
    fields = _init_fields(cls)
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
        raise _Refused(str(e), f" in '{prefix.rstrip('.')}'" if prefix else "") from None


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
