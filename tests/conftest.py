"""Fixtures shared by the test modules (plain helpers live in tests/helpers.py)."""

from __future__ import annotations

import os

import pytest
import ray
import torch

from fliqs.data.datasets import load_digits
from fliqs.trainables.cluster import RAY_ENV

# What `fliqs.trainables.cluster.init_ray` gives a job, for every Ray instance a test starts (local instances and
# simulated clusters inherit this process's environment) and for the subprocesses tests start; no MLflow telemetry.
os.environ.update({**RAY_ENV, "MLFLOW_DISABLE_TELEMETRY": "true"})


@pytest.fixture(scope="module")
def one_thread():
    """Run a module with one intra-op thread, restoring the previous count afterwards.

    The tests' tensors are tiny: intra-op threads only add overhead (a lot of it on a busy 2-core machine).
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_tensors():
    """The embedded digits data (seed 0) as ``((x_train, y_train), (x_val, y_val))`` tensors."""
    splits = load_digits(seed=0)
    return splits.train.tensors, splits.val.tensors


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for a test module (starting one costs ~10 s on these machines). Without the dashboard
    (its ten processes cost ~2 CPU-seconds a start and more while they run): no test using this fixture reads Ray's
    state API; test_multinode.py, which does, starts its own cluster with one."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
