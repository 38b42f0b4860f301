"""``python -m mudenet_core.serve [--host ...] [--port ...] [--model ID]``: the same as ``mudenet serve``."""

import sys

from mudenet_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
