"""End to end: a reduced baseline study on digits with real Ray Tune, Ray Train (in-process workers) and a
real MLflow SQLite store; then the study is rerun and must resume without redoing finished trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fliqs.config import load_config
from fliqs.trainables.study import run_study, trial_grid

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

OVERRIDES = ["study.methods=[uniform,random,fliqs,edmips]", "study.uniform_formats=[int2,int8]",
             "study.target_fractions=[0.4]", "study.seeds=[0]", "multi_trial.trial_epochs=1",
             "multi_trial.budget=1.0", "train.epochs=2", "train.num_workers=0", "train.log_every=5",
             "reward.beta=-0.5", "name=mini"]


def test_grid_has_one_trial_per_method_target_seed():
    cfg = load_config(["study.methods=[uniform,fliqs,random]", "study.uniform_formats=[]",
                       "study.target_fractions=[0.3,0.5]", "study.seeds=[0,1]"], study=True)
    grid = trial_grid(cfg)
    uniform = [t for t in grid if t["method"] == "uniform"]
    assert len(uniform) == 2 * (len(cfg.space.candidates) + 1)  # every candidate plus bf16, per seed
    assert {t["quant"]["uniform_format"] for t in uniform} == {*cfg.space.candidates, "bf16"}
    fliqs = [t for t in grid if t["method"] == "fliqs"]
    assert sorted((t["seed"], t["reward"]["target_fraction"]) for t in fliqs) == [(0, 0.3), (0, 0.5), (1, 0.3),
                                                                                   (1, 0.5)]
    # Every trial is a config override a `fliqs search` would accept as it is.
    for trial in grid:
        merged = OmegaConf.merge(cfg, trial)
        assert load_config([f"method={merged.method}", f"seed={merged.seed}",
                            *([f"quant.uniform_format={merged.quant.uniform_format}"]
                              if merged.quant.uniform_format else [])]).method == trial["method"]


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
    assert random_row["epochs"] == pytest.approx(2.0)  # budget 1.0 x train.epochs, in 1-epoch candidates
    # The multi-trial search picks its result on validation accuracy; the reported test accuracy is that pick's.
    random_run = random_row["mlflow_run_id"]
    found = Path(MlflowClient(summary["tracking_uri"]).download_artifacts(random_run, "candidates.json", str(tmp_path)))
    candidates = json.loads(found.read_text())
    best = max(candidates, key=lambda c: c["reward"])
    assert best["test_accuracy"] == pytest.approx(random_row["test_accuracy"])
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
