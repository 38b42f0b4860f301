"""The method registry: every detector of the harness by name, with its config class and profiles.

A detector is any object with this interface (MuDeNet and every baseline implement it)::

    detector = Detector(config)                       # config: the method's frozen dataclass
    log = detector.fit(train_ds, val_ds, generator=g, device=dev, progress=True)   # -> dict
    maps, scores = detector.predict(images)           # (B, 3, H, W) -> (B, 1, H, W), (B,)
    detector.save(path); Detector.load(path, device=dev)

``fit`` trains on ``train/good`` and calibrates (normalisation statistics, thresholds) on the validation
split; ``predict`` is pure inference under ``torch.no_grad``. Profiles (``paper``, ``cpu``, ``smoke``) are
YAML files in ``configs/<method>/<profile>.yaml`` next to the package.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from mudenet_core.config import ConfigError
from mudenet_core.io import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"
PROFILES = ("paper", "cpu", "smoke")

# name -> (module, detector class, config class)
METHODS: dict[str, tuple[str, str, str]] = {
    "mudenet": ("mudenet_core.mudenet", "MuDeNet", "MuDeNetConfig"),
    "padim": ("mudenet_core.baselines.padim", "PaDiM", "PaDiMConfig"),
    "patchcore": ("mudenet_core.baselines.patchcore", "PatchCore", "PatchCoreConfig"),
    "ae": ("mudenet_core.baselines.ae", "ConvAutoencoderDetector", "AEConfig"),
    "us": ("mudenet_core.baselines.uninformed_students", "UninformedStudents", "USConfig"),
    "glass": ("mudenet_core.baselines.glass", "GLASS", "GLASSConfig"),
    "pagmfr": ("mudenet_core.baselines.pagmfr", "PAGMFR", "PAGMFRConfig"),
    "rgpkd": ("mudenet_core.baselines.rgpkd", "RGPKD", "RGPKDConfig"),
}


# Methods whose dependencies are an optional pip extra: name -> extra (``pip install -e ".[<extra>]"``). Only
# these may be missing from an installation; any other method whose module fails to import is a bug.
OPTIONAL_EXTRAS: dict[str, str] = {}


def _import_error(name: str, mod: str, e: BaseException) -> str:
    return f"method {name!r}: its module {mod} failed to import ({type(e).__name__}: {e})"


def unavailable_methods() -> dict[str, str]:
    """The optional methods (:data:`OPTIONAL_EXTRAS`) that cannot be imported here, each with the reason.

    Raises:
        ConfigError: a method that is not an optional extra fails to import (naming module and error).
    """
    missing: dict[str, str] = {}
    for name, (mod, _, _) in METHODS.items():
        try:
            importlib.import_module(mod)
        except ImportError as e:
            if name not in OPTIONAL_EXTRAS:
                raise ConfigError(_import_error(name, mod, e)) from e
            missing[name] = (f"{_import_error(name, mod, e)}; it needs the optional extra "
                             f"{OPTIONAL_EXTRAS[name]!r}: pip install -e \".[{OPTIONAL_EXTRAS[name]}]\"")
        except Exception as e:  # a broken module (SyntaxError, NameError at import...) is never optional
            raise ConfigError(_import_error(name, mod, e)) from e
    return missing


def available_methods() -> list[str]:
    """Names of the registered methods that import here, in registry order.

    Only the methods of :data:`OPTIONAL_EXTRAS` may be missing (see :func:`unavailable_methods` for why);
    a package module that fails to import raises instead of silently shrinking the list.

    Raises:
        ConfigError: naming the module that failed and its import error.
    """
    missing = unavailable_methods()
    return [name for name in METHODS if name not in missing]


def training_split(det_cls: type, splits):
    """The training dataset a detector fits on: un-augmented for training-free methods (``TRAINING_FREE``).

    PaDiM and PatchCore fit on the images as they are, as their papers do; trained methods get
    ``splits.train`` with whatever augmentation the data config enables.
    """
    return splits.train_unaugmented if getattr(det_cls, "TRAINING_FREE", False) else splits.train


def get_method(name: str) -> tuple[type, type]:
    """Return ``(DetectorClass, ConfigClass)`` for a registered method name."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    mod, det, cfg = METHODS[name]
    try:
        m = importlib.import_module(mod)
    except ImportError as e:
        hint = (f"; install the optional extra: pip install -e \".[{OPTIONAL_EXTRAS[name]}]\""
                if name in OPTIONAL_EXTRAS else "")
        raise ConfigError(f"{_import_error(name, mod, e)}{hint}") from e
    return getattr(m, det), getattr(m, cfg)


def profile_path(method: str, profile: str) -> Path:
    """Path of a method's profile YAML: ``configs/<method>/<profile>.yaml``."""
    return CONFIG_DIR / method / f"{profile}.yaml"


def load_config(method: str, profile: str = "cpu", config_path: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None):
    """Build a method's config from a profile (or an explicit YAML file) plus ``key=value`` overrides."""
    _, cfg_cls = get_method(method)
    if config_path is not None:
        cfg = cfg_cls.from_yaml(config_path)
    else:
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
        path = profile_path(method, profile)
        cfg = cfg_cls.from_yaml(path) if path.is_file() else cfg_cls()
    return cfg.with_overrides(overrides) if overrides else cfg
