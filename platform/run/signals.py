"""SIGTERM (what Ray, Kubernetes and batch schedulers send) and SIGINT (Ctrl-C) end a search or a study the same
way: the signal becomes an `Interrupted` (a KeyboardInterrupt) in the driver's main thread, the code that owns an
MLflow run marks it KILLED and says how to resume, the CLI shuts Ray down (its workers with it) and exits 128 + the
signal.

Checkpoints are never removed on the way out: a rerun with the same name resumes from the last one.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGTERM, signal.SIGINT)
_active: list = []  # the handler of the innermost `stop_on_signals` block


class Interrupted(KeyboardInterrupt):
    """A stop signal reached the driver. A KeyboardInterrupt because that is the one exception Ray lets through a
    blocking ``ray.get`` (it re-raises a plain KeyboardInterrupt: `received` keeps which signal it was).

    Code that owned a run sets ``resume`` on the exception it caught: what was marked and how to resume."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def received() -> int:
    """The stop signal that arrived in the current block (SIGINT when none did: a KeyboardInterrupt of Python's)."""
    return _received[-1] if _received else signal.SIGINT


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, the first SIGTERM or SIGINT raises `Interrupted`; a second one acts as by default (so a
    cleanup that hangs can still be stopped). Ray Tune's own SIGINT handler is switched off for the block: Tune
    would stop its trials and return as if the study had ended."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {s: signal.getsignal(s) for s in HANDLED}

    def handler(signum, _frame):
        _received.append(signum)
        for s in HANDLED:
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)
        raise Interrupted(signum)

    _active.append(handler)
    _received.clear()
    rearm()
    try:
        yield
    finally:
        _active.pop()
        for s, h in previous.items():
            signal.signal(s, h)


def rearm() -> None:
    """Put the block's handler back: ``ray.init`` installs its own for SIGTERM in the driver (Ray's C++ failure
    handler, which aborts the process with status 134 and ends nothing)."""
    if _active:
        for s in HANDLED:
            signal.signal(s, _active[-1])
