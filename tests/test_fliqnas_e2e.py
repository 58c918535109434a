"""End to end: FLIQNAS (joint architecture and format search) on digits, real Ray and a real MLflow store.

One Ray session for the module. The search runs with two Ray Train workers (DDP over a supernet whose sampled
path leaves parameters unused); the study runs FLIQNAS against its two baselines in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import bad_search_input, run_cli
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from fliqs.data.datasets import load_data
from fliqs.models.supernet import InvertedResidual, SearchableBlock
from fliqs.run.config import DEFAULT_EXPERIMENT
from fliqs.run.loading import load_config
from fliqs.trainables.saved import load_model
from fliqs.trainables.search import run_search
from fliqs.trainables.study import run_study
from fliqs.training.evaluation import accuracy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

# A third of digits for training, in batches of 128: few, larger steps (a step of the supernet on a CPU is
# dominated by per-op overheads). These tests check the machinery, not the accuracy a full search reaches.
COMMON = ["model=fliqnas_digits", "space=int_fp_4to8", "reward.beta=-0.5", "reward.target_fraction=0.6",
          "data.batch_size=128", "data.val_fraction=0.3", "data.test_fraction=0.35", "train.log_every=2",
          "train.bn_recalibration_batches=2"]


def test_two_worker_joint_search_extracts_a_standalone_network(tmp_path):
    # EMA-calibrated activation ranges: evaluation does not depend on how the test set is batched or sharded.
    cfg = load_config([f"output_dir={tmp_path}", "name=nas", "method=fliqnas", "train.epochs=2",
                       "train.num_workers=2", "quant.act_range=ema", *COMMON])
    result = run_search(cfg)
    assert result["method"] == "fliqnas" and result["controller_divergence"] == 0.0
    arch = result["architecture"].split(",")
    assert len(arch) == 6 and all(a == "skip" or a[0] == "k" for a in arch)
    arch_decisions = [d for d in result["decisions"] if d["decision"].endswith((":kernel", ":expansion"))]
    assert len(arch_decisions) == 12
    assert 0.0 < result["accuracy"] <= 1.0

    client = MlflowClient(result["mlflow_tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "fliqnas"
    assert run.data.params["method"] == "fliqnas"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"architecture.json", "model.pt", "assignment.json", "policy_probs.png"} <= artifacts
    folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    info = json.loads((folder / "architecture.json").read_text())
    assert info["architecture"] == result["architecture"]

    # The saved model alone rebuilds the network the search reported on: same formats, same test accuracy.
    saved = load_model(folder / "model.pt")
    model, layers = saved.network.model, saved.network.layers
    assert not any(isinstance(m, SearchableBlock) for m in model.modules())
    assert sum(isinstance(m, InvertedResidual) for m in model.modules()) == 7 - arch.count("skip")
    assert {q.name: {"w": q.w_format.name, "a": q.a_format.name} for q in layers} == result["assignment"]
    splits = load_data("digits", None, None, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
    correct = sum(accuracy(model, x, y) * len(y) for x, y in DataLoader(splits.test, batch_size=256))
    assert correct / len(splits.test) == pytest.approx(result["accuracy"], abs=1e-9)
    assert torch.equal(torch.tensor(result["gbops"]), torch.tensor(run.data.metrics["gbops"]))
    status, out, err = run_cli("evaluate", "nas", f"output_dir={tmp_path}", "--json")
    assert status == 0, err
    assert json.loads(out)["accuracy"] == result["accuracy"]


def test_study_runs_fliqnas_against_fixed_and_sequential_baselines(tmp_path):
    cfg = load_config([f"output_dir={tmp_path}", "study.name=nas", "study.methods=[fliqs,fliqnas,sequential]",
                       # one trial at a time, in one reused process: a supernet trial after a fixed-network one
                       "study.target_fractions=[0.6]", "study.max_concurrent_trials=1",
                       "train.epochs=2", "train.num_workers=0", *COMMON])
    summary = run_study(cfg)
    assert summary["errors"] == []
    rows = {r["method"]: r for r in summary["trials"]}
    assert set(rows) == {"fliqs", "fliqnas", "sequential"}
    for row in rows.values():  # equal budget: two epochs each (sequential: one per phase)
        assert row["epochs"] == 2 and row["family"] == "one-shot"

    client = MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    sequential = by_name["nas/sequential_t0.6_s0"]
    phases = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sequential.info.run_id]
    assert sorted(r.data.tags["role"] for r in phases) == ["phase", "phase"]
    arch_phase = next(r for r in phases if r.info.run_name.endswith("/architecture"))
    format_phase = next(r for r in phases if r.info.run_name.endswith("/formats"))
    # Phase 1 searched the architecture at full precision; phase 2 searched formats on the architecture found.
    assert json.loads(arch_phase.data.params["quant.pinned"]) == {"*": "fp32"}
    found = json.loads(Path(client.download_artifacts(arch_phase.info.run_id, "architecture.json",
                                                      str(tmp_path / "a"))).read_text())["architecture"]
    assert format_phase.data.params["model.kwargs.arch"] == found == sequential.data.tags["architecture"]
    assert "architecture" in by_name["nas/fliqnas_t0.6_s0"].data.tags
    assert "architecture" not in by_name["nas/fliqs_t0.6_s0"].data.tags  # the fixed MobileNetV2


def test_bad_fliqnas_input_exits_2_before_any_work(tmp_path):
    # One subprocess (the exit path is shared); bad architectures and kwargs: test_supernet.py, test_config.py.
    assert "is not one" in bad_search_input(tmp_path, "method=fliqnas", "model=fliqs_cnn")
