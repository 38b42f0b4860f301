"""When a notebook's outputs are complete (``--resume``), and when it may reuse its checkpoints (``REUSE``).

A manifest entry records the *inputs* of one execution:

- ``source_sha``: the notebook's percent script;
- ``code_hash``: the package code and every config (:func:`mudenet_core.io.code_hash`:
  ``mudenet_core/**/*.py``, ``configs/**/*.yaml`` including the augmentation tables ``configs/augment/``);
- ``data_fingerprint``: the dataset on disk (:func:`data_fingerprint`: file list, sizes and mtimes of the
  category folder, and of ``--texture-dir``), so deleting or replacing a training image invalidates it;
- ``parameters``: everything injected, which includes the data config (``DATASET``, ``DATA_ROOT``,
  ``CATEGORY``, ``IMAGE_SIZE``, ``DATA_OVERRIDES``) and the method overrides.

``--resume`` skips a notebook whose entry says "ok" with the same inputs and whose files all exist
(:func:`entry_complete`). A notebook that does run gets ``REUSE=True`` only when its previous execution (even
an interrupted one) had the same inputs (:func:`reuse_allowed`): checkpoints made by other code or from
other data are never loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mudenet_core.io import file_sha256
from mudenet_core.workbook.plan import Plan, RunKey, notebook_path

INPUT_KEYS = ("source_sha", "code_hash", "data_fingerprint")


def file_sha(path: Path) -> str:
    """Short SHA-256 of a file's bytes."""
    return file_sha256(path)[:16]


def folder_fingerprint(folder: Path, h=None) -> str:
    """Short SHA-256 over the sorted relative paths, sizes and mtimes (ns) of every file under ``folder``.

    Cheap (no file is read) and sensitive to a file added, deleted, renamed or rewritten in place. A missing
    folder has its own fingerprint.
    """
    h = h or hashlib.sha256()
    folder = Path(folder)
    h.update(str(folder).encode() + b"\0")
    if not folder.is_dir():
        h.update(b"<missing>")
        return h.hexdigest()[:16]
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def data_folders(plan: Plan, key: RunKey) -> list[Path]:
    """The folders a run reads its data from, and ``--texture-dir``.

    The category folder; VisA: plus ``split_csv``; a folder dataset: the whole root and any absolute
    ``folder_*_dir`` override.
    """
    root = plan.data_root
    if key.dataset == "folder":
        folders = [root] + [Path(v) for k, v in plan.common.get("DATA_OVERRIDES", {}).items()
                            if k.startswith("folder_") and k.endswith("_dir") and v and Path(v).is_absolute()]
    elif key.dataset == "visa":
        folders = [root / key.category, root / "split_csv"]
    else:
        folders = [root / key.category]
    if plan.texture_dir:
        folders.append(Path(plan.texture_dir))
    return folders


def data_fingerprint(plan: Plan, key: RunKey) -> str:
    """One fingerprint over :func:`data_folders` of a run."""
    h = hashlib.sha256()
    for folder in data_folders(plan, key):
        folder_fingerprint(folder, h)
    return h.hexdigest()[:16]


def notebook_inputs(name: str, data_fp: str = "") -> dict[str, str]:
    """The recorded inputs of an execution of ``name`` now (``data_fp``: :func:`data_fingerprint`)."""
    from mudenet_core.io import code_hash

    return {"source_sha": file_sha(notebook_path(name)), "code_hash": code_hash(),
            "data_fingerprint": data_fp}


def comparable(params: dict | None) -> dict:
    """Parameters without the ones that do not change results (``REUSE``)."""
    return {k: v for k, v in (params or {}).items() if k != "REUSE"}


INPUT_NAMES = {"source_sha": "the notebook changed", "code_hash": "the package code or a config changed",
               "data_fingerprint": "the dataset files changed"}


def changed_inputs(entry: dict | None, name: str, params: dict, inputs: dict[str, str]) -> list[str]:
    """What differs between ``entry``'s execution of ``name`` and one now (``[]``: the same inputs)."""
    if not entry or entry.get("notebook") != name:
        return ["no earlier execution"]
    out = [INPUT_NAMES.get(k, k) for k, v in inputs.items() if entry.get(k) != v]
    old, new = comparable(entry.get("parameters")), comparable(params)
    if old != new:
        out.append("parameters changed: " + ", ".join(sorted(k for k in old.keys() | new.keys()
                                                            if old.get(k) != new.get(k))))
    return out


def same_inputs(entry: dict | None, name: str, params: dict, inputs: dict[str, str]) -> bool:
    """Whether ``entry`` was an execution of ``name`` with these inputs and parameters (any status)."""
    return not changed_inputs(entry, name, params, inputs)


def why_incomplete(entry: dict | None, name: str, params: dict, out_dir: Path,
                   inputs: dict[str, Any] | None = None) -> str | None:
    """Why ``--resume`` must execute ``name`` again (None: its outputs are complete).

    Args:
        entry: the manifest entry of the last execution (or None).
        name: the notebook.
        params: the parameters it would get now.
        out_dir: the folder its ``files`` are relative to.
        inputs: :func:`notebook_inputs` now (default: with an empty data fingerprint).
    """
    inputs = notebook_inputs(name) if inputs is None else inputs
    changed = changed_inputs(entry, name, params, inputs)
    if changed:
        return "; ".join(changed)
    if entry.get("status") != "ok":
        return f"last execution {entry.get('status')}"
    missing = [f for f in entry.get("files", []) if not (out_dir / f).is_file()]
    if not Path(entry["executed"]).is_file():
        missing.insert(0, Path(entry["executed"]).name)
    return f"output(s) missing: {', '.join(missing[:3])}" if missing else None


def entry_complete(entry: dict | None, name: str, params: dict, out_dir: Path,
                   inputs: dict[str, Any] | None = None) -> bool:
    """True if ``entry`` says ``name`` ran OK with these inputs and parameters, and its files exist.

    Arguments as for :func:`why_incomplete`.
    """
    return why_incomplete(entry, name, params, out_dir, inputs) is None


def reuse_allowed(entry: dict | None, name: str, params: dict, inputs: dict[str, str]) -> bool:
    """Whether a notebook about to run may load the checkpoints its previous execution left.

    Only when that execution (finished, failed or interrupted: the entry is written before it starts) had the
    same inputs and parameters; otherwise the checkpoints come from other code or other data.
    """
    return same_inputs(entry, name, params, inputs)
