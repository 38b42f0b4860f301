"""``mudenet serve``: the inference service and its page on http://127.0.0.1:8000 (:mod:`mudenet_core.serve`).

Options: ``--host`` (default 127.0.0.1: this machine only), ``--port`` (8000), ``--model ID`` (a registry ID
loaded at start-up: ``models:/<name>/<version>``, ``<name>/<version>`` or ``runs:/<run_id>``),
``--max-upload-mb N`` (largest request body, 20), ``--runtime torch|onnx``, ``--device``. The registry is
:func:`mudenet_core.tracking.tracking_uri` (``$MLFLOW_TRACKING_URI``, else ``<repo>/results/mlflow.db``);
``--tracking-uri`` names another (e.g. ``sqlite:///results/cpu/mlflow.db``). ``$MUDENET_API_TOKEN`` turns on
bearer-token authentication.
"""

from __future__ import annotations

from mudenet_core.cli.common import CLIError, resolve_device_arg, say


def cmd_serve(args, overrides: list[str]) -> int:
    """``mudenet serve``: build the app (loading ``--model``, so a bad one fails here), run uvicorn."""
    if overrides:
        raise CLIError(f"serve takes no key=value overrides, got {list(overrides)}")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise CLIError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    try:
        import uvicorn

        from mudenet_core.serve import ServeError, Settings, create_app
    except ImportError as e:
        raise CLIError(f'the service needs the serve extra ({e}): pip install -e ".[serve]"') from None
    device = resolve_device_arg(args.device)
    uri = args.tracking_uri
    if uri is not None and "://" not in uri:
        raise CLIError(f"--tracking-uri {uri!r}: expected a URI such as sqlite:///results/cpu/mlflow.db")
    settings = Settings(
        model_id=args.model,
        runtime=args.runtime,
        device=str(device),
        max_upload_mb=args.max_upload_mb,
        tracking_uri=uri,
    )
    try:
        app = create_app(settings)
    except ServeError as e:
        raise CLIError(f"cannot start: {e.message}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        say(
            f"serve: warning: listening on {args.host}, reachable from other machines"
            " (set MUDENET_API_TOKEN to require a token)"
        )
    say(f"serve: http://{args.host}:{args.port}/ (API docs at /docs), model {args.model or 'none yet'}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", workers=1)
    return 0
