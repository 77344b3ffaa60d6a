"""Typed configs: YAML or dicts parsed into nested dataclasses, with `a.b=value` overrides and strict checks."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or an override is malformed."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unknown_key_error(key: str, path: str, valid: list[str]) -> ConfigError:
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}'.{hint} Valid keys here: {', '.join(sorted(valid))}.")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dict -> dataclass, list -> tuple)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"config key '{path}' = {value!r} matches none of {_type_name(tp)}: " + "; ".join(errors))
    if origin is Literal:
        if value is False and "no" in args and False not in args:
            value = "no"  # YAML reads an unquoted `no` (or off, false) as False: `mixed_precision=no` means "no"
        if value not in args:
            raise ConfigError(f"config key '{path}' = {value!r} is not valid; choose one of {', '.join(repr(a) for a in args)}.")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping of {tp.__name__} fields, got {value!r}.")
        return from_dict(tp, value, path=path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}.")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{path}' must have {len(args)} items, got {len(value)}: {value!r}.")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}.")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a float, got {value!r} ({type(value).__name__}).")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an int, got {value!r} ({type(value).__name__}).")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"config key '{path}' must be a {tp.__name__}, got {value!r} ({type(value).__name__}).")
        return value
    if isinstance(tp, type) and issubclass(tp, Path):
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"config key '{path}' must be a path string, got {value!r}.")
        return Path(value)
    raise ConfigError(f"config key '{path}' has an unsupported annotation {tp!r}.")


def from_dict(schema: type[T], data: dict, *, path: str = "") -> T:
    """Build the dataclass `schema` from a plain dict, checking every key and type.

    Unknown keys and wrong types raise ConfigError naming the full key path and the valid choices.
    Missing keys take the dataclass defaults (a field without a default must be given).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path or '<root>'}' must be a mapping, got {type(data).__name__}.")
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(key, path, list(fields))
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f" in '{path}'" if path else ""
        raise ConfigError(f"missing required config key(s){where}: {', '.join(missing)}.")
    try:
        return schema(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ validation
        raise ConfigError(f"invalid config '{path or schema.__name__}': {err}") from err


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON/YAML-safe data (tuples become lists, paths become strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], schema: type | None = None) -> dict:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict, returning a new dict.

    With `schema` given, an override of a key the schema does not have raises at once, naming it.
    """
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value (for example train.lr=3e-4).")
        key, raw = item.split("=", 1)
        keys = key.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override '{item}' has an empty key part.")
        if schema is not None:
            _check_path(schema, keys)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def _check_path(schema: type, keys: list[str]) -> None:
    tp: Any = schema
    for i, k in enumerate(keys):
        while get_origin(tp) in (Union, types.UnionType):
            inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
            if not inner:
                break
            tp = inner[0]
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override key '{'.'.join(keys)}': '{'.'.join(keys[:i])}' is not a section.")
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if k not in names:
            raise _unknown_key_error(k, ".".join(keys[:i]), names)
        tp = get_type_hints(tp)[k]


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def load_config(source: str | Path | dict, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Parse a YAML file (or dict) plus `a.b=value` overrides into the dataclass `schema`."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    data = apply_overrides(data, overrides, schema)
    return from_dict(schema, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML, loadable again with `load_config`."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
