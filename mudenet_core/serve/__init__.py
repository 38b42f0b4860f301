"""The inference service (``mudenet serve``): :func:`create_app` builds the FastAPI app, see :mod:`.app`."""

from mudenet_core.serve.app import Settings, create_app
from mudenet_core.serve.inference import ServeError

__all__ = ["ServeError", "Settings", "create_app"]
