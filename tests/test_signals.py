"""SIGTERM and SIGINT on a running search (a real `fliqs search` process): the MLflow run ends KILLED, the
checkpoints stay, one line says how to resume, and a rerun of the same command resumes from the last checkpoint.

SIGTERM goes to a search on Ray Train (a local Ray instance and one training worker: no Ray process of the job may
survive it; a second worker would add a worker start, not a signal path), SIGINT to an in-process search and then to
its rerun (the signal path is the same, without a Ray start and its worker starts).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_for
from mlflow.tracking import MlflowClient

from fliqs.run import schema
from fliqs.run.config import DEFAULT_EXPERIMENT

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}  # conftest.py has put RAY_ENV and no MLflow telemetry in os.environ


def _session_processes(session: str) -> list[str]:
    """Processes of the Ray session ``session`` (its raylet, GCS, workers name the session folder)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def _checkpoints(storage: Path) -> set[str]:
    return {p.name for p in storage.glob("*/checkpoint_*")}


def _stop_with(sig: int, command: list[str], log: Path, storage: Path) -> tuple[int, str]:
    """Run ``command``, send ``sig`` once a checkpoint it wrote is on disk, return (exit status, its output)."""
    before = _checkpoints(storage)  # older checkpoints are rotated away, so wait for a new name, not a count
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _checkpoints(storage) - before or proc.poll() is not None, timeout=240, every=0.1)
        assert proc.poll() is None, log.read_text()[-2000:]
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, log.read_text()


def _check_stopped(sig: int, rc: int, text: str, client: MlflowClient, name: str):
    """Exit status 128 + signal, one line naming the signal, the run and how to resume, the run KILLED."""
    assert rc == 128 + sig, text[-3000:]
    message = [line for line in text.splitlines() if "stopped by" in line]
    assert len(message) == 1 and "Traceback" not in text, text[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in message[0] and f"name={name}" in message[0]
    assert "KILLED" in message[0]
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id
    run, = client.search_runs([exp], filter_string=f"tags.`{schema.RUN_NAME}` = '{name}'")
    assert run.info.status == "KILLED"
    return run


def _search(out: Path, name: str, *overrides: str) -> list[str]:
    # Far more epochs than the test lets it run: the signal always lands before the end.
    return [sys.executable, "-m", "fliqs.cli", "search", f"output_dir={out}", f"name={name}", "train.epochs=60",
            "train.checkpoint_every=10", "train.log_every=10", *overrides]


def test_sigterm_ends_a_ray_train_search_and_stops_ray(tmp_path):
    out = tmp_path / "out"
    storage = out / "ray"
    rc, text = _stop_with(signal.SIGTERM, _search(out, "term", "train.num_workers=1"), tmp_path / "term.log", storage)
    _check_stopped(signal.SIGTERM, rc, text, MlflowClient(f"sqlite:///{out / 'mlflow.db'}"), "term")
    assert list(storage.glob("term/checkpoint_*")), "the checkpoints stay"
    session = re.search(r"Ray logs: (/\S+?/session_[^/\s]+)", text)[1]
    deadline = time.monotonic() + 30  # ray.shutdown() returns before every process has exited
    while _session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_processes(session), _session_processes(session)


def test_sigint_ends_a_search_and_its_rerun_resumes(tmp_path):
    out = tmp_path / "out"
    storage = out / "ray"
    command = _search(out, "int", "train.num_workers=0")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for attempt in range(2):
        rc, text = _stop_with(signal.SIGINT, command, tmp_path / f"int{attempt}.log", storage)
        run = _check_stopped(signal.SIGINT, rc, text, client, "int")
        assert list(storage.glob("int/checkpoint_*")), "the checkpoints stay"
        assert "Ray logs" not in text, "an in-process search starts no Ray"
    # The rerun (stopped too) had resumed from the first run's checkpoint, into the same MLflow run.
    assert client.get_run(run.info.run_id).data.metrics[schema.RESUMED_FROM_STEP] >= 10
    assert not (out / "int" / schema.RESULT_FILE).exists()
