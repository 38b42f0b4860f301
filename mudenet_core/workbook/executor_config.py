"""Which executor runs the (dataset, category, seed) runs, and what one run asks of a Ray cluster.

``run_all.py --executor local`` (the default) runs them in this process or, with ``--jobs N``, in a local
process pool; ``--executor ray`` makes each run one Ray task
(:mod:`~mudenet_core.workbook.ray_executor`). The resources of that task come from the ``executor:``
section of ``params/<profile>.yaml`` (:class:`ExecutorConfig`), so a cluster with N GPUs runs N paper runs
at once. Ray is an optional extra: it is imported only when asked for (:func:`require_ray`), and its
absence is a one-line error (exit status 2) before anything runs.

Example:
    >>> ExecutorConfig.from_dict({"num_gpus": 1}).num_gpus
    1.0
    >>> ExecutorConfig.from_dict({"num_gpu": 1})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mudenet_core.config.ConfigError: ExecutorConfig: unknown key(s) ['num_gpu']; valid keys: max_retries, ...
    >>> ExecutorConfig(num_cpus=0)
    Traceback (most recent call last):
    ...
    mudenet_core.config.ConfigError: ExecutorConfig.num_cpus must be > 0, got 0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mudenet_core.config import ConfigBase, ConfigError, nonnegative, positive
from mudenet_core.workbook.errors import PlanError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorConfig(ConfigBase):
    """The ``executor:`` section of a profile: the Ray resources of one (dataset, category, seed) run."""

    num_cpus: int = positive(1)  # CPUs a run holds; its notebook kernels use as many threads
    num_gpus: float = nonnegative(0.0)  # GPUs a run holds (Ray sets CUDA_VISIBLE_DEVICES; 0.5: two share one)
    max_retries: int = nonnegative(2)  # times Ray reruns a run whose worker died (kill -9, OOM, lost node)


def executor_config(section: dict | None, path: Path) -> ExecutorConfig:
    """The profile's ``executor:`` section as an :class:`ExecutorConfig` (defaults when absent).

    Raises:
        PlanError: an unknown key or a bad value, naming the file.
    """
    if section is not None and not isinstance(section, dict):
        raise PlanError(f"{path}: executor must be a mapping (num_cpus, num_gpus, max_retries), "
                        f"got {section!r}")
    try:
        return ExecutorConfig.from_dict(section or {})
    except ConfigError as e:
        raise PlanError(f"{path}: executor: {e}") from None


def require_ray() -> ModuleType:
    """``import ray``, or a :class:`PlanError` that says how to install it.

    Raises:
        PlanError: Ray is not importable.
    """
    try:
        import ray
    except ImportError as e:
        raise PlanError(f"--executor ray needs Ray, which is not importable ({e}); install the optional "
                        "extra: pip install -e '.[ray]' (or use --executor local)") from None
    return ray
