"""A progress line on stderr for long work (download, conversion), without a dependency."""

from __future__ import annotations

import sys
import time


class Progress:
    """Call with (done, total, label); prints at most a few times a second, and a final line."""

    def __init__(self, title: str, stream=sys.stderr):
        self.title = title
        self.stream = stream
        self._last = 0.0
        self._start = time.perf_counter()

    def __call__(self, done: int, total: int, label: str = "") -> None:
        now = time.perf_counter()
        finished = total and done >= total
        if not finished and now - self._last < 0.25:
            return
        self._last = now
        width = 30
        frac = done / total if total else 0.0
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        end = "\n" if finished else "\r"
        self.stream.write(
            f"{self.title} [{bar}] {done}/{total} {label[:30]:<30} {now - self._start:5.1f}s{end}"
        )
        self.stream.flush()
