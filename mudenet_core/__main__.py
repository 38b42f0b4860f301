"""``python -m mudenet_core``: the same command line as ``mudenet`` (see :mod:`mudenet_core.cli`)."""

from mudenet_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
