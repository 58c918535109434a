"""Fitting training runs: one Ray Train job (or the same loop in-process) logging into an MLflow run.

A method's *runner* (`fliqs.searchers.methods`) drives one run of the method at one cost target; it gets a
`RunContext` and fits one or more training runs through `fit` (`train_once` is the runner of every method trained
once). Failures inside a worker keep their type through Ray Train (`WorkerGroupError.worker_failures`): bad input
found there (a diverging loss, a foreign checkpoint) surfaces as the same one-line `BadInput` as in-process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fliqs import schema
from fliqs.errors import BadInput
from fliqs.inputs import ray_host_port
from fliqs.searchers import methods
from fliqs.signals import rearm
from fliqs.tracking import client, end_status, start_run
from fliqs.trainables.loop import KEEP_CHECKPOINTS, NonFiniteLoss, run_in_process, train_func_per_worker


@dataclass(frozen=True)
class RunContext:
    """Where one run of a method logs and checkpoints, and the cost target it aims at."""

    uri: str  # MLflow tracking URI
    experiment_id: str
    run_id: str  # the MLflow run this method run logs into
    run_name: str  # its MLflow name (nested runs are "<run_name>/<label>")
    name: str  # Ray Train run name: checkpoints live in storage / name; reusing it resumes
    storage: Path
    target: float


def fit(cfg: DictConfig, ctx: RunContext, worker: str, **args) -> dict:
    """Fit one training run of ``worker`` (a `fliqs.trainables.loop.TrainMethod`); returns its final metrics.

    A Ray Train ``TorchTrainer`` with ``train.num_workers`` workers; reusing ``(storage, name)`` resumes from the
    latest checkpoint. ``num_workers=0`` runs the same loop in this process, with the same checkpoint folders
    under ``storage / name`` (Ray Train's own local mode keeps no checkpoints, and its API is unavailable inside
    a Ray Tune trial).
    """
    config = {"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "worker": worker,
              "run_id": ctx.run_id, "tracking_uri": ctx.uri, "target": ctx.target, "args": args}
    try:
        if cfg.train.num_workers == 0:
            return run_in_process(config, ctx.storage / ctx.name)
        return _fit_on_ray(cfg, ctx, config)
    except NonFiniteLoss as err:  # name the checkpoint a user can go back to
        kept = sorted((ctx.storage / ctx.name).glob("checkpoint_[0-9]*"))
        raise NonFiniteLoss(f"{err}: {kept[-1] if kept else 'no checkpoint was written yet'}") from None


def _fit_on_ray(cfg: DictConfig, ctx: RunContext, config: dict) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            """Keep `fliqs.signals`' handler: Ray Train's own aborts the controller and exits the process with
            status 1, the MLflow run left RUNNING and the handler left installed after the fit."""

    trainer = Trainer(
        train_func_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(name=ctx.name, storage_path=str(ctx.storage),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))
    try:
        return trainer.fit().metrics
    except WorkerGroupError as err:
        bad = [e for e in err.worker_failures.values() if isinstance(e, BadInput)]
        if bad:  # the same one line as in-process
            raise bad[0] from None
        raise


def fit_child(cfg: DictConfig, ctx: RunContext, label: str, role: str, worker: str, params: dict | None = None,
              target: float | None = None, **args) -> dict:
    """One training run inside a method run, as a nested MLflow run ``<run>/<label>`` (a candidate, a phase)."""
    tags = {schema.METHOD: cfg.method, schema.ROLE: role}
    run_name = f"{ctx.run_name}/{label}"
    run_id, _ = start_run(ctx.uri, ctx.experiment_id, run_name, params or {}, tags, parent_run_id=ctx.run_id,
                          allow_changes=cfg.allow_resume_changes)
    child = replace(ctx, run_id=run_id, run_name=run_name, name=f"{ctx.name}-{label}",
                    target=ctx.target if target is None else target)
    try:
        m = fit(cfg, child, worker, **args)
    except BaseException as err:
        client(ctx.uri).set_terminated(run_id, end_status(err))
        raise
    client(ctx.uri).set_terminated(run_id)
    return {**m, "run_id": run_id}


def add_accounting(totals: dict, m: dict) -> dict:
    """Sum the equal-budget accounting of the runs a method made (peak memory: the largest)."""
    for k in schema.ACCOUNTING:
        totals[k] = max(totals.get(k, 0.0), m[k]) if k == "peak_memory_mb" else totals.get(k, 0.0) + m[k]
    return totals


def retrain(cfg: DictConfig, ctx: RunContext, found: dict, epochs: int) -> dict:
    """A baseline's protocol after its search: the assignment ``found`` (a fit's metrics) trained from scratch with
    plain QAT for ``epochs`` (then ``train.finetune_epochs``, as every method), as the nested run ``retrain``. Its
    metrics carry ``test_accuracy_before_retraining`` (the search's own result) and the search's accounting added."""
    from fliqs.trainables.plan import plan_run

    space = plan_run(cfg).network.space
    choices = space.choices_of(json.loads(found["assignment"]))
    retrain_cfg = OmegaConf.merge(cfg, {"train": {"epochs": epochs}})
    from fliqs.config import to_flat_dict

    m = fit_child(retrain_cfg, ctx, "retrain", schema.PHASE, methods.FIXED_QAT, to_flat_dict(retrain_cfg),
                  choices=choices)
    return {**m, **add_accounting(add_accounting({}, found), m),
            schema.TEST_ACCURACY_BEFORE_RETRAINING: found[schema.TEST_ACCURACY]}


def retrain_epochs(cfg: DictConfig, section: str) -> int:
    """``<section>.retrain_epochs``: None means the full schedule (``train.epochs``)."""
    epochs = cfg[section].retrain_epochs
    return cfg.train.epochs if epochs is None else int(epochs)


def train_once(cfg: DictConfig, ctx: RunContext) -> dict:
    """The runner of every method trained once: one fit of its registry entry's worker."""
    return fit(cfg, ctx, methods.get(cfg.method).worker)


# Ray Train V2 hands each worker's reports to its controller through a queue of size 1 that the controller drains
# at every health check (default every 2 s): a run that reports (logs or checkpoints) more often than that waits
# at every report. Measured on digits, 2 workers, a checkpoint every 10 steps: 270 steps in 50 s at the default,
# in 6 s at 0.25 s (benchmarks/RESULTS.md). The controller's poll is a few small remote calls.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_USAGE_STATS_ENABLED": "0"}


DRIVER_LOG = "ray-driver.log"  # in output_dir/logs: what Ray logs in the driver process


def init_ray(cfg: DictConfig) -> str | None:
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
    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()  # no public API names the session's folder
    except Exception:  # noqa: BLE001 - only the message depends on it
        logs = "/tmp/ray/session_latest/logs"
    return f"Ray logs: {logs} (workers: worker-*.out/.err, Ray Train: train/), driver: {driver_log}"


RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_reachable(address: str | None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """BadInput within seconds when nothing answers at ``ray_address`` (``ray.init`` would retry for minutes)."""
    import socket

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
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    ray_logger = logging.getLogger("ray")
    if any(getattr(h, "baseFilename", None) == str(path) for h in ray_logger.handlers):
        return
    for handler in ray_logger.handlers:
        handler.setLevel(logging.ERROR)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger.addHandler(handler)


def check_workers(cfg: DictConfig) -> None:
    """BadInput unless the Ray cluster can hold ``train.num_workers`` workers (CPUs, GPUs when asked)."""
    import ray

    resources = ray.cluster_resources()
    need = {"CPU": cfg.train.num_workers, **({"GPU": cfg.train.num_workers} if cfg.train.use_gpu else {})}
    for key, n in need.items():
        if resources.get(key, 0) < n:
            raise BadInput(f"train.num_workers={cfg.train.num_workers} needs {n} {key}s; the Ray cluster has "
                           f"{resources.get(key, 0):g}")
