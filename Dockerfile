# MuDeNet workbook image: the package with its offline backbone, the inference service as entry point.
#
#   docker build -t mudenet:cpu .                                     # CPU (python slim, torch CPU wheel)
#   docker run --rm -p 127.0.0.1:8000:8000 -v mudenet-results:/app/results mudenet:cpu [--model ID]
#
# GPU variant (compose.gpu.yaml passes these): a CUDA runtime base and the matching torch wheel index, e.g.
#   docker build -t mudenet:gpu --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
# The same image runs the API (default), JupyterLab on the workbook and the MLflow UI (see compose.yaml).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MUDENET_NO_PROGRESS=1 \
    MLFLOW_TRACKING_URI=sqlite:////app/results/mlflow.db

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# CUDA base images have no Python: install the distribution's (python slim already has one). Versions are
# the base image's own, so they are not pinned here.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 1000 --shell /bin/bash mudenet

WORKDIR /app

# torch first, in its own layer, from the index of the chosen build (CPU wheels by default: no CUDA
# libraries in the CPU image); the ranges are pyproject.toml's, so the package install below keeps them
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.1,<3" "torchvision>=0.16,<1"

# the dependencies, in a layer that only pyproject.toml invalidates: an editable install of the bare
# package (configs/ and results/ live beside it, at REPO_ROOT = /app)
COPY pyproject.toml README.md /app/
COPY mudenet_core/__init__.py /app/mudenet_core/__init__.py
RUN pip install -e ".[serve,export]"

# the workbook: package, profiles, notebooks, run_all.py; .dockerignore keeps data, results, .venv, .git out
COPY --chown=1000:1000 . /app
RUN mkdir -p /app/results && chown 1000:1000 /app /app/results

USER 1000:1000

EXPOSE 8000
# /api/status answers without a token and without a model loaded
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/status', timeout=4)"]

ENTRYPOINT ["mudenet", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
