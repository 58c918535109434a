"""SIGTERM and SIGINT on a running two-worker search (a real `fliqs search` process with a local Ray instance): the
MLflow run ends KILLED, the checkpoints stay, one line says how to resume, no Ray process of the job survives, and
a rerun of the same command resumes from the last checkpoint."""

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

from fliqs import schema

pytestmark = pytest.mark.slow

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


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


def _stop_with(sig: int, command: list[str], log: Path, storage: Path, checkpoints_before: int) -> tuple[int, str]:
    """Run ``command``, send ``sig`` once a new checkpoint is on disk, return (exit status, its output)."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(list(storage.glob("*/checkpoint_*"))) > checkpoints_before or proc.poll() is not None,
                  timeout=240)
        assert proc.poll() is None, log.read_text()[-2000:]
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, log.read_text()


def test_sigterm_and_sigint_end_the_run_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fliqs.cli", "search", f"output_dir={out}", "name=sig", "train.num_workers=2",
               "train.epochs=60", "train.checkpoint_every=10", "train.log_every=10"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    storage = out / "ray"
    for sig, status, number in ((signal.SIGTERM, 143, 0), (signal.SIGINT, 130, None)):
        before = len(list(storage.glob("*/checkpoint_*"))) if number is None else number
        rc, text = _stop_with(sig, command, tmp_path / f"{sig.name}.log", storage, before)
        assert rc == status, text[-3000:]
        message = [line for line in text.splitlines() if "stopped by" in line]
        assert len(message) == 1 and "Traceback" not in text, text[-3000:]
        assert f"stopped by {sig.name}" in message[0] and "name=sig" in message[0] and "KILLED" in message[0]
        run = client.search_runs([client.get_experiment_by_name("fliqs").experiment_id])[0]
        assert run.info.run_name == "sig" and run.info.status == "KILLED"
        assert list(storage.glob("*/checkpoint_*")), "the checkpoints stay"
        session = re.search(r"Ray logs: (/\S+?/session_[^/\s]+)", text)[1]
        deadline = time.monotonic() + 30  # ray.shutdown() returns before every process has exited
        while _session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _session_processes(session), _session_processes(session)
    # The second run (stopped by SIGINT) had resumed from the first's checkpoint.
    run = client.get_run(run.info.run_id)
    assert run.data.metrics[schema.RESUMED_FROM_STEP] >= 10
    assert not (out / "sig" / schema.RESULT_FILE).exists()
