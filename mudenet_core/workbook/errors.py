"""The runner's errors: bad arguments (exit status 2) and failed runs (exit status 1)."""

from __future__ import annotations


class RunAllError(RuntimeError):
    """A run that cannot start or did not finish (bad arguments, a failed notebook)."""


class PlanError(RunAllError):
    """Bad arguments or an unusable output location: nothing was executed (exit status 2)."""
