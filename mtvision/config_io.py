"""Strict dataclass configs: YAML files with one `base:`, dotted command-line overrides, typed conversion.

The generic loader every config of mtvision (run, model, search) is read with; it imports nothing
from mtvision but errors and atomic writes.

`load_config(ExperimentConfig, "configs/x.yaml", ["optim.lr=1e-3"])` reads the file chain (each file may
name at most one `base:`, relative to itself; the child wins, dicts merge, lists replace), applies the
overrides (values parsed with `yaml.safe_load`), and converts the result with `from_dict`, which rejects
unknown keys (naming the closest valid dotted key), wrong types (naming the key, the expected type and the
value) and missing required fields. PyYAML reads `1e-3` as a string, so float fields accept number-shaped
strings; nothing else is coerced (a bool field refuses "yes" as a string, an int field refuses 1.5).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mtvision.atomic import atomic_write_bytes
from mtvision.errors import MTVisionError, UnknownNameError, closest

T = TypeVar("T")

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_MISSING = object()


class ConfigError(MTVisionError, ValueError):
    """A config file, override or value that is malformed, of the wrong type or inconsistent."""


class UnknownKeyError(ConfigError, UnknownNameError):
    """A config key that the target dataclass does not have."""


# ----------------------------------------------------------------------------------------------------------
# strict conversion


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    return getattr(hint, "__name__", str(hint))


def _wrong(where: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {where!r}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against (and converted to) the annotation `hint`; `where` is its dotted key."""
    if hint is Any or hint is object:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _wrong(where, hint, value)
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except UnknownKeyError:
                raise  # the value has the right shape; report the precise problem
            except ConfigError:
                continue
        raise _wrong(where, hint, value)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        allowed = ", ".join(repr(a) for a in args)
        hint_name = closest(str(value), [str(a) for a in args]) if isinstance(value, str) else None
        extra = f"; did you mean {hint_name!r}?" if hint_name else ""
        raise ConfigError(f"config key {where!r}: {value!r} is not one of {allowed}{extra}")
    if hint in (list, tuple, dict):
        origin, args = hint, ()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, hint, value)
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, hint, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key {where!r}: expected {len(args)} items ({_type_name(hint)}), got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _wrong(where, hint, value)
        key_type, item = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if key_type is str and not isinstance(k, str):
                raise ConfigError(f"config key {where!r}: keys must be strings, got {k!r} ({type(k).__name__})")
            out[k] = _convert(v, item, _join(where, k))
        return out
    if hint is bool:
        if not isinstance(value, bool):
            raise _wrong(where, hint, value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(where, hint, value)
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(where, hint, value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _wrong(where, hint, value)
        return value
    if isinstance(hint, type):
        if not isinstance(value, hint):
            raise _wrong(where, hint, value)
        return value
    raise ConfigError(f"config key {where!r}: unsupported annotation {hint!r}")


def _build(cls: type[T], data: Any, prefix: str) -> T:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix or '<root>'!r}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            hint = closest(str(key), names)
            extra = f"; did you mean {_join(prefix, hint)!r}?" if hint else ""
            raise UnknownKeyError(f"unknown key {_join(prefix, key)!r}{extra} (valid: {', '.join(names)})")
    missing = [
        _join(prefix, f.name)
        for f in fields
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(repr(m) for m in missing)}")
    kwargs = {name: _convert(data[name], hints[name], _join(prefix, name)) for name in names if name in data}
    return cls(**kwargs)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Strictly convert a plain (nested) dict into the dataclass `cls`, then call its `validate()` if any.

    `prefix` is the dotted key of `data` inside a larger config, used in error messages.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    config = _build(cls, data, prefix)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass `cfg` as plain nested dicts/lists (tuples become lists), ready for YAML or JSON."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------
# files and overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """`child` over `base`: dicts merge recursively, everything else (lists included) is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file merged over its chain of `base:` files, as a plain dict (no `base` key)."""
    chain: list[Path] = []
    current = Path(path).resolve()
    layers: list[dict[str, Any]] = []
    while True:
        if current in chain:
            cycle = " -> ".join(str(p) for p in [*chain, current])
            raise ConfigError(f"config base cycle: {cycle}")
        if not current.is_file():
            where = f" (the base of {chain[-1]})" if chain else ""
            raise ConfigError(f"config file not found: {current}{where}")
        chain.append(current)
        data = _read_yaml(current)
        base = data.pop("base", None)
        layers.append(data)
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise ConfigError(
                f"config file {current}: 'base' must be one file name (at most one base per file), got {base!r}"
            )
        current = (current.parent / base).resolve()
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = deep_merge(merged, layer)
    return merged


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with dotted `key=value` overrides applied in order (values parsed by `yaml.safe_load`)."""
    out = deep_merge({}, data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or not all(parts):
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value: {exc}") from exc
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {item!r}: {where!r} holds {child!r}, not a mapping")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """The dataclass `cls` from a YAML file (with its `base:` chain) and dotted overrides, strictly checked."""
    data = apply_overrides(read_config_file(path), overrides)
    try:
        return from_dict(cls, data)
    except UnknownKeyError as exc:
        raise UnknownKeyError(f"{path}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config atomically: JSON when `path` ends with .json, else YAML."""

    data = config_to_dict(cfg)
    if str(path).endswith(".json"):
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    atomic_write_bytes(path, text.encode("utf-8"))
