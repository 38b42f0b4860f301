"""``--set`` overrides: ``METHOD.KEY=VALUE`` for a method's config, ``data.KEY=VALUE`` for the dataset config.

Every item is checked against the config it targets (unknown method, unknown key, wrong type, a value out of
its range) before any work starts; the error lists the valid names. A ``data.KEY`` that the run's dataset
would ignore (``folder_*`` for anything but ``--dataset folder``, ``val_fraction`` for MVTec LOCO, whose
validation split is its own ``validation/good``) is an error too.
"""

from __future__ import annotations

from typing import Any

import yaml

from mudenet_core.workbook.errors import PlanError

# DataConfig fields that run_all sets itself (per run), so ``--set data.<key>`` may not
DATA_KEYS_FROM_OPTIONS = {"dataset": "--dataset", "root": "--data-root", "category": "--categories",
                          "image_size": "IMAGE_SIZE in params/<profile>.yaml"}


def ignored_data_key(key: str, dataset: str) -> str | None:
    """Why ``DataConfig.<key>`` has no effect on ``dataset`` (None: it has one).

    Example:
        >>> ignored_data_key("folder_anomaly_dir", "mvtec_ad")
        "folder_* keys apply to --dataset folder only (this run's dataset: 'mvtec_ad')"
        >>> ignored_data_key("folder_anomaly_dir", "folder") is None
        True
    """
    top = key.split(".")[0]
    if top.startswith("folder_") and dataset != "folder":
        return f"folder_* keys apply to --dataset folder only (this run's dataset: {dataset!r})"
    if top == "val_fraction" and dataset == "mvtec_loco":
        return "mvtec_loco validates on its own validation/good split; val_fraction has no effect there"
    return None


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
                unknown = "unknown key" in str(e)
                keys = f"\n  valid keys of {method}: {_valid_keys(cfg_cls)}" if unknown else ""
                raise PlanError(f"--set {method}.{what}: {e}{keys}") from None


def data_overrides(items: list[str], dataset: str, category: str, image_size: int) -> dict[str, Any]:
    """``--set data.KEY=VALUE`` items as the ``DATA_OVERRIDES`` dict, checked against ``DataConfig``.

    Values are parsed as YAML (``0.2`` -> 0.2, ``false`` -> False) and applied, as a notebook would, with
    ``DataConfig(...).with_overrides(DATA_OVERRIDES)``.

    Raises:
        PlanError: an unknown key, a value of the wrong type or out of range, a key that a run_all option
            sets, or one the run's dataset ignores (:func:`ignored_data_key`).
    """
    from mudenet_core.config import ConfigError
    from mudenet_core.data import DataConfig

    out: dict[str, Any] = {}
    for item in items:
        key, value = (s.strip() for s in item.split("=", 1))
        if key.split(".")[0] in DATA_KEYS_FROM_OPTIONS:
            raise PlanError(f"--set data.{item}: data.{key.split('.')[0]} is set by run_all for every run; "
                            f"use {DATA_KEYS_FROM_OPTIONS[key.split('.')[0]]}")
        # a known key only: a misspelled one gets the "unknown key" message below
        why = ignored_data_key(key, dataset) if key.split(".")[0] in DataConfig.field_names() else None
        if why:
            raise PlanError(f"--set data.{item} would be ignored: {why}")
        out[key] = yaml.safe_load(value) if value else value
    try:
        DataConfig(dataset=dataset, category=category, image_size=image_size).with_overrides(out)
    except ConfigError as e:
        keys = f"\n  valid keys of data: {_valid_keys(DataConfig)}" if "unknown key" in str(e) else ""
        raise PlanError(f"--set data.*: {e}{keys}") from None
    return out
