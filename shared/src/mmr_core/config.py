"""Dataclass configs from YAML files with command-line overrides, validated up front.

Recipes declare their settings as (nested) dataclasses. A run reads an optional YAML file, then
applies ``key.sub=value`` overrides from the command line; values are parsed as YAML scalars
(``lr=2e-5``, ``flags=[a,b]``, ``resume=null``). An unknown key is an error that names the key and
the closest valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override does not fit the config dataclass."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key_error(where: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{where}{key}'.{hint} Valid keys: {', '.join(sorted(valid))}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming the key."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"'{where}' may not be null (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{where}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{where}.")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"'{where}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            value = [value]
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{where}' must be true or false, got {value!r}")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "2e-5" (no dot) as a string; accept what Python reads as a float.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str:
        return str(value)
    if tp is Path:
        return Path(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"'{where}' expects {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    types_by_name = _field_types(cls)
    for key in values:
        if key not in types_by_name:
            raise _unknown_key_error(prefix, key, list(types_by_name))
    kwargs = {key: _coerce(val, types_by_name[key], f"{prefix}{key}") for key, val in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=2e-5)")
        _set_dotted(tree, key.replace("-", "_"), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, val in update.items():
        if isinstance(val, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), val)
        else:
            merged[key] = val
    return merged


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), base: C | None = None
) -> C:
    """Build a config dataclass from defaults (or ``base``), a YAML file and ``key=value`` overrides.

    Args:
        cls: The config dataclass type.
        path: Optional YAML file; its keys must be fields of ``cls`` (nested sections for nested dataclasses).
        overrides: Command-line overrides such as ``optim.lr=2e-5``.
        base: A starting instance (e.g. a named preset); defaults of ``cls`` otherwise.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type, or an unreadable file.
    """
    values: dict[str, Any] = to_dict(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        values = _merge(values, loaded)
    values = _merge(values, parse_overrides(overrides))
    return _build(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def save_config(config: Any, path: str | Path) -> Path:
    """Write a config dataclass as YAML (what a run used, next to its checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
