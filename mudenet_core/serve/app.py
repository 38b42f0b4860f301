"""The inference service: a FastAPI app that serves one registry model at a time, and its web page.

Routes (OpenAPI at ``/docs``):

* ``GET /`` the web page (``static/index.html``, ``app.js``, ``style.css``; no CDN, no build step).
* ``GET /api/status`` the loaded model (method, input size, threshold and its source), device, version.
* ``GET /api/models`` the registry (:func:`mudenet_core.tracking.list_models`).
* ``POST /api/load_model`` ``{"model_id": "models:/<name>/<version>"}``: registry IDs only, never a path.
* ``POST /api/test_image`` multipart ``file`` (+ optional ``threshold``): score, decision, threshold, heat map
  (base64 PNG), the map quantised to uint8 with its range (so the page re-thresholds without a request), the
  anomalous regions (bounding box, area, peak) and the image itself as a PNG.
* ``POST /api/batch_test`` multipart ``files`` (images and/or zip archives; ``include_maps`` to get each
  image's maps too): one row per image, batched inference.

Errors are ``{"detail": "<one line>"}`` with a 4xx status: 400 empty file or bad model ID, 401 missing token,
404 unknown model, 409 no model loaded, 413 upload or image too large (bytes, pixels, zip bomb), 415 not an
image or an unreadable one, 422 a model that cannot be loaded. The service keeps serving after each.

Security: ``mudenet serve`` binds 127.0.0.1 unless told otherwise. With a token (``MUDENET_API_TOKEN`` or
``create_app(token=...)``) every route except ``/api/status``, ``/`` and ``/static/*`` needs
``Authorization: Bearer <token>`` (the page asks for it). Models are found only through the registry
(:func:`mudenet_core.tracking.parse_model_id` refuses paths) and their checkpoints must load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from mudenet_core import __version__
from mudenet_core.serve.inference import (
    MAX_PIXELS,
    LoadedModel,
    ServeError,
    decode_image,
    describe,
    open_model,
    predict,
    zip_members,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
TOKEN_ENV = "MUDENET_API_TOKEN"
PUBLIC_PATHS = ("/", "/api/status", "/favicon.ico")  # no token needed (and /static/*)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the service runs.

    Attributes:
        model_id: registry ID loaded at start-up (None: none until ``/api/load_model``).
        runtime: ``torch`` (the detector) or ``onnx`` (``model.onnx`` of the model folder).
        device: torch device for the torch runtime.
        max_upload_mb: largest request body (all files together) in MiB; zip contents may be 4x that.
        max_pixels: largest decoded image (width x height).
        batch_size: images per forward pass in ``/api/batch_test``.
        token: bearer token (None: ``$MUDENET_API_TOKEN``; "" or unset: no token).
        tracking_uri: the registry (None: :func:`mudenet_core.tracking.tracking_uri`).
    """

    model_id: str | None = None
    runtime: str = "torch"
    device: str = "cpu"
    max_upload_mb: float = 20.0
    max_pixels: int = MAX_PIXELS
    batch_size: int = 8
    token: str | None = None
    tracking_uri: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return int(self.max_upload_mb * (1 << 20))


class LoadRequest(BaseModel):
    """Body of ``/api/load_model``."""

    model_id: str


class _State:
    """The one mutable part of the app: the loaded model (swapped under a lock)."""

    def __init__(self) -> None:
        self.model: LoadedModel | None = None
        self.lock = threading.Lock()

    def swap(self, model: LoadedModel) -> None:
        with self.lock:
            old, self.model = self.model, model
        if old is not None and old.folder != model.folder:
            shutil.rmtree(old.folder.parent if old.folder.name == "model" else old.folder, ignore_errors=True)

    def require(self) -> LoadedModel:
        m = self.model
        if m is None:
            raise ServeError(409, "no model loaded: POST /api/load_model with a registry ID first")
        return m


def load_registry_model(model_id: str, settings: Settings) -> LoadedModel:
    """Resolve ``model_id`` through the registry and open it; :class:`ServeError` (400/404/422) otherwise."""
    import tempfile

    from mudenet_core import tracking

    try:
        kind, a, b = tracking.parse_model_id(model_id)
    except tracking.ModelNotFound as e:
        raise ServeError(400, str(e)) from None
    canonical = f"models:/{a}/{b}" if kind == "models" else f"runs:/{a}"
    dst = Path(tempfile.mkdtemp(prefix="mudenet_serve_"))
    try:
        folder = tracking.resolve_model(model_id, uri=settings.tracking_uri, dst=dst)
        return open_model(canonical, folder, runtime=settings.runtime, device=settings.device)
    except tracking.ModelNotFound as e:
        shutil.rmtree(dst, ignore_errors=True)
        raise ServeError(404, str(e)) from None
    except ServeError:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    except Exception as e:  # an unexpected failure of the store or the model: a clear 422, never a 500
        shutil.rmtree(dst, ignore_errors=True)
        raise ServeError(422, f"model {model_id} cannot be loaded ({type(e).__name__})") from None


def _read_upload(f: UploadFile, budget: int) -> bytes:
    data = f.file.read(budget + 1)
    if len(data) > budget:
        raise ServeError(
            413,
            f"{Path(f.filename or 'upload').name}: the upload is above the limit of "
            f"{budget / (1 << 20):.1f} MiB (mudenet serve --max-upload-mb)",
        )
    return data


def _threshold(model: LoadedModel, override: float | None) -> tuple[float | None, str]:
    if override is None:
        return model.threshold, model.threshold_source
    if override != override or abs(override) == float("inf"):
        raise ServeError(400, "threshold must be a finite number")
    return float(override), "request"


def create_app(settings: Settings | None = None, **overrides: Any) -> FastAPI:
    """The FastAPI app; ``overrides`` replace fields of ``settings`` (see :class:`Settings`).

    The start-up model (``settings.model_id``) is loaded here, so a bad one fails at once with a
    :class:`ServeError`.
    """
    s = dataclasses.replace(settings or Settings(), **overrides)
    token = s.token if s.token is not None else os.environ.get(TOKEN_ENV, "")
    state = _State()
    if s.model_id:
        state.swap(load_registry_model(s.model_id, s))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        m = state.model  # the downloaded model folder goes with the service
        if m is not None:
            shutil.rmtree(m.folder.parent if m.folder.name == "model" else m.folder, ignore_errors=True)

    app = FastAPI(
        title="mudenet_core inference",
        version=__version__,
        lifespan=lifespan,
        description="Anomaly maps, scores and decisions of a registered model (see /api/status).",
    )
    app.state.mudenet = state
    app.state.settings = s

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug: no traceback leaves the server
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500
        )

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = request.url.path
        if token and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not (given and secrets.compare_digest(given.encode(), token.encode())):
                return JSONResponse(
                    {"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return JSONResponse({"detail": "bad Content-Length"}, status_code=400)
            if int(length) > s.max_upload_bytes + (1 << 16):  # the multipart framing on top of the files
                return JSONResponse(
                    {
                        "detail": f"request body of {int(length)} bytes is above the limit of "
                        f"{s.max_upload_mb:g} MiB (mudenet serve --max-upload-mb)"
                    },
                    status_code=413,
                    headers={"Connection": "close"},
                )
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        """The loaded model, its threshold and where it came from, the device and the version."""
        m = state.model
        return {
            "version": __version__,
            "model": m.info() if m else None,
            "method": m.method if m else None,
            "input_size": m.image_size if m else None,
            "threshold": m.threshold if m else None,
            "threshold_source": m.threshold_source if m else None,
            "device": s.device,
            "runtime": s.runtime,
            "auth_required": bool(token),
            "max_upload_mb": s.max_upload_mb,
            "max_pixels": s.max_pixels,
        }

    @app.get("/api/models")
    def models() -> dict[str, Any]:
        """Every registered model version (model_id, method, dataset, category, seed, metrics...)."""
        from mudenet_core import tracking

        try:
            listing = tracking.list_models(s.tracking_uri)
        except Exception as e:
            raise ServeError(503, f"the registry cannot be read ({type(e).__name__})") from None
        loaded = state.model.model_id if state.model else None
        return {"models": [{**m, "loaded": m["model_id"] == loaded} for m in listing], "loaded": loaded}

    @app.post("/api/load_model")
    def load_model(req: LoadRequest) -> dict[str, Any]:
        """Load a model by registry ID: ``models:/<name>/<version>``, ``<name>/<version>``, ``runs:/<id>``."""
        model = load_registry_model(req.model_id, s)
        state.swap(model)
        return {"loaded": model.info()}

    @app.post("/api/test_image")
    def test_image(file: Annotated[UploadFile, File()],
                   threshold: Annotated[float | None, Form()] = None) -> dict[str, Any]:
        """Score one image: score, decision, heat map, quantised map and anomalous regions."""
        model = state.require()
        thr, source = _threshold(model, threshold)
        name = Path(file.filename or "upload").name
        image = decode_image(_read_upload(file, s.max_upload_bytes), name, max_pixels=s.max_pixels)
        maps, scores = predict(model, [image], batch_size=1)
        return describe(
            model, image, maps[0], float(scores[0]), filename=name, threshold=thr, threshold_source=source
        )

    @app.post("/api/batch_test")
    def batch_test(
        files: Annotated[list[UploadFile], File()],
        threshold: Annotated[float | None, Form()] = None,
        include_maps: Annotated[bool, Form()] = False,
    ) -> dict[str, Any]:
        """Score several images (files and/or zip archives), batched; one result per image."""
        model = state.require()
        thr, source = _threshold(model, threshold)
        budget = s.max_upload_bytes
        items: list[tuple[str, bytes]] = []
        skipped: list[str] = []
        for f in files:
            name = Path(f.filename or "upload").name
            data = _read_upload(f, budget)
            budget -= len(data)
            if name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
                members, skip = zip_members(
                    data, max_member_bytes=s.max_upload_bytes, max_total_bytes=4 * s.max_upload_bytes
                )
                items += [(f"{name}/{n}", b) for n, b in members]
                skipped += [f"{name}/{n}" for n in skip]
            else:
                items.append((name, data))
        if not items:
            raise ServeError(
                415, "no image in the upload" + (f" (skipped: {', '.join(skipped[:5])})" if skipped else "")
            )
        decoded, results = [], [None] * len(items)
        for i, (name, data) in enumerate(items):
            try:
                decoded.append((i, decode_image(data, name, max_pixels=s.max_pixels)))
            except ServeError as e:
                results[i] = {"filename": name, "error": e.message, "status": e.status}
        if not decoded:
            raise ServeError(415, f"no decodable image: {results[0]['error']}")
        maps, scores = predict(model, [im for _, im in decoded], batch_size=s.batch_size)
        for (i, image), amap, score in zip(decoded, maps, scores, strict=True):
            results[i] = describe(
                model,
                image,
                amap,
                float(score),
                filename=items[i][0],
                threshold=thr,
                threshold_source=source,
                include_images=include_maps,
            )
        return {
            "model_id": model.model_id,
            "threshold": thr,
            "threshold_source": source,
            "n_images": len(decoded),
            "n_errors": len(items) - len(decoded),
            "skipped": skipped,
            "results": results,
        }

    return app
