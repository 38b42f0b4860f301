"""Git state for the results layout: which files are tracked, whether the tree is clean.

User runs write ``results/<profile>/`` (git-ignored); only ``run_all.py --reference`` rewrites the committed
``results/reference/<profile>/``, and only from a clean tree, so every row it writes carries a clean SHA
(:func:`mudenet_core.io.git_sha` appends ``-dirty`` when a tracked file differs from HEAD).

A reference run rewrites tracked files as it goes, which would make every later notebook's SHA ``-dirty``.
:func:`index_ignoring` gives the kernels a private copy of the git index in which the tracked files of the
output folder are marked ``skip-worktree``: git then compares everything else with HEAD as before, and the
run's own outputs do not count as changes. The repository's real index is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from mudenet_core.workbook.plan import REPO_ROOT


def _git(args: list[str], repo: Path, env: dict | None = None) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, **(env or {})}).stdout


def is_repository(repo: Path = REPO_ROOT) -> bool:
    """Whether ``repo`` is inside a git work tree (and git is installed)."""
    try:
        return _git(["rev-parse", "--is-inside-work-tree"], repo).strip() == "true"
    except (OSError, subprocess.SubprocessError):
        return False


def tracked_files(folder: Path, repo: Path = REPO_ROOT) -> list[str]:
    """Files under ``folder`` that git tracks (paths relative to ``repo``); ``[]`` outside the repository."""
    folder = Path(folder).resolve()
    try:
        folder.relative_to(Path(repo).resolve())
    except ValueError:
        return []
    try:
        out = _git(["ls-files", "-z", "--", str(folder)], repo)
    except (OSError, subprocess.SubprocessError):
        return []
    return [p for p in out.split("\0") if p]


def dirty_files(repo: Path = REPO_ROOT, env: dict | None = None) -> list[str]:
    """Tracked files that differ from HEAD (``git status --porcelain --untracked-files=no``), as git_sha sees.

    Raises:
        OSError, subprocess.SubprocessError: git is missing or ``repo`` is not a repository.
    """
    out = _git(["status", "--porcelain", "--untracked-files=no"], repo, env)
    return [line[3:] for line in out.splitlines() if line.strip()]


def index_ignoring(folder: Path, tmp_dir: Path, repo: Path = REPO_ROOT) -> dict[str, str]:
    """Environment for processes whose git status must not see changes to the tracked files under ``folder``.

    Copies the repository's index into ``tmp_dir`` and marks the tracked files under ``folder`` skip-worktree
    in the copy. Returns ``{"GIT_INDEX_FILE": <copy>}``, or ``{}`` when nothing under ``folder`` is tracked.
    """
    files = tracked_files(folder, repo)
    if not files:
        return {}
    index = Path(_git(["rev-parse", "--path-format=absolute", "--git-path", "index"], repo).strip())
    copy = Path(tmp_dir) / "index"
    shutil.copyfile(index, copy)
    env = {"GIT_INDEX_FILE": str(copy)}
    subprocess.run(["git", "update-index", "--skip-worktree", "-z", "--stdin"], cwd=repo, check=True,
                   input="\0".join(files) + "\0", text=True, capture_output=True, timeout=120,
                   env={**os.environ, **env})
    return env
