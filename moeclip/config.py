"""Typed recipe configs: dataclasses filled from YAML, then `key=value` overrides.

Unknown keys and wrong types stop the run with one line naming the key, so a typo never
silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem, phrased for the user: which key, what is wrong, what to do."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. output_dir=runs/x)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return from_dict(cls, data, where=str(path) if path else "config")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", prefix: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}'; known keys here: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, where, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: '{key}' = {value!r} fits none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML follows YAML 1.1, which reads `lr=3e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be {tp.__name__}, got {value!r}")
    return value


def parse_recipe_args(cls: type[T], argv: list[str], default_config: str | Path | None,
                      description: str = "") -> T:
    """`[--config PATH] [key=value ...]`: the recipe command-line convention."""
    import argparse
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Overrides use dotted keys, e.g. output_dir=runs/x data.train=a.csv")
    parser.add_argument("--config", default=str(default_config) if default_config else None,
                        help=f"YAML config (default: {default_config})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config entries")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)
