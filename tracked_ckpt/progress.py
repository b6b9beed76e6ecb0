"""A byte-count progress line for long transfers: drawn on an interactive terminal, silent otherwise.

The library never prints: callers (the CLI) create a ``Progress`` for the stream they own. When the stream is
not a TTY (a pipe, a log file, CI) nothing is written at all, so logs stay clean.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO

# Below this many bytes a transfer finishes too fast for a bar to help.
MIN_BYTES = 1 << 20
_REDRAW_S = 0.1


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks and networks count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    """``label  42%  12.3 MB / 29.1 MB  85.0 MB/s`` redrawn in place, at most ten times a second.

    Args:
        enabled: None (default) draws only when ``stream`` is a TTY and ``total`` is at least ``MIN_BYTES``.
    """

    def __init__(self, total: int, label: str, stream: IO[str] | None = None, enabled: bool | None = None) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = self.total >= MIN_BYTES and _isatty(self.stream)
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._drawn_at = 0.0
        self._lock = threading.Lock()

    def update_to(self, done: int) -> None:
        """Set the bytes transferred so far (never moves backwards)."""
        with self._lock:
            self.done = min(max(done, self.done), self.total) if self.total else max(done, self.done)
            now = time.monotonic()
            if self.enabled and now - self._drawn_at >= _REDRAW_S:
                self._draw(now)

    def advance(self, n: int) -> None:
        self.update_to(self.done + n)

    def close(self) -> None:
        """Draw the final state and end the line (only when a line was being drawn)."""
        with self._lock:
            if self.enabled:
                self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()
                self.enabled = False

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        rate = self.done / max(now - self._start, 1e-6)
        pct = f"{100 * self.done // self.total:3d}%" if self.total else "   ?"
        line = f"{self.label}  {pct}  {human_bytes(self.done)} / {human_bytes(self.total)}  {human_bytes(rate)}/s"
        self.stream.write("\r" + line.ljust(78))
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextmanager
def watch_file(path: Path, progress: Progress, base: int = 0) -> Iterator[None]:
    """Report the growing size of ``path`` (written by code we cannot hook, e.g. an MLflow download).

    A polling thread sets ``progress`` to ``base`` plus the file's current size until the block exits.
    """
    if not progress.enabled:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(_REDRAW_S):
            with contextlib.suppress(OSError):  # not created yet
                st = path.stat()  # allocated blocks: a parallel download sizes its file first, then fills it in
                progress.update_to(base + min(st.st_size, st.st_blocks * 512))

    t = threading.Thread(target=poll, name="tracked_ckpt-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
