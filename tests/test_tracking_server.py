"""End to end against a REAL MLflow tracking server (`mlflow server` subprocess, SQLite backend, proxied artifacts).

One server and one Ray session for the module. A small study logs through the server: its parent, and each trial's
params, metrics, tags and artifacts, uploaded and downloaded over HTTP (a trial is a search's run inside a study);
`fliqs pareto` reads the fronts back from it.
First, without either: an unreachable server makes `fliqs search` exit 2 quickly, naming the URI, before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from helpers import run_cli
from mlflow.tracking import MlflowClient

from fliqs.run.loading import load_config
from fliqs.trainables.study import run_study

pytestmark = pytest.mark.slow

MLFLOW = Path(sys.executable).with_name("mlflow")
HEALTH_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on a free port, and the module's Ray session, started while the server boots (each
    takes 10-15 s on 2 cores). The server is killed with its whole process group (it forks its web worker)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    # One web worker and no job runner (its 7 huey consumers would take a core of a 2-core machine for nothing).
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")  # noqa: SIM115  (closed at teardown)
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ray.init(address="local", num_cpus=2)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up at {uri}:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        ray.shutdown()
        _kill_group(proc)
        log.close()


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group ``pgid`` is left."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it forks its web workers into it), SIGKILL what is left after 20 s;
    returns only when no process of the group is left."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if not _group_alive(proc.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                break
            time.sleep(0.2)
    proc.wait(timeout=10)
    assert not _group_alive(proc.pid), "mlflow server processes left behind"


def test_unreachable_server_exits_2_before_any_work(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fliqs.cli", "search", f"tracking.uri={uri}", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "unreachable" in lines[0], proc.stderr
    assert not out.exists() or not any(out.iterdir()), "nothing may be written before the server answers"


def test_a_study_logs_its_runs_through_the_server(server, tmp_path):
    cfg = load_config([f"output_dir={tmp_path}", "name=srvstudy", f"tracking.uri={server}",
                       "tracking.experiment=fliqs-study", "study.methods=[uniform,fliqs]",
                       "study.uniform_formats=[int8]", "study.target_fractions=[0.4]", "study.seeds=[0]",
                       # one trial at a time: the second runs in the first one's reused process
                       "study.max_concurrent_trials=1",
                       "train.epochs=1", "train.num_workers=0", "train.log_every=5", "reward.beta=-0.5"])
    summary = run_study(cfg)
    assert not summary["errors"]
    assert summary["tracking_uri"] == server
    assert {r["method"] for r in summary["trials"]} == {"uniform", "fliqs"}
    # Ray Tune reused the first trial's actor for the second (the pid Tune records with every result).
    pids = {json.loads(f.read_text().splitlines()[-1])["pid"]
            for f in (tmp_path / "ray" / "study-srvstudy").glob("*/result.json")}
    assert len(pids) == 1, pids
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists(), \
        "with a server, nothing may be tracked locally"

    client = MlflowClient(server)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["method"] for c in children} == {"uniform", "fliqs"}
    assert all(c.info.status == "FINISHED" and "test_accuracy" in c.data.metrics for c in children)
    # A search's record, through the server: its params, tags, metric history and artifacts (uploaded, downloaded).
    fliqs = next(c for c in children if c.data.tags["method"] == "fliqs")
    row = next(r for r in summary["trials"] if r["method"] == "fliqs")
    assert fliqs.data.tags["family"] == "one-shot" and fliqs.data.tags["fliqs.run_name"] == "srvstudy/fliqs_t0.4_s0"
    assert fliqs.data.params["train.epochs"] == "1" and fliqs.data.params["tracking.uri"] == server
    assert fliqs.data.metrics["test_accuracy"] == pytest.approx(row["test_accuracy"])
    assert client.get_metric_history(fliqs.info.run_id, "train_loss"), "the training curve is logged"
    assert {"assignment.json", "policy_probs.png", "model.pt"} <= {a.path for a in
                                                                   client.list_artifacts(fliqs.info.run_id)}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"fronts.json", "pareto.png"} <= artifacts
    down = tmp_path / "downloaded"
    down.mkdir()
    fronts = json.loads(Path(client.download_artifacts(parent.info.run_id, "fronts.json", str(down))).read_text())
    assignment = json.loads(Path(client.download_artifacts(fliqs.info.run_id, "assignment.json", str(down)))
                            .read_text())
    assert assignment["assignment"] == json.loads(fliqs.data.tags["assignment"])
    for run_id, name in ((parent.info.run_id, "pareto.png"), (fliqs.info.run_id, "policy_probs.png")):
        png = Path(client.download_artifacts(run_id, name, str(down / run_id)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    status, out, err = run_cli("pareto", "--experiment", "fliqs-study", "--tracking-uri", server, "--json")
    assert status == 0, err
    printed = json.loads(out)
    assert set(printed) == {"uniform", "fliqs"}
    by_run = {c.info.run_id: c for c in children}
    for method, entry in printed.items():
        assert entry["front"], method
        for point in entry["front"]:
            child = by_run[point["run_id"]]
            assert child.data.tags["method"] == method
            assert point["accuracy"] == pytest.approx(child.data.metrics["test_accuracy"])
            assert point["gbops"] == pytest.approx(child.data.metrics["gbops"])
    # The artifact the study logged and what `fliqs pareto` prints are the same fronts.
    assert fronts["methods"] == printed
