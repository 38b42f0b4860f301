"""``--set`` overrides: ``METHOD.KEY=VALUE`` for a method's config, ``data.KEY=VALUE`` for the dataset config.

Every item is checked against the config it targets (unknown method, unknown key, wrong type) before any
work starts; the error lists the valid names.
"""

from __future__ import annotations

from typing import Any

import yaml

from mudenet_core.workbook.errors import PlanError

# DataConfig fields that run_all sets itself (per run), so ``--set data.<key>`` may not
DATA_KEYS_FROM_OPTIONS = {"dataset": "--dataset", "root": "--data-root", "category": "--categories",
                          "image_size": "IMAGE_SIZE in params/<profile>.yaml"}


def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    """Parse ``--set`` items: ``METHOD.KEY=VALUE`` (``data.KEY=VALUE``) -> ``{METHOD: ["KEY=VALUE", ...]}``.

    Example:
        >>> parse_overrides(["mudenet.train.steps=500", "mudenet.width=32", "data.val_fraction=0.2"])
        {'mudenet': ['train.steps=500', 'width=32'], 'data': ['val_fraction=0.2']}
    """
    out: dict[str, list[str]] = {}
    for item in items:
        method, _, rest = item.partition(".")
        if not rest or "=" not in rest or not rest.split("=", 1)[0].strip():
            raise PlanError(
                f"--set {item!r}: expected METHOD.KEY=VALUE or data.KEY=VALUE, e.g. mudenet.train.steps=500"
            )
        out.setdefault(method, []).append(rest)
    return out


def _valid_keys(cfg_cls) -> str:
    """Dotted keys of a config class, nested configs expanded (``train.steps``)."""
    import typing

    from mudenet_core.config import ConfigBase

    keys = []
    for name, tp in typing.get_type_hints(cfg_cls).items():
        if name not in cfg_cls.field_names():
            continue
        members = typing.get_args(tp) or (tp,)
        nested = [a for a in members if isinstance(a, type) and issubclass(a, ConfigBase)]
        keys += [f"{name}.{k}" for k in nested[0].field_names()] if nested else [name]
    return ", ".join(keys)


def validate_method_overrides(overrides: dict[str, list[str]], profile: str, methods: list[str]) -> None:
    """Every ``--set METHOD.KEY=VALUE`` names a method of this run and a key of its config (right type too).

    Raises:
        PlanError: naming the item and listing the valid methods or keys.
    """
    from mudenet_core import methods as registry
    from mudenet_core.config import ConfigError

    for method, items in overrides.items():
        if method not in registry.METHODS:
            raise PlanError(f"--set {method}.{items[0]}: unknown method {method!r}; "
                            f"valid: {', '.join(registry.METHODS)}, data (the dataset config)")
        if method not in methods:
            raise PlanError(f"--set {method}.{items[0]}: {method!r} is not among the methods of this run "
                            f"({', '.join(methods)}); the override would be ignored")
        for item in [*items, items]:  # each alone (to name it), then all together
            try:
                registry.load_config(method, profile, overrides=[item] if isinstance(item, str) else item)
            except ConfigError as e:
                _, cfg_cls = registry.get_method(method)
                what = item if isinstance(item, str) else " ".join(item)
                raise PlanError(
                    f"--set {method}.{what}: {e}\n  valid keys of {method}: {_valid_keys(cfg_cls)}") from None


def data_overrides(items: list[str], dataset: str, category: str, image_size: int) -> dict[str, Any]:
    """``--set data.KEY=VALUE`` items as the ``DATA_OVERRIDES`` dict, checked against ``DataConfig``.

    Values are parsed as YAML (``0.2`` -> 0.2, ``false`` -> False) and applied, as a notebook would, with
    ``DataConfig(...).with_overrides(DATA_OVERRIDES)``.

    Raises:
        PlanError: an unknown key, a value of the wrong type, or a key that a run_all option sets.
    """
    from mudenet_core.config import ConfigError
    from mudenet_core.data import DataConfig

    out: dict[str, Any] = {}
    for item in items:
        key, value = (s.strip() for s in item.split("=", 1))
        if key.split(".")[0] in DATA_KEYS_FROM_OPTIONS:
            raise PlanError(f"--set data.{item}: data.{key.split('.')[0]} is set by run_all for every run; "
                            f"use {DATA_KEYS_FROM_OPTIONS[key.split('.')[0]]}")
        out[key] = yaml.safe_load(value) if value else value
    try:
        DataConfig(dataset=dataset, category=category, image_size=image_size).with_overrides(out)
    except ConfigError as e:
        raise PlanError(f"--set data.*: {e}\n  valid keys of data: {_valid_keys(DataConfig)}") from None
    return out
