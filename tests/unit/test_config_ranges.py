"""Every numeric value of every method config is range-checked at construction; ``--n-overlays`` too.

The bounds are declared on the fields (:func:`mudenet_core.config.positive`, ``nonnegative``, ``bounded``), so
the tests below are generated from them: each declared bound is violated once, directly and through
``from_dict``, and must raise a :class:`ConfigError` naming the class, the field and the value; and every
numeric field must declare one, so a new field cannot slip in unchecked.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from mudenet_core import cli, methods
from mudenet_core.baselines.ae import AEConfig
from mudenet_core.baselines.padim import PaDiMConfig
from mudenet_core.baselines.patchcore import PatchCoreConfig
from mudenet_core.baselines.uninformed_students import USConfig
from mudenet_core.config import RANGE, ConfigError, Range
from mudenet_core.data.synthesis import SynthesisConfig, ValidationConfig
from mudenet_core.harness import ThresholdConfig
from mudenet_core.mudenet import DistillConfig, MuDeNetConfig, TrainConfig

CONFIGS = [MuDeNetConfig, DistillConfig, TrainConfig, PaDiMConfig, PatchCoreConfig, AEConfig, USConfig,
           ThresholdConfig, SynthesisConfig, ValidationConfig]


def _numeric(tp) -> type | None:
    """int or float if ``tp`` is one, an optional one, or a tuple of them; else None."""
    if tp in (int, float):
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _numeric(inner[0]) if len(inner) == 1 else None
    if origin is tuple and args and args[0] in (int, float):
        return args[0]
    return None


def _numeric_fields(cls):
    """(field, kind) of every numeric field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f, _numeric(hints[f.name])) for f in dataclasses.fields(cls) if _numeric(hints[f.name])]


def _bad_values(rng: Range, kind: type) -> list:
    """Values just outside each declared bound (and one far outside), of the field's kind."""
    eps = 1 if kind is int else 0.5
    out = []
    if rng.gt is not None:
        out += [rng.gt, rng.gt - eps]
    if rng.ge is not None:
        out += [rng.ge - eps]
    if rng.lt is not None:
        out += [rng.lt]
    if rng.le is not None:
        out += [rng.le + eps]
    return [kind(v) for v in out if v not in rng.also]


CASES = [
    pytest.param(cls, f.name, bad, id=f"{cls.__name__}.{f.name}={bad}")
    for cls in CONFIGS
    for f, kind in _numeric_fields(cls)
    if RANGE in f.metadata  # a field without bounds fails test_every_numeric_field_declares_its_range
    for bad in _bad_values(f.metadata[RANGE], kind)
]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_numeric_field_declares_its_range(cls):
    missing = [f.name for f, _ in _numeric_fields(cls) if RANGE not in f.metadata]
    assert not missing, f"{cls.__name__}: numeric fields without declared bounds: {missing}"
    cls()  # the defaults are in range


@pytest.mark.parametrize(("cls", "name", "bad"), CASES)
def test_out_of_range_value_is_a_config_error_naming_class_field_and_value(cls, name, bad):
    default = getattr(cls(), name)
    value = (bad, *default[1:]) if isinstance(default, tuple) else bad  # tuples: one bad item
    for build in (lambda: cls(**{name: value}), lambda: cls.from_dict({name: value})):
        with pytest.raises(ConfigError) as e:
            build()
        msg = str(e.value)
        assert f"{cls.__name__}.{name}" in msg and repr(value) in msg, msg


def test_the_issue_examples_and_positive_only_values():
    with pytest.raises(ConfigError, match=r"^MuDeNetConfig\.width must be > 0, got -4$"):
        MuDeNetConfig(width=-4)
    with pytest.raises(ConfigError, match=r"MuDeNetConfig\.width must be > 0, got -4"):
        methods.load_config("mudenet", "cpu", overrides=["width=-4"])
    with pytest.raises(ConfigError, match=r"TrainConfig\.batch_size must be > 0, got 0"):
        methods.load_config("mudenet", "cpu", overrides=["train.batch_size=0"])
    positive_only = {
        MuDeNetConfig: ["image_size", "width", "out_channels", "latent_dim", "ae_width", "eval_batch_size"],
        DistillConfig: ["epochs", "lr", "batch_size"], TrainConfig: ["epochs", "lr", "batch_size"],
        PaDiMConfig: ["image_size", "batch_size"],
        PatchCoreConfig: ["image_size", "batch_size", "chunk_size", "patch_size", "target_embed_dim"],
        AEConfig: ["image_size", "channels", "latent_dim", "epochs", "batch_size", "lr", "checkpoint_every"],
        USConfig: ["image_size", "width", "descriptor_dim", "n_students", "teacher_steps", "teacher_lr",
                   "teacher_batch_size", "student_epochs", "student_lr", "student_batch_size"],
        SynthesisConfig: ["feature_stride", "max_tries"], ValidationConfig: ["min_anomalous"],
    }
    for cls, names in positive_only.items():
        for name in names:
            default = getattr(cls(), name)
            for v in (0, -1):
                value = (v, *default[1:]) if isinstance(default, tuple) else v
                with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{name}"):
                    cls(**{name: value})


def test_bounds_that_allow_zero_or_an_extra_value():
    assert MuDeNetConfig(checkpoint_every=0).checkpoint_every == 0  # 0 = no resume checkpoints
    assert TrainConfig(steps=0, hard_q=0.0).steps == 0  # 0 steps = use epochs; hard_q 0 = plain MSE
    assert PatchCoreConfig(reweight_neighbors=0).reweight_neighbors == 0  # 0 = off ...
    with pytest.raises(ConfigError, match=r"reweight_neighbors must be >= 2 \(or 0\), got 1"):
        PatchCoreConfig(reweight_neighbors=1)  # ... but b = 1 always weighs 0
    assert TrainConfig(hard_q=None).hard_q is None  # an optional value left unset
    with pytest.raises(ConfigError, match=r"ThresholdConfig\.quantile must be in \(0, 1\], got 0"):
        ThresholdConfig(quantile=0)
    with pytest.raises(ConfigError, match="nan"):
        PaDiMConfig(blur_sigma=float("nan"))


def test_types_choices_and_cross_field_rules_at_construction():
    with pytest.raises(ConfigError, match=r"MuDeNetConfig\.width must be a number"):
        MuDeNetConfig(width="64")
    with pytest.raises(ConfigError, match=r"DistillConfig\.source must be one of"):
        DistillConfig(source="trian")
    with pytest.raises(ConfigError, match="level_kernels must be odd"):
        MuDeNetConfig(level_kernels=(3, 4, 5))
    with pytest.raises(ConfigError, match=r"scoring\.levels must be in \[1, 3\]"):
        methods.load_config("mudenet", "cpu", overrides=["scoring.levels=[1, 4]"])
    with pytest.raises(ConfigError, match=r"blur_sigma must be >= 0, got -1"):
        methods.load_config("mudenet", "cpu", overrides=["scoring.blur_sigma=-1"])
    with pytest.raises(ConfigError, match="multiple of 16"):
        AEConfig(image_size=72)
    with pytest.raises(ConfigError, match=r"USConfig\.patch_sizes must be one or more of \[17, 33, 65\]"):
        USConfig(patch_sizes=(17, 31))
    with pytest.raises(ConfigError, match="min_scale_exp <= max_scale_exp"):
        SynthesisConfig(min_scale_exp=4, max_scale_exp=2)


def test_every_committed_profile_loads():
    loaded = 0
    for method in methods.METHODS:
        _, cfg_cls = methods.get_method(method)
        for path in sorted((methods.CONFIG_DIR / method).glob("*.yaml")):
            assert isinstance(cfg_cls.from_yaml(path), cfg_cls), path
            loaded += 1
        for profile in methods.PROFILES:
            assert methods.profile_path(method, profile).is_file(), (method, profile)
    assert loaded >= len(methods.METHODS) * len(methods.PROFILES)


def test_evaluate_rejects_a_negative_n_overlays(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--n-overlays", "-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--n-overlays" in err and "'-3'" in err, err
    args = cli.build_parser().parse_args(["evaluate", "--checkpoint", "m.pt", "--n-overlays", "0"])
    assert args.n_overlays == 0  # none
