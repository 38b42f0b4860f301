"""One clean line per notebook on the console (and a progress bar on a terminal).

Events come from the executors as ``(kind, run_label, notebook, info)`` tuples, ``kind`` in
``start | ok | failed | skip | rerun`` (``info``: the duration, or why ``--resume`` runs it again); from a
process pool they travel through a queue.
"""

from __future__ import annotations

import sys


class Console:
    """Progress of a whole profile: ``total`` notebooks; silent when ``enabled`` is False (``--quiet``).

    On a terminal a tqdm bar counts the notebooks and names the one running; finished notebooks are printed
    above it. Elsewhere (a log file, CI) only the finished lines are printed, without carriage returns.
    """

    def __init__(self, total: int, *, profile: str, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"run_all[{profile}]", unit="nb", file=self.stream,
                            dynamic_ncols=True, leave=False)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: tuple) -> None:
        """Handle one event."""
        kind, label, name, *rest = event
        info = rest[0] if rest else None
        if not self.enabled:
            return
        if kind == "start":
            if self.bar is not None:
                self.bar.set_postfix_str(f"{label} {name}")
            return
        if kind == "rerun":  # --resume: why this notebook executes again
            pad = " " * (2 * len(str(self.total)) + 1)
            self._line(f"[run_all] {pad} {label:<28} {name:<20} runs again: {info}")
            return
        self.done += 1
        width = len(str(self.total))
        what = {"ok": "ok", "failed": "FAILED", "skip": "complete, skipped"}.get(kind, kind)
        took = f" ({info:.1f} s)" if isinstance(info, int | float) else ""
        self._line(f"[run_all] {self.done:>{width}}/{self.total} {label:<28} {name:<20} {what}{took}")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()
