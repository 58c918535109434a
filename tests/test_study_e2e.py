"""End to end: a reduced baseline study on digits with real Ray Tune, Ray Train (in-process workers) and a
real MLflow SQLite store; then the study is rerun and must resume without redoing finished trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fliqs.config import load_config
from fliqs.trainables.study import run_study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

OVERRIDES = ["study.methods=[uniform,random,fliqs,edmips]", "study.uniform_formats=[int2,int8]",
             "study.target_fractions=[0.4]", "study.seeds=[0]", "multi_trial.trial_epochs=1",
             "multi_trial.budget=1.0", "multi_trial.retrain_epochs=1", "relaxed.retrain_epochs=1", "train.epochs=2",
             "train.num_workers=0", "train.log_every=5",
             "reward.beta=-0.5", "name=mini"]


def test_reduced_study_records_fronts_and_resumes(tmp_path):
    cfg = load_config([f"output_dir={tmp_path}", *OVERRIDES])
    summary = run_study(cfg)
    assert not summary["errors"]
    assert sorted(r["trial"] for r in summary["trials"]) == ["edmips_t0.4_s0", "fliqs_t0.4_s0", "random_t0.4_s0",
                                                             "uniform_int2_s0", "uniform_int8_s0"]
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
    client = MlflowClient(summary["tracking_uri"])
    found = Path(client.download_artifacts(random_run, "candidates.json", str(tmp_path)))
    candidates = json.loads(found.read_text())
    best = max(candidates, key=lambda c: c["reward"])
    searched = client.get_run(random_run).data.metrics["test_accuracy_before_retraining"]
    assert best["test_accuracy"] == pytest.approx(searched)
    assert all(0.0 < c["validation_accuracy"] <= 1.0 for c in candidates)

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["method"] for c in children} == methods == {"uniform", "random", "fliqs", "edmips"}
    assert {c.data.tags["family"] for c in children} == {"uniform", "multi-trial", "one-shot", "differentiable"}
    assert {c.data.tags["role"] for c in children} == {"trial"}
    assert sorted(c.data.tags.get("uniform_format", "") for c in children) == ["", "", "", "int2", "int8"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"fronts.json", "summary.csv", "methods.csv", "pareto.png"} <= artifacts
    note = parent.data.tags["mlflow.note.content"]  # the parent's page: per-method table and the plot itself
    assert "| fliqs | one-shot |" in note and f"path=pareto.png&run_uuid={parent.info.run_id}" in note
    assert any(k.startswith("hypervolume_") for k in parent.data.metrics)
    int8 = next(r for r in summary["trials"] if r["trial"] == "uniform_int8_s0")
    int2 = next(r for r in summary["trials"] if r["trial"] == "uniform_int2_s0")
    assert int8["gbops"] == pytest.approx(16 * int2["gbops"])  # 8x8 bits against 2x2 bits, same MACs

    # Rerunning the same study resumes it: no trial is trained again, no child run is added.
    before = {c.info.run_id for c in children}
    again = run_study(cfg)
    children_after = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children_after} == before
    assert sorted(r["mlflow_run_id"] for r in again["trials"]) == sorted(r["mlflow_run_id"] for r in summary["trials"])
    on_disk = json.loads((Path(tmp_path) / "study-mini" / "study.json").read_text())
    assert on_disk["parent_run_id"] == summary["parent_run_id"]


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
