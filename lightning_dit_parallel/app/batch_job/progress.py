"""One progress line for a whole batch job, on global rank 0: samples done of all data-parallel groups / total,
samples per second of this run, and the time left. A resumed run starts from the samples already on disk."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from lightning_dit_parallel.utils.logging import log


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # nan or inf: no rate yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressLine:
    """Rewrites one line on a terminal; elsewhere (a log file, a batch system's output) logs a line at most every
    ``interval_s`` seconds, and the last one.

    Args:
        total: samples of the whole job.
        done_before: samples already on disk when this run started (counted as done, not in the rate).
        stream: the terminal stream (default ``sys.stderr``).
        interval_s: seconds between lines when ``stream`` is not a terminal.
    """

    def __init__(
        self, total: int, done_before: int = 0, stream: TextIO | None = None, interval_s: float = 30.0
    ) -> None:
        self.total = total
        self.done_before = done_before
        self.done = done_before
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.perf_counter()
        self._last = float("-inf")
        self._width = 0

    def text(self) -> str:
        elapsed = time.perf_counter() - self._start
        new = self.done - self.done_before
        rate = new / elapsed if elapsed > 0 and new > 0 else float("nan")
        left = (self.total - self.done) / rate if rate == rate else float("nan")
        before = f", {self.done_before} before this run" if self.done_before else ""
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"samples {self.done}/{self.total} ({percent:.0f}%{before}) | {rate:.2f} samples/s | {_duration(left)} left"
            if rate == rate
            else f"samples {self.done}/{self.total} ({percent:.0f}%{before}) | ? samples/s | ? left"
        )

    def update(self, new_samples: int) -> None:
        """Count ``new_samples`` more and show the line (on a terminal always, else every ``interval_s``)."""
        self.done += new_samples
        now = time.perf_counter()
        if self._tty:
            line = self.text()
            self.stream.write("\r" + line.ljust(self._width))
            self.stream.flush()
            self._width = len(line)
        elif now - self._last >= self.interval_s or self.done >= self.total:
            log.log(logging.INFO, self.text())
            self._last = now

    def close(self) -> None:
        """End the terminal line."""
        if self._tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
