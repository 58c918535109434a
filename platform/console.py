"""What a person reads in the terminal: progress lines and plain-text tables."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def progress(message: str) -> None:
    """One progress line. Written to the process' real stdout: Ray Train V2 patches ``print`` in workers and,
    when another library wraps ``sys.stdout`` (MLflow does), tees every line twice."""
    sys.__stdout__.write(f"[fliqs] {message}\n")
    sys.__stdout__.flush()


def table(rows: Sequence[Sequence[object]], header: Sequence[str], right: Sequence[str] = ()) -> str:
    """Columns padded to their widest cell; the columns named in ``right`` (numbers) are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(row, widths, header, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])
