"""End to end: a reduced baseline study on digits with real Ray Tune, in-process training workers and a real MLflow
SQLite store. It first runs as its own `fliqs study` process tree, killed (SIGKILL, Ray included) as soon as one
trial has finished; the rerun must resume it without redoing finished trials, and a rerun of the finished study must
add nothing. The CIFAR-10 cluster study runs on a tiny CIFAR-10 folder, and a sensitivity study shares one scoring
between its concurrent trials. One Ray session for the module."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli, wait_for
from mlflow.tracking import MlflowClient

from fliqs.run import schema
from fliqs.run.loading import load_config
from fliqs.trainables.study import print_study, run_study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

# Trials run two at a time in grid order: the two uniform trials first, then random, fliqs and edmips.
OVERRIDES = ["study.methods=[uniform,random,fliqs,edmips]", "study.uniform_formats=[int2,int8]",
             "study.target_fractions=[0.4]", "study.seeds=[0]", "model=fliqs_cnn", "multi_trial.trial_epochs=1",
             "multi_trial.budget=1.0", "multi_trial.retrain_epochs=1", "relaxed.retrain_epochs=1", "train.epochs=2",
             "train.num_workers=0", "train.log_every=5", "reward.beta=-0.5", "name=mini"]
TRIALS = ["edmips_t0.4_s0", "fliqs_t0.4_s0", "random_t0.4_s0", "uniform_int2_s0", "uniform_int8_s0"]


def _finished_trials(db: Path) -> list[tuple[str]]:
    """The finished trial runs, by a read-only query of the store: milliseconds, so a kill lands within a poll of
    the first finished trial, and the test never initialises the store while the driver does. (A test-side coupling
    to MLflow's SQLite schema: an MlflowClient per poll was too slow to catch the first trial.)"""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE t.key = ? AND t.value = ? AND r.status = 'FINISHED'",
                               (schema.ROLE, schema.TRIAL)).fetchall()
    except sqlite3.OperationalError:  # the driver is still creating the schema
        return []


def test_a_killed_study_resumes_records_fronts_and_reruns_as_a_no_op(tmp_path, capsys):
    overrides = [f"output_dir={tmp_path}", *OVERRIDES]
    db = tmp_path / "mlflow.db"
    with (tmp_path / "driver.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fliqs.cli", "study", *overrides],
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _finished_trials(db), timeout=300, every=0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole process tree (its local Ray included)
        proc.wait(timeout=60)
    client = MlflowClient(f"sqlite:///{db}")
    done_before = [run_id for run_id, in _finished_trials(db)]
    assert 1 <= len(done_before) < len(TRIALS), "killed before the study ended"
    logged = {run_id: len(client.get_metric_history(run_id, "train_loss")) for run_id in done_before}

    # The rerun in this process (the module's Ray instance): what is tested is the state the killed driver left.
    cfg = load_config(overrides, study=True)
    summary = run_study(cfg)
    assert not summary["errors"]
    assert sorted(r["trial"] for r in summary["trials"]) == TRIALS
    for run_id in done_before:
        assert len(client.get_metric_history(run_id, "train_loss")) == logged[run_id], \
            "a trial finished before the kill must not be trained again"

    methods = {r["method"] for r in summary["trials"]}
    for row in summary["trials"]:
        assert 0.0 < row["test_accuracy"] <= 1.0 and row["gbops"] > 0
        assert row["epochs"] >= 1 and row["worker_s"] > 0 and row["peak_memory_mb"] > 0
    random_row = next(r for r in summary["trials"] if r["method"] == "random")
    # budget 1.0 x train.epochs in 1-epoch candidates, plus the 1-epoch retraining of the pick
    assert random_row["epochs"] == pytest.approx(3.0)
    # The multi-trial search picks its result on validation accuracy, then retrains it; the candidate's own test
    # accuracy is reported apart.
    random_run = random_row["mlflow_run_id"]
    found = Path(client.download_artifacts(random_run, "candidates.json", str(tmp_path)))
    candidates = json.loads(found.read_text())
    (picked,) = [c for c in candidates if c.get("picked")]  # the most accurate on validation within the target
    assert picked["within_budget"]
    assert picked["validation_accuracy"] == max(c["validation_accuracy"] for c in candidates if c["within_budget"])
    searched = client.get_run(random_run).data.metrics["test_accuracy_before_retraining"]
    assert picked["test_accuracy"] == pytest.approx(searched)
    assert all(0.0 < c["validation_accuracy"] <= 1.0 for c in candidates)

    parent = client.get_run(summary["parent_run_id"])
    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["method"] for c in children} == methods == {"uniform", "random", "fliqs", "edmips"}
    assert {c.data.tags["family"] for c in children} == {"uniform", "multi-trial", "one-shot", "differentiable"}
    assert {c.data.tags["role"] for c in children} == {"trial"}
    assert len(children) == len(TRIALS), "one child run per trial, none twice"
    assert sorted(c.data.tags.get("uniform_format", "") for c in children) == ["", "", "", "int2", "int8"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"fronts.json", "summary.csv", "methods.csv", "pareto.png"} <= artifacts
    note = parent.data.tags["mlflow.note.content"]  # the parent's page: per-method table and the plot itself
    assert "| fliqs | one-shot |" in note and f"path=pareto.png&run_uuid={parent.info.run_id}" in note
    assert "**Accuracy at budget**" in note  # the methods compared at each target's budget
    at_budget = summary["accuracy_at_budget"]
    assert [b["fraction"] for b in at_budget["budgets"]] == sorted(cfg.study.target_fractions)
    fliqs_landed = at_budget["methods"]["fliqs"]["landed_cost_ratio"]
    assert fliqs_landed and all(entry["max"] <= 1.0 for entry in fliqs_landed)  # FLIQS keeps to its budgets
    assert any(k.startswith("hypervolume_") for k in parent.data.metrics)
    int8 = next(r for r in summary["trials"] if r["trial"] == "uniform_int8_s0")
    int2 = next(r for r in summary["trials"] if r["trial"] == "uniform_int2_s0")
    assert int8["gbops"] == pytest.approx(16 * int2["gbops"])  # 8x8 bits against 2x2 bits, same MACs

    # Rerunning the finished study trains nothing and adds no child run.
    before = {c.info.run_id for c in children}
    again = run_study(cfg)
    children_after = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children_after} == before
    assert sorted(r["mlflow_run_id"] for r in again["trials"]) == sorted(r["mlflow_run_id"] for r in summary["trials"])
    on_disk = json.loads((Path(tmp_path) / "study-mini" / "study.json").read_text())
    assert on_disk["parent_run_id"] == summary["parent_run_id"]

    # The command the study prints to see its fronts again runs as written.
    print_study(again)
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Fronts again: fliqs pareto ")]
    status, fronts, err = run_cli(*shlex.split(line.split(": ", 1)[1])[1:])
    assert status == 0 and "fliqs (one-shot)" in fronts, err


def test_the_cluster_cifar10_study_runs_on_a_tiny_cifar10_folder(tmp_path):
    """conf/study/cifar10_resnet18.yaml as it is (ResNet-18 at 32 px, the CIFAR-10 loader), shrunk to one trial on a
    CIFAR-10-format folder of 40 images: the config, the data path and the model work together."""
    from helpers import write_tiny_cifar10

    root = write_tiny_cifar10(tmp_path / "cifar", per_batch=8)
    cfg = load_config([f"output_dir={tmp_path / 'out'}", "study=cifar10_resnet18", f"data.path={root}",
                       "study.methods=[uniform]", "study.uniform_formats=[int8]", "study.seeds=[0]",
                       "study.max_concurrent_trials=1", "train.epochs=1", "train.num_workers=0",
                       "train.use_gpu=false", "data.batch_size=8", "data.loader_workers=0",
                       "train.bn_recalibration_batches=1"], study=True)
    summary = run_study(cfg)
    assert not summary["errors"] and [r["trial"] for r in summary["trials"]] == ["uniform_int8_s0"]
    # ResNet-18 with the CIFAR stem at 32 px, by hand: stem 32x32x64x27 + stage 1 4 x 32x32x64x576 + stage 2
    # 16x16x128x(576 + 3x1152) + 16x16x128x64 (projection) + stage 3 8x8x256x(1152 + 3x2304) + 8x8x256x128 +
    # stage 4 4x4x512x(2304 + 3x4608) + 4x4x512x256 + fc 512x10 = 556.5 M MACs; x 64 bits (int8 x int8)
    macs = (32 * 32 * 64 * 27 + 4 * 32 * 32 * 64 * 576 + 16 * 16 * 128 * (576 + 3 * 1152 + 64)
            + 8 * 8 * 256 * (1152 + 3 * 2304 + 128) + 4 * 4 * 512 * (2304 + 3 * 4608 + 256) + 512 * 10)
    assert summary["trials"][0]["gbops"] == pytest.approx(macs * 64 / 1e9, rel=1e-6)


def test_a_sensitivity_study_scores_once_for_concurrent_targets(tmp_path):
    """The sensitivity method at two targets, as two concurrent trials (two processes): one pre-training and one
    scoring serve both (the locked cache of `fliqs.trainables.sensitivity`), each trial solves its own program."""
    from helpers import SENSITIVITY_FAST, SENSITIVITY_METHOD

    from fliqs.searchers import methods
    from fliqs.trainables import sensitivity as runner

    cfg = load_config([f"output_dir={tmp_path}", "study.name=hs", f"study.methods=[{SENSITIVITY_METHOD}]",
                       "study.target_fractions=[0.3,0.45]", "study.max_concurrent_trials=2",
                       "study.cpus_per_trial=0.6", "train.num_workers=0", *SENSITIVITY_FAST])
    summary = run_study(cfg)
    assert summary["errors"] == [] and len(summary["trials"]) == 2
    assert all(r["epochs"] == 2 and r["family"] == methods.SENSITIVITY for r in summary["trials"])
    client = MlflowClient(summary["tracking_uri"])
    trials = [client.get_run(r["mlflow_run_id"]) for r in summary["trials"]]
    assert sorted(t.data.metrics[schema.SCORING_REUSED] for t in trials) == [0, 1]
    assert len({t.data.tags[schema.SCORING_RUN] for t in trials}) == 1
    exp = trials[0].info.experiment_id
    phases = [r.info.run_name.rsplit("/", 1)[-1] for t in trials
              for r in client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{t.info.run_id}'")]
    assert phases.count("pretrain") == 1, "one pre-training for both targets"
    assert len([p for p in (tmp_path / "ray" / "train" / runner.CACHE).iterdir() if p.is_dir()]) == 1
