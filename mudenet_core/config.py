"""Typed, frozen configuration dataclasses and the helpers every config shares.

Every config in the package subclasses :class:`ConfigBase`. Loading from a dict (YAML, CLI overrides,
a checkpoint) rejects unknown keys with a message that lists the valid ones, so a misspelled option
fails loudly instead of being silently ignored.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo(ConfigBase):
    ...     lr: float = 1e-3  # learning rate
    ...     epochs: int = 10  # passes over the training set
    >>> Demo.from_dict({"lr": 0.01}).lr
    0.01
    >>> Demo.from_dict({"learning_rate": 0.01})
    Traceback (most recent call last):
    ...
    mudenet_core.config.ConfigError: Demo: unknown key(s) ['learning_rate']; valid keys: epochs, lr
    >>> Demo().with_overrides(["epochs=3"]).epochs
    3
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, or an invalid value."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` (from YAML or a ``key=value`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:  # try the next member of the union
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}: {errors}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base for frozen configs: strict ``from_dict``, ``to_dict``, overrides and a stable hash."""

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the config's fields, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any] | None) -> T:
        """Build a config from a mapping, rejecting unknown keys and coercing types."""
        d = dict(d or {})
        valid = set(cls.field_names())
        unknown = sorted(set(d) - valid)
        if unknown:
            valid_keys = ", ".join(sorted(valid))
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {valid_keys}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in d.items()}
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        """Load a config from a YAML file; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping at top level, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def replace(self: T, **changes: Any) -> T:
        """``dataclasses.replace`` with the same strict checking as ``from_dict``."""
        d = dataclasses.asdict(self)
        d.update(changes)
        return type(self).from_dict(d)

    def with_overrides(self: T, overrides: list[str] | dict[str, Any]) -> T:
        """Apply ``key=value`` strings (CLI) or a dict; nested configs use ``outer.inner=value``."""
        if isinstance(overrides, dict):
            items = list(overrides.items())
        else:
            items = []
            for o in overrides:
                if "=" not in o:
                    raise ConfigError(f"override {o!r} is not of the form key=value")
                k, v = o.split("=", 1)
                items.append((k.strip(), yaml.safe_load(v) if v.strip() else v))
        d = dataclasses.asdict(self)
        for k, v in items:
            cur = d
            parts = k.split(".")
            for p in parts[:-1]:
                if p not in cur or not isinstance(cur[p], dict):
                    raise ConfigError(f"{type(self).__name__}: unknown key {k!r}")
                cur = cur[p]
            cur[parts[-1]] = v
        return type(self).from_dict(d)

    def config_hash(self) -> str:
        """Short, stable hash of the config's content (for result tables and cache keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]
