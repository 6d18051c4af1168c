"""Typed configs: YAML/dicts validated into dataclasses with one-line errors.

Every component (model, data, training, evaluation) defines a dataclass; :func:`from_dict` checks
keys and types recursively and :class:`FieldError` raised in ``__post_init__`` range checks is
re-raised with the full dotted key, e.g. ``train.lr must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from drrl.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; accept the YAML 1.2 float forms that configs use."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


# What PyYAML raises on bad input: syntax errors, and from its constructors malformed tagged or implicit scalars
# (``!!int abc``, ``2001-13-45``, ``!!bool maybe``, a 5000-digit integer) and nesting deeper than the stack
YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, LookupError, RecursionError)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class FieldError(ConfigError):
    """Raised by ``__post_init__`` checks; :func:`from_dict` prefixes the dotted key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


def require(ok: bool, field: str, message: str) -> None:
    """``require(lr > 0, "lr", f"must be > 0, got {lr}")``."""
    if not ok:
        raise FieldError(field, message)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} must be {_describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".")
    if origin is typing.Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        raise bad
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise bad
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config type {tp!r} for {key}")


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: Mapping | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type.

    >>> from_dict(TrainConfig, {"lr": 3e-4}, prefix="train.")
    """
    if data is None:
        data = {}
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for k in data:
        if k not in fields:
            raise ConfigError(f"unknown key '{prefix}{k}'; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{prefix}{e.field} {e.message}") from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place."""
    if isinstance(overrides, str | bytes):
        raise ConfigError(
            f"overrides must be a list of key=value strings, got the string {overrides!r}; wrap it in a list"
        )
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set train.max_steps=50)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except YAML_ERRORS:
            value = raw
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML file such as configs/shakespeare-gpt-tiny.yaml")
    try:
        data = parse_yaml(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except YAML_ERRORS as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, train, eval)")
    return data
