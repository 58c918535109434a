"""The driver's progress bar, read from MLflow: Ray workers' output stays in their log files, and rank 0 already
writes its progress into the run (the tag `fliqs.run.schema.PROGRESS` with every metric batch), so the driver follows
the run where it is recorded, the same way for Ray Train workers, in-process runs and runs on other nodes.

* `watch_run`: the steps of a search's training run (or of the child run now training: a multi-trial candidate, a
  phase of the sequential baseline), with the latest logged metrics.
* `watch_study`: the trials of a study finished out of all, counted from its child runs.

Both draw one `fliqs.run.console.ProgressBar` from a background thread until the ``with`` block ends; a failing poll
(a busy SQLite store, a server hiccup) is skipped, never raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fliqs.run import schema
from fliqs.run.console import ProgressBar
from fliqs.run.tracking import client

POLL_S = 1.0  # one small read of the run per second: the bar's resolution, not a load
SHOWN_METRICS = ("train_loss", schema.BATCH_VAL_ACCURACY, "expected_gbops")  # the bar's note, when the run logs them


def parse_progress(tag: str | None) -> tuple[int, int] | None:
    try:
        step, total = (int(v) for v in (tag or "").split("/"))
        return step, total
    except ValueError:
        return None


@contextmanager
def _polling(bar: ProgressBar, poll: Callable[[], None], interval: float) -> Iterator[ProgressBar]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                poll()
            except Exception:  # noqa: BLE001 - a missed poll only delays the bar
                pass
            stop.wait(interval)

    thread = threading.Thread(target=loop, name="fliqs-progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            poll()  # the final state
        except Exception:  # noqa: BLE001
            pass
        bar.close()


@contextmanager
def watch_run(uri: str, run_id: str, label: str, interval: float = POLL_S) -> Iterator[ProgressBar]:
    """Draw the training progress of ``run_id`` (or of its newest running child run) until the block ends."""
    bar = ProgressBar(label, "steps")
    c = client(uri)

    def poll() -> None:
        run = c.get_run(run_id)
        where, found = "", parse_progress(run.data.tags.get(schema.PROGRESS))
        if found is None or found[0] >= found[1]:  # a driver's own run: follow the child that trains now
            children = c.search_runs([run.info.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                     filter_string=f"tags.`{schema.PARENT}` = '{run_id}' and "
                                                   f"attributes.status = 'RUNNING'")
            if children and parse_progress(children[0].data.tags.get(schema.PROGRESS)):
                run = children[0]
                where = run.data.tags.get(schema.MLFLOW_RUN_NAME, "").rsplit("/", 1)[-1] + " "
                found = parse_progress(run.data.tags.get(schema.PROGRESS))
        if found is None:
            bar.update(0, None, "waiting for the workers")
            return
        metrics = run.data.metrics
        shown = " ".join(f"{k} {metrics[k]:.4g}" for k in SHOWN_METRICS if k in metrics)
        bar.update(found[0], found[1], (where + shown).strip())

    with _polling(bar, poll, interval):
        yield bar


@contextmanager
def watch_study(uri: str, experiment_id: str, parent_run_id: str, total: int, label: str,
                interval: float = 2 * POLL_S) -> Iterator[ProgressBar]:
    """Draw the trials of a study finished out of ``total`` (counted from the parent's trial runs)."""
    bar = ProgressBar(label, "trials")
    c = client(uri)

    def poll() -> None:
        runs = c.search_runs([experiment_id], max_results=10000,
                             filter_string=f"tags.`{schema.PARENT}` = '{parent_run_id}' and "
                                           f"tags.`{schema.ROLE}` = '{schema.TRIAL}'")
        done = sum(r.info.status == "FINISHED" for r in runs)
        running = sum(r.info.status == "RUNNING" for r in runs)
        failed = sum(r.info.status == "FAILED" for r in runs)
        parts = ([f"{running} running"] if running else []) + ([f"{failed} failed"] if failed else [])
        note = ", ".join(parts)
        bar.update(done, total, note)

    with _polling(bar, poll, interval):
        yield bar
