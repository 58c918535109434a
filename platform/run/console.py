"""What a person reads in the terminal: progress lines, a progress bar and plain-text tables.

The terminal shows the driver's lines only: what a run is, one progress bar (steps of a training run, or trials of a
study, with an ETA), the final table and where things are. Everything else (every Ray process' output, Ray Train's
reports, Tune's trial tables, library warnings) goes to log files (`fliqs.trainables.cluster.init_ray` says where).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from typing import TextIO

_active_bars = 0  # bars drawing in this process: a training loop here leaves its step lines to the bar


def progress(message: str) -> None:
    """One progress line. Written to the process' real stdout: Ray Train V2 patches ``print`` in workers and,
    when another library wraps ``sys.stdout`` (MLflow does), tees every line twice."""
    sys.__stdout__.write(f"[fliqs] {message}\n")
    sys.__stdout__.flush()


def step_line(message: str) -> None:
    """A training loop's periodic line: printed where no progress bar is drawn in this process (a Ray worker, whose
    output goes to its log file), left out under a bar (an in-process run: the bar shows the same numbers)."""
    if _active_bars == 0:
        progress(message)


def duration(seconds: float) -> str:
    """``42 s``, ``3m05s``, ``1h02m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressBar:
    """One bar: ``[fliqs] demo |######----| 150/270 steps 56% 12 s ETA 9 s train_loss 0.04``.

    On a terminal it is redrawn in place (at most every ``min_interval`` seconds); elsewhere (a log file, a pipe) a
    line is written at every quarter and at least every ``log_interval`` seconds, so a log stays short. The ETA
    extrapolates the rate seen since the first progress (start-up time is not progress).
    """

    WIDTH = 24

    def __init__(self, label: str, unit: str, stream: TextIO | None = None, min_interval: float = 0.2,
                 log_interval: float = 60.0):
        self.label, self.unit = label, unit
        self.stream = stream or sys.__stdout__
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval, self.log_interval = min_interval, log_interval
        self.start = time.monotonic()
        self.done, self.total, self.note = 0, None, ""
        self._first: tuple[float, int] | None = None  # (time, done) of the first progress seen
        self._drawn = 0.0
        self._logged_quarter, self._logged_at = 0, self.start
        self._width = 0
        self.closed = False
        global _active_bars
        _active_bars += 1

    def update(self, done: int, total: int | None, note: str = "") -> None:
        now = time.monotonic()
        if total is not None and (self._first is None or done < self._first[1]):
            self._first = (now, done)
        self.done, self.total, self.note = done, total, note
        if self.tty:
            if now - self._drawn >= self.min_interval:
                self._draw(now)
            return
        quarter = 4 * done // total if total else -1
        if quarter > self._logged_quarter or now - self._logged_at >= self.log_interval:
            self._logged_quarter, self._logged_at = max(quarter, self._logged_quarter), now
            self._write(self.render(now) + "\n")

    def render(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        if not self.total:
            return f"[fliqs] {self.label} {self.note or 'starting'} ({duration(elapsed)})".rstrip()
        frac = min(1.0, self.done / self.total)
        fill = int(frac * self.WIDTH)
        bar = "#" * fill + "-" * (self.WIDTH - fill)
        eta = ""
        if self._first is not None and self.done < self.total:
            t0, d0 = self._first
            if self.done > d0 and now > t0:
                eta = f" ETA {duration((self.total - self.done) * (now - t0) / (self.done - d0))}"
        note = f" {self.note}" if self.note else ""
        return (f"[fliqs] {self.label} |{bar}| {self.done}/{self.total} {self.unit} {frac:4.0%} "
                f"{duration(elapsed)}{eta}{note}")

    def _draw(self, now: float) -> None:
        line = self.render(now)[:max(20, shutil.get_terminal_size((120, 24)).columns - 1)]
        self._write("\r" + line + " " * max(0, self._width - len(line)))
        self._width, self._drawn = len(line), now

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """Leave the final state on its own line."""
        if self.closed:
            return
        self.closed = True
        global _active_bars
        _active_bars -= 1
        if self.tty:
            self._draw(time.monotonic())
            self._write("\n")
        elif self._logged_quarter < 4 or not self.total:
            self._write(self.render() + "\n")


def table(rows: Sequence[Sequence[object]], header: Sequence[str], right: Sequence[str] = ()) -> str:
    """Columns padded to their widest cell; the columns named in ``right`` (numbers) are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(row, widths, header, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])
