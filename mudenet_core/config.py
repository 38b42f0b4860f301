"""Typed, frozen configuration dataclasses and the helpers every config shares.

Every config in the package subclasses :class:`ConfigBase`. Loading from a dict (YAML, CLI overrides,
a checkpoint) rejects unknown keys with a message that lists the valid ones, so a misspelled option
fails loudly instead of being silently ignored.

Numeric fields declare their bounds where they are defined, with :func:`positive`, :func:`nonnegative` or
:func:`bounded`; :class:`ConfigBase` checks them (and ``Literal`` choices) whenever a config is constructed,
so ``width=-4`` fails at once, naming the class, the field and the value. A subclass with checks of its own
(across fields) calls ``super().__post_init__()`` first.

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
    >>> @dataclass(frozen=True)
    ... class Bounded(ConfigBase):
    ...     width: int = positive(64)  # channels
    ...     dropout: float = bounded(0.1, ge=0, lt=1)  # probability
    >>> Bounded(width=-4)
    Traceback (most recent call last):
    ...
    mudenet_core.config.ConfigError: Bounded.width must be > 0, got -4
    >>> Bounded.from_dict({"dropout": 1})
    Traceback (most recent call last):
    ...
    mudenet_core.config.ConfigError: Bounded.dropout must be in [0, 1), got 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import numbers
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, or an invalid value."""


RANGE = "range"  # the field-metadata key of a numeric field's bounds


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric config value (None: unbounded on that side), plus single values also allowed.

    A tuple-valued field (``tuple[int, ...]``) applies the bounds to each item; ``None`` (an optional value
    left unset) is always allowed.

    Example:
        >>> str(Range(gt=0, le=1)), str(Range(ge=2, also=(0,)))
        ('in (0, 1]', '>= 2 (or 0)')
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    also: tuple[float, ...] = ()  # values allowed outside the bounds (e.g. 0 = off)

    def contains(self, v: float) -> bool:
        """Whether ``v`` is within the bounds (or one of ``also``); NaN never is."""
        if v in self.also:
            return True
        if math.isnan(v):
            return False
        return not ((self.gt is not None and v <= self.gt) or (self.ge is not None and v < self.ge)
                    or (self.lt is not None and v >= self.lt) or (self.le is not None and v > self.le))

    def __str__(self) -> str:
        lo = (f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else None)
        hi = (f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else None)
        if lo and hi:
            text = f"in {lo}, {hi}"
        elif lo:
            text = f"{'>' if lo[0] == '(' else '>='} {lo[1:]}"
        elif hi:
            text = f"{'<' if hi[-1] == ')' else '<='} {hi[:-1]}"
        else:
            text = "a number"
        return text + (f" (or {', '.join(f'{a:g}' for a in self.also)})" if self.also else "")


def bounded(default: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, also: tuple[float, ...] = ()) -> Any:
    """A dataclass field with a default and bounds that :class:`ConfigBase` checks at construction."""
    return dataclasses.field(default=default, metadata={RANGE: Range(gt, ge, lt, le, tuple(also))})


def positive(default: Any) -> Any:
    """A field that must be > 0 (widths, steps, batch sizes, image sizes, learning rates, counts)."""
    return bounded(default, gt=0)


def nonnegative(default: Any) -> Any:
    """A field that must be >= 0 (weight decays, blur sigmas, seeds, counts where 0 means off or all)."""
    return bounded(default, ge=0)


def nonnegative_int(text: str) -> int:
    """An ``argparse`` type: a whole number >= 0 (argparse reports anything else as a usage error).

    Example:
        >>> nonnegative_int("3")
        3
        >>> nonnegative_int("-3")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a whole number >= 0, got '-3'
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, cached (it is called at every construction)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _literal_choices(tp: Any) -> tuple | None:
    """The choices of a ``Literal[...]`` (or an optional one), else None."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if typing.get_origin(a) is typing.Literal:
                return typing.get_args(a)
    return None


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


def _nested_config(cls: type, name: str) -> type | None:
    """The ConfigBase type of field ``name`` of ``cls`` (also when optional), or None."""
    if name not in cls.field_names():
        return None
    tp = _hints(cls)[name]
    for a in typing.get_args(tp) or (tp,):
        if isinstance(a, type) and issubclass(a, ConfigBase):
            return a
    return None


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base for frozen configs: strict ``from_dict``, ``to_dict``, overrides, a stable hash, value checks."""

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """Check every bounded field (:func:`bounded`) and every ``Literal`` field of this config.

        Raises:
            ConfigError: ``<Class>.<field> must be <bounds>, got <value>``.
        """
        name = type(self).__name__
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = _literal_choices(hints.get(f.name))
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"{name}.{f.name} must be one of {list(choices)}, got {value!r}")
            rng = f.metadata.get(RANGE)
            if rng is None or value is None:
                continue
            for v in value if isinstance(value, tuple | list) else (value,):
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise ConfigError(f"{name}.{f.name} must be a number {rng}, got {value!r}")
                if not rng.contains(v):
                    what = " items" if isinstance(value, tuple | list) else ""
                    raise ConfigError(f"{name}.{f.name}{what} must be {rng}, got {value!r}")

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
        hints = _hints(cls)
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
            cur, cls = d, type(self)
            parts = k.split(".")
            for p in parts[:-1]:
                sub = _nested_config(cls, p)
                if sub is None:
                    raise ConfigError(f"{type(self).__name__}: unknown key {k!r} ({cls.__name__} has no "
                                      f"nested config {p!r}; its keys: {', '.join(cls.field_names())})")
                if cur[p] is None:  # an optional nested config left unset: start from its defaults
                    cur[p] = dataclasses.asdict(sub())
                cur, cls = cur[p], sub
            cur[parts[-1]] = v
        return type(self).from_dict(d)

    def config_hash(self) -> str:
        """Short, stable hash of the config's content (for result tables and cache keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]
