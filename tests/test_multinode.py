"""Multi-node and fault tolerance: a simulated two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`,
1 CPU per node), a real MLflow SQLite store, real digits data.

A 2-worker search must place its two Ray Train workers on different nodes (checked through Ray's state API: the
`RayTrainWorker` actors of the run and their node ids). The worker on the second node is then killed by a real
signal after the first checkpoint: the run must resume from a registered checkpoint into the same MLflow run, lose
no logged step, and finish with identical controllers, `result.json` and a saved model that reproduces the reported
accuracy. Asking for more workers than the cluster holds fails at once with BadInput naming the CPUs, instead of
waiting forever for resources. (The study driver killed mid-study: test_study_e2e.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from helpers import run_cli, wait_for
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from fliqs.errors import BadInput
from fliqs.run import schema
from fliqs.run.config import DEFAULT_EXPERIMENT
from fliqs.run.loading import load_config
from fliqs.trainables.checkpoints import CHECKPOINT_FILE, state_digest
from fliqs.trainables.search import run_search

pytestmark = pytest.mark.slow

WORKER_CLASS = "RayTrainWorker"


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each, all on this machine; the driver connects to the head."""
    # The state API needs the head's dashboard: on a free port (another Ray instance may hold the default 8265).
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": _free_port()})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_workers(cluster: Cluster, alive: bool = False) -> dict[str, tuple[str, int]]:
    """{actor id: (node id, pid)} of the Ray Train worker actors the cluster has seen (alive or dead; or alive)."""
    filters = [("class_name", "=", WORKER_CLASS), *([("state", "=", "ALIVE")] if alive else [])]
    actors = list_actors(address=cluster.address, filters=filters, detail=True, limit=1000,
                         raise_on_missing_output=False)
    return {a.actor_id: (a.node_id, a.pid) for a in actors}


def _search(tmp_path: Path, name: str, *overrides: str) -> dict:
    cfg = load_config([f"output_dir={tmp_path}", f"name={name}", "reward.target_fraction=0.4", "reward.beta=-0.5",
                       "train.log_every=5", *overrides])
    return run_search(cfg)


def test_a_worker_killed_on_the_second_node_resumes_into_the_same_run(cluster, tmp_path):
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and ray.cluster_resources()["CPU"] == 2
    head = cluster.head_node.node_id
    before = set(_train_workers(cluster))
    every = 10
    # The block-scaled space (NVFP4, MXFP4/6/8 beside FP8 and INT8): a search over it runs data-parallel, resumes and
    # exports like any other.
    cfg = load_config([f"output_dir={tmp_path}", "name=kill", "train.num_workers=2", "train.epochs=20",
                       f"train.checkpoint_every={every}", "train.log_every=5", "train.max_failures=1",
                       "reward.beta=-0.5", "space=mx"])
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
        alive = _train_workers(cluster, alive=True)
        return seen and time.monotonic() - min(seen.values()) > 1 and len(alive) == 2 and alive

    alive = wait_for(past_first_checkpoint, timeout=240)
    assert {node for node, _ in alive.values()} == nodes, "the two workers must run on the two different nodes"
    latest_at_kill = max(int(p.name.split("_")[1]) for p in (tmp_path / "ray" / "kill").glob("checkpoint_00000*"))
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id])[0].info.run_id
    logged_at_kill = max(m.step for m in client.get_metric_history(run_id, "train_loss"))
    pid = next(pid for node, pid in alive.values() if node != head)
    os.kill(pid, signal.SIGKILL)  # a real signal to the Ray Train worker process of the second node
    driver.join(timeout=400)
    assert not driver.is_alive() and "result" in outcome, "the search must finish after the restart"
    result = outcome["result"]
    workers = {a: w for a, w in _train_workers(cluster).items() if a not in before}
    assert len(workers) == 4 and sorted(node for node, _ in workers.values()) == sorted([*nodes, *nodes]), \
        "the restarted worker group is placed on the two nodes again"

    runs = client.search_runs([client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]], "one MLflow run, continued"
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.num_workers"] == "2"
    resumes = {k: v for k, v in run.data.tags.items() if k.startswith(schema.RESUME_PREFIX)}
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
    for key in ("train_loss", "test_accuracy", "gbops", "final_entropy", "controller_divergence", "search_wall_s"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 1, "final result logged once"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"assignment.json", "policy_probs.png", "result.json", "model.pt"} <= artifacts
    # Data parallelism: every replica's controller ended identical, and the policy has converged.
    assert result["controller_divergence"] == 0.0 and result["num_workers"] == 2
    assert result["final_entropy"] < 1.0  # uniform over 6 formats is log 6 = 1.8
    assert (tmp_path / "ray" / "kill" / "checkpoint_final").is_dir()
    on_disk = json.loads(Path(result["result_path"]).read_text())
    assert on_disk["mlflow_run_id"] == result["mlflow_run_id"] and 0.0 < on_disk["accuracy"] <= 1.0
    assert set(on_disk["assignment"]) == {"features.0", "features.3", "features.6", "head"}
    assert {f["w"] for f in on_disk["assignment"].values()} <= set(cfg.space.candidates)
    # Reported is saved: the model of the two replicas, rebuilt in this process, gives exactly the reported number
    # (default config: BatchNorm, calibrated activation ranges, the test split sharded over the two ranks).
    status, out, err = run_cli("evaluate", "kill", f"output_dir={tmp_path}", "--json")
    assert status == 0, err
    assert json.loads(out)["accuracy"] == result["accuracy"]
    status, out, err = run_cli("export", "kill", f"output_dir={tmp_path}", "--to", str(tmp_path / "export"), "--onnx")
    assert status == 0, err
    assert (tmp_path / "export" / "model.onnx").stat().st_size > 0


def test_more_workers_than_the_cluster_holds_fails_at_once(cluster, tmp_path):
    with pytest.raises(BadInput, match="train.num_workers=5 needs 5 CPUs; the Ray cluster has 2"):
        _search(tmp_path, "too-many", "train.num_workers=5", "train.epochs=1")
    assert not (tmp_path / "too-many").exists() and not (tmp_path / "ray").exists(), "no work may have started"
