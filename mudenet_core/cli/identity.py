"""A run's identity: what must be the same for ``--resume`` to continue a run instead of mixing two.

``distill`` and ``train`` record the identity in ``config.yaml`` when they start (``status: running``) and
mark it ``finished`` at the end. ``--resume`` compares the recorded identity with the one the command line
asks for, before anything is written, and refuses with the differing fields named.

The identity holds: the command, the method and its full config, the data config, a fingerprint of the
dataset index (every image and mask file: path, size, mtime), the seed, and a hash of the package code
(:func:`mudenet_core.io.code_hash`).

Example:
    >>> a = {"seed": 0, "method_config": {"width": 16, "train": {"steps": 800}}}
    >>> identity_diff(a, {"seed": 1, "method_config": {"width": 16, "train": {"steps": 400}}})
    ['method_config.train.steps: recorded 800, now 400', 'seed: recorded 0, now 1']
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

IDENTITY_KEYS = ("command", "method", "method_config", "data_config", "data_index", "seed", "code_hash")
RUNNING, FINISHED = "running", "finished"


def _file_stamp(path: Path) -> str:
    """``path size mtime_ns`` of a file, every file of a folder (LOCO masks), or ``path <missing>``."""
    if path.is_dir():
        return "\n".join(_file_stamp(p) for p in sorted(path.iterdir()) if p.is_file())
    try:
        st = path.stat()
    except OSError:
        return f"{path}\0<missing>"
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"


def index_fingerprint(index: pd.DataFrame) -> str:
    """Short SHA-256 over every image and mask file of a dataset index (path, size, mtime; none is read).

    It changes when a file is added, removed, renamed or rewritten in place, and with the data root.
    """
    h = hashlib.sha256()
    for col in ("image_path", "mask_path"):
        for p in sorted(str(v) for v in index[col].tolist() if v):
            h.update(_file_stamp(Path(p)).encode() + b"\n")
    return h.hexdigest()[:16]


def run_identity(*, command: str, method: str, cfg: Any, data_cfg: Any, index: pd.DataFrame,
                 seed: int) -> dict[str, Any]:
    """The identity of a ``distill``/``train`` run (a plain dict, as recorded in ``config.yaml``)."""
    from mudenet_core.io import code_hash

    return {"command": command, "method": method, "method_config": cfg.to_dict(),
            "data_config": data_cfg.to_dict(), "data_index": index_fingerprint(index), "seed": int(seed),
            "code_hash": code_hash()}


_EXPLAIN = {"data_index": "the dataset's files changed on disk (added, removed or rewritten)",
            "code_hash": "the package code or a config file changed since the run started"}


def identity_diff(recorded: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two identities (nested configs compared key by key), sorted."""
    out: list[str] = []
    for k in sorted(set(recorded) | set(now)):
        a, b = recorded.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(identity_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            out.append(f"{prefix}{k}: {_EXPLAIN[k]}" if k in _EXPLAIN and not prefix
                       else f"{prefix}{k}: recorded {a!r}, now {b!r}")
    return out
