"""Atomic, self-describing writes: results, tables and checkpoints.

Every write goes to a temporary file in the same folder and is renamed into place, so an interrupted
run never leaves a half-written CSV, JSON or checkpoint behind, and what was there before survives.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io as _io
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or made with an incompatible config."""


TEMP_SUFFIX = ".tmp"  # temporary files are named .<name>.<pid>.<random>.tmp next to their target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the permissions of a plain ``open()`` (0666 less the umask), not ``mkstemp``'s 0600. The
    temporary name carries the writer's process id, so :func:`clean_stale_temps` can remove what a killed
    process left behind without touching the files of one still running.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes left under ``folder`` (recursively).

    Only files named as :func:`atomic_path` names them whose writing process is gone are removed.

    Returns:
        the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.rglob(f".*{TEMP_SUFFIX}"):
        parts = p.name[1:-len(TEMP_SUFFIX)].rsplit(".", 2)  # <name>, <pid>, <random>
        if len(parts) != 3 or not parts[1].isdigit() or not p.is_file() or _pid_alive(int(parts[1])):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (numpy/torch scalars and configs are converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n")


def save_npy(path: str | Path, arr: np.ndarray) -> Path:
    """Write one array as ``.npy``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_json(path: str | Path) -> Any:
    """Read JSON; the error names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_csv(path: str | Path, df: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV (no index), atomically."""
    return atomic_write_text(path, df.to_csv(index=False))


def git_sha(short: bool = True) -> str:
    """The repository's HEAD commit (with ``-dirty`` if the tree has changes), or ``"unknown"``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short" if short else "--verify", "HEAD"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def code_hash(root: str | Path = REPO_ROOT) -> str:
    """Short SHA-256 over the code that produces results: ``mudenet_core/**/*.py`` and ``configs/**/*.yaml``.

    Paths (relative to ``root``) and contents both count, so editing, adding, renaming or deleting a package
    module or any config (method profiles, ``configs/augment/*.yaml``) changes the hash; other files
    (``__pycache__``, notebooks, results) do not. Cached per process and per ``root``
    (``code_hash.cache_clear()`` after editing files in a test).
    """
    root = Path(root)
    h = hashlib.sha256()
    files = [*root.glob("mudenet_core/**/*.py"), *root.glob("configs/**/*.yaml")]
    for p in sorted(f for f in files if f.is_file() and "__pycache__" not in f.parts):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def prepare_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create an output folder; refuse to reuse a non-empty one unless ``overwrite=True``.

    Temporary files of interrupted writes are removed first (:func:`clean_stale_temps`).
    """
    path = Path(path)
    clean_stale_temps(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {path} exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_checkpoint(path: str | Path, *, state_dict: dict[str, Any], config: Any, **extra: Any) -> Path:
    """Save a self-describing checkpoint ``{"state_dict", "config", "git_sha", **extra}`` atomically.

    ``config`` is a :class:`~mudenet_core.config.ConfigBase` (stored as a plain dict) or a dict.
    Never pickles modules: ``state_dict`` holds tensors, ``extra`` plain data (step, optimiser state...).
    """
    payload = {
        "state_dict": state_dict,
        "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        "git_sha": git_sha(),
        "format_version": 1,
        **extra,
    }
    buf = _io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, expected_config: Any | None = None, *,
                    keys: list[str] | None = None) -> dict:
    """Load a checkpoint saved by :func:`save_checkpoint`.

    Args:
        path: checkpoint file.
        expected_config: if given, the stored config must agree with it on ``keys`` (all keys when ``keys`` is
            None); otherwise :class:`CheckpointError` names the differing keys.
        keys: the config keys that decide compatibility (architecture), e.g. ``["channels", "image_size"]``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or truncated file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a mudenet_core checkpoint (missing 'state_dict'/'config')")
    if expected_config is not None:
        want = expected_config.to_dict() if hasattr(expected_config, "to_dict") else dict(expected_config)
        have = ckpt["config"]
        check = keys if keys is not None else sorted(set(want) | set(have))
        diff = [k for k in check if want.get(k) != have.get(k)]
        if diff:
            details = ", ".join(f"{k}: checkpoint={have.get(k)!r} vs config={want.get(k)!r}" for k in diff)
            raise CheckpointError(f"{path}: made with an incompatible config ({details})")
    return ckpt


def load_weights(module: torch.nn.Module, state_dict: dict[str, Any], source: str | Path) -> None:
    """``module.load_state_dict(state_dict)`` with a one-line :class:`CheckpointError` when they do not fit.

    The error names ``source`` and the first mismatches (missing or unexpected keys, tensors of another
    shape), which is what a checkpoint from another code version, or edited by hand, looks like.
    """
    want = module.state_dict()
    missing = [k for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in state_dict and tuple(getattr(state_dict[k], "shape", v.shape)) != tuple(v.shape)]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatch (checkpoint vs model)", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{what}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"{source}: its weights do not fit the model its config describes ("
                              + "; ".join(problems) + "); it was made by another code version or altered: "
                              "retrain, or load it with the version that wrote it")
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{source}: its weights cannot be loaded ({msg})") from None
