"""The Ray instance a driver works in: connecting (or starting a local one) with fliqs' environment in every
process, Ray's driver-side log kept out of the terminal, what the cluster can hold, and stopping it."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from fliqs.errors import BadInput
from fliqs.run.config import FliqsConfig
from fliqs.run.inputs import ray_host_port
from fliqs.run.signals import rearm
from fliqs.trainables.ray_private import session_logs_dir

# Ray Train V2 hands each worker's reports to its controller through a queue of size 1 that the controller drains
# at every health check (default every 2 s): a run that reports (logs or checkpoints) more often than that waits at
# every report (benchmarks/RESULTS.md, issue 11). The controller's poll is a few small remote calls.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_USAGE_STATS_ENABLED": "0"}
DRIVER_LOG = "ray-driver.log"  # in output_dir/logs: what Ray logs in the driver process
RAY_CONNECT_TIMEOUT_S = 5.0


def init_ray(cfg: FliqsConfig) -> str | None:
    """Connect to ``ray_address`` or start a local instance, with `RAY_ENV` in every process of the job; returns
    one line saying where Ray's logs are (None when Ray was already initialised by the caller).

    The terminal shows fliqs' own lines only: Ray's processes keep their output in Ray's session log folder
    (``log_to_driver=False``: Ray Train's worker and controller lines, Tune's trials, library warnings), Ray's
    driver-side log goes to ``output_dir/logs/ray-driver.log``: errors are shown as well, notices are not (such as
    the one that a local instance runs with token authentication, Ray's default, which is kept).
    """
    import ray

    if ray.is_initialized():
        return None
    for key, value in RAY_ENV.items():  # a local instance's processes inherit the driver's environment
        os.environ.setdefault(key, value)
    check_ray_reachable(cfg.ray_address)
    driver_log = Path(cfg.output_dir).resolve() / "logs" / DRIVER_LOG
    _ray_driver_log(driver_log)
    try:
        ray.init(address=cfg.ray_address or "local", runtime_env={"env_vars": RAY_ENV}, log_to_driver=False)
    except ConnectionError as err:  # ray_address=auto without a cluster on this machine, a GCS that went away
        raise BadInput(f"ray_address={cfg.ray_address!r}: {str(err).strip().splitlines()[0]}") from None
    rearm()  # Ray replaced the driver's SIGTERM handler
    return f"Ray logs: {session_logs_dir()} (workers: worker-*.out/.err, Ray Train: train/), driver: {driver_log}"


def check_ray_reachable(address: str | None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """BadInput within seconds when nothing answers at ``ray_address`` (``ray.init`` would retry for minutes)."""
    where = ray_host_port(address) if address else None
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=timeout_s).close()
    except OSError as err:
        raise BadInput(f"ray_address={address!r}: nothing answers at {where[0]}:{where[1]} "
                       f"({err.strerror or err}); start the head with `ray start --head` or fix the address") \
            from None


def _ray_driver_log(path: Path) -> None:
    """Ray's loggers in this process write to ``path``; the terminal gets their errors only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ray_logger = logging.getLogger("ray")
    if any(getattr(h, "baseFilename", None) == str(path) for h in ray_logger.handlers):
        return
    for handler in ray_logger.handlers:
        handler.setLevel(logging.ERROR)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger.addHandler(handler)


def check_workers(cfg: FliqsConfig) -> None:
    """BadInput unless the Ray cluster can hold ``train.num_workers`` workers (CPUs, GPUs when asked)."""
    import ray

    resources = ray.cluster_resources()
    need = {"CPU": cfg.train.num_workers, **({"GPU": cfg.train.num_workers} if cfg.train.use_gpu else {})}
    for key, n in need.items():
        if resources.get(key, 0) < n:
            raise BadInput(f"train.num_workers={cfg.train.num_workers} needs {n} {key}s; the Ray cluster has "
                           f"{resources.get(key, 0):g}")


def stop_ray() -> None:
    """Shut down the Ray connection of this process, if it made one (a local instance's workers go with it)."""
    ray = sys.modules.get("ray")  # never imported for it: a run that did not start Ray has nothing to stop
    if ray is not None and ray.is_initialized():
        ray.shutdown()
