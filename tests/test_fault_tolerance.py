"""Nothing lost: a training worker killed by a real signal, a study driver killed mid-study.

Real Ray (a local instance for the module; the study runs as its own `fliqs study` process tree), real
MLflow SQLite stores, real digits data.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import ray
import torch
from helpers import wait_for
from mlflow.tracking import MlflowClient

from fliqs import schema
from fliqs.config import load_config
from fliqs.trainables.loop import CHECKPOINT_FILE, state_digest
from fliqs.trainables.search import run_search
from fliqs.trainables.study import run_study

pytestmark = pytest.mark.slow
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    # This module's Ray instance, by address: other local Ray instances may exist on a shared machine.
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_killed_worker_resumes_from_checkpoint_into_the_same_run(tmp_path, ray_session):
    every = 10
    cfg = load_config([f"output_dir={tmp_path}", "name=kill", "train.num_workers=2", "train.epochs=20",
                       f"train.checkpoint_every={every}", "train.log_every=5", "train.max_failures=1",
                       "reward.beta=-0.5"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(result=run_search(cfg)), daemon=True)
    driver.start()

    seen: dict[int, float] = {}

    def past_first_checkpoint():
        # A checkpoint counts once Ray Train's controller has registered it. Workers report at a barrier, but the
        # controller collects reports by polling (every 0.25 s, fit.RAY_ENV): give the oldest checkpoint a second.
        for p in (tmp_path / "ray" / "kill").glob("checkpoint_00000*"):
            seen.setdefault(int(p.name.split("_")[1]), time.monotonic())
        return seen and time.monotonic() - min(seen.values()) > 1 and _train_worker_pids()

    pids = wait_for(past_first_checkpoint, timeout=240)
    latest_at_kill = max(int(p.name.split("_")[1]) for p in (tmp_path / "ray" / "kill").glob("checkpoint_00000*"))
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("fliqs").experiment_id])[0].info.run_id
    logged_at_kill = max(m.step for m in client.get_metric_history(run_id, "train_loss"))
    os.kill(pids[-1], signal.SIGKILL)  # a real signal to a real Ray Train worker process
    driver.join(timeout=400)
    assert not driver.is_alive() and "result" in outcome, "the search must finish after the restart"
    result = outcome["result"]

    runs = client.search_runs([client.get_experiment_by_name("fliqs").experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]], "one MLflow run, continued"
    run = client.get_run(result["mlflow_run_id"])
    resumes = {k: v for k, v in run.data.tags.items() if k.startswith("fliqs.resume.")}
    assert len(resumes) == 1, resumes
    (tag, digest), = resumes.items()
    resumed_step = int(tag.split(".")[2])
    # From a registered checkpoint: at least the first, at most the newest folder at the kill.
    assert resumed_step % every == 0 and min(seen) <= resumed_step <= latest_at_kill
    # The controller state after the restore is bit-identical to the checkpointed one. Ray keeps the two newest
    # checkpoints and the final one, so read the restored checkpoint's state if it is still on disk.
    ckpt = tmp_path / "ray" / "kill" / f"checkpoint_{resumed_step:07d}" / CHECKPOINT_FILE
    if ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state_digest(saved["method_state"]) == digest

    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    total = result["steps"]
    expected = sorted(set(range(5, total + 1, 5)) | {total})
    assert sorted(set(steps)) == expected, "no logged step may be missing"
    replayed = {s for s in steps if steps.count(s) > 1}
    # Only what was logged between the restored checkpoint and the kill is logged again. (Ray Train registers a
    # reported checkpoint when its controller next polls the workers, so the restored one can be older than the
    # newest checkpoint folder.)
    # On a loaded machine the kill can land before anything past the restored checkpoint was logged: then nothing is
    # replayed, which is right too.
    assert all(resumed_step < s <= logged_at_kill + 5 for s in replayed), (replayed, resumed_step)
    assert replayed or logged_at_kill <= resumed_step, (replayed, resumed_step, logged_at_kill)
    assert all(steps.count(s) == 2 for s in replayed)
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 1, "final result logged once"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"assignment.json", "policy_probs.png"}
    # Data parallelism: every replica's controller ended identical, and the policy has converged.
    assert result["controller_divergence"] == 0.0 and result["num_workers"] == 2
    assert result["final_entropy"] < 1.0  # uniform over 9 formats is log 9 = 2.2
    assert (tmp_path / "ray" / "kill" / "checkpoint_final").is_dir()


def test_killed_study_driver_resumes_without_redoing_finished_trials(tmp_path, ray_session):
    formats = ["int8", "int4", "fp8_e4m3"]
    overrides = [f"output_dir={tmp_path}", "name=killed", "study.methods=[uniform]",
                 f"study.uniform_formats=[{','.join(formats)}]", "study.seeds=[0]", "model=fliqs_cnn",
                 "train.epochs=1", "train.num_workers=0"]
    command = [sys.executable, "-m", "fliqs.cli", "study", *overrides]
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"

    def finished_children() -> list:
        # A read-only query of the store: milliseconds, so the kill lands within a poll of the first finished trial,
        # before the third (two run at a time) is done. Read-only: the test never initialises the store while the
        # driver does.
        if not db.exists():
            return []
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return con.execute("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                   "WHERE t.key = ? AND t.value = 'uniform' AND r.status = 'FINISHED'",
                                   (schema.FAMILY,)).fetchall()
        except sqlite3.OperationalError:  # the driver is still creating the schema
            return []

    with (tmp_path / "driver.log").open("w") as out:
        proc = subprocess.Popen(command, env=ENV, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(finished_children, timeout=300, every=0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole process tree (Ray included)
        proc.wait(timeout=60)
    client = MlflowClient(uri)
    done_before = {run_id: client.get_run(run_id).data.tags[schema.UNIFORM_FORMAT]
                   for run_id, in finished_children()}
    assert 1 <= len(done_before) < len(formats), "killed before the study ended"
    logged = {run_id: len(client.get_metric_history(run_id, "train_loss")) for run_id in done_before}

    # The rerun in this process (the module's Ray instance): what is tested is the state the killed driver left.
    assert not run_study(load_config(overrides, study=True))["errors"]
    exp = client.get_experiment_by_name("fliqs").experiment_id
    children = client.search_runs([exp], f"tags.{schema.FAMILY} = 'uniform'")
    assert sorted(r.data.tags[schema.UNIFORM_FORMAT] for r in children) == sorted(formats), \
        "one run per trial, none twice"
    for run_id, method in done_before.items():
        history = client.get_metric_history(run_id, "train_loss")
        assert len(history) == logged[run_id], f"{method} finished before the kill and must not be trained again"
