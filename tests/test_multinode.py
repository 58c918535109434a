"""Multi-node: a simulated two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, 1 CPU per node).

A 2-worker search must place its two Ray Train workers on different nodes (checked through Ray's state API:
the `RayTrainWorker` actors of the run, alive or dead, and their node ids) and still finish with identical
controllers, `result.json` and a complete MLflow run. Asking for more workers than the cluster holds fails at
once with BadInput naming the CPUs, instead of waiting forever for resources.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import ray
from helpers import run_cli
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from fliqs.config import load_config
from fliqs.errors import BadInput
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


def _train_workers(cluster: Cluster) -> dict[str, str]:
    """{actor id: node id} of every Ray Train worker actor the cluster has seen (alive or dead)."""
    actors = list_actors(address=cluster.address, filters=[("class_name", "=", WORKER_CLASS)], detail=True,
                         limit=1000, raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors}


def _search(tmp_path: Path, name: str, *overrides: str) -> dict:
    cfg = load_config([f"output_dir={tmp_path}", f"name={name}", "reward.target_fraction=0.4", "reward.beta=-0.5",
                       "train.log_every=5", *overrides])
    return run_search(cfg)


def test_two_workers_run_on_two_nodes(cluster, tmp_path):
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and ray.cluster_resources()["CPU"] == 2
    before = _train_workers(cluster)

    result = _search(tmp_path, "two-nodes", "train.num_workers=2", "train.epochs=2")

    workers = {a: n for a, n in _train_workers(cluster).items() if a not in before}
    assert len(workers) == 2, f"expected the run's 2 Ray Train workers, found {workers}"
    assert set(workers.values()) == nodes, "the two workers must run on the two different nodes"

    assert result["num_workers"] == 2
    assert result["controller_divergence"] == 0.0
    on_disk = json.loads(Path(result["result_path"]).read_text())
    assert on_disk["mlflow_run_id"] == result["mlflow_run_id"] and 0.0 < on_disk["accuracy"] <= 1.0
    assert set(on_disk["assignment"]) == {"features.0", "features.3", "features.6", "head"}

    client = MlflowClient(result["mlflow_tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    for key in ("train_loss", "test_accuracy", "gbops", "final_entropy", "controller_divergence", "search_wall_s"):
        assert key in run.data.metrics, key
    assert run.data.metrics["controller_divergence"] == 0.0
    total = result["steps"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == sorted(set(list(range(5, total + 1, 5)) + [total])), "rank 0 logs every step once"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"assignment.json", "policy_probs.png", "result.json", "model.pt"} <= artifacts
    # Reported is saved: the model of the two replicas, rebuilt in this process, gives exactly the reported number
    # (default config: BatchNorm, activation ranges of each batch, the test split sharded over the two ranks).
    status, out, err = run_cli("evaluate", "two-nodes", f"output_dir={tmp_path}", "--json")
    assert status == 0, err
    assert json.loads(out)["accuracy"] == result["accuracy"]


def test_more_workers_than_the_cluster_holds_fails_at_once(cluster, tmp_path):
    with pytest.raises(BadInput, match="train.num_workers=5 needs 5 CPUs; the Ray cluster has 2"):
        _search(tmp_path, "too-many", "train.num_workers=5", "train.epochs=1")
    assert not (tmp_path / "too-many").exists() and not (tmp_path / "ray").exists(), "no work may have started"
