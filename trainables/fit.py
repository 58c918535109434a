"""Fitting training runs: one Ray Train job (or the same loop in-process) logging into an MLflow run.

A method's *runner* (`fliqs.searchers.methods`) drives one run of the method at one cost target; it gets a
`RunContext` (where it logs, and its `fliqs.trainables.plan.Plan`) and fits one or more training runs through `fit`
(`train_once` is the runner of every method trained once), each a `fliqs.trainables.result.RunResult`. Failures
inside a worker keep their type through Ray Train (`WorkerGroupError.worker_failures`): bad input found there (a
diverging loss, a foreign checkpoint) surfaces as the same one-line `BadInput` as in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fliqs.errors import BadInput
from fliqs.run import schema
from fliqs.run.config import FliqsConfig, derive, to_flat_dict
from fliqs.run.tracking import client, end_status, start_run
from fliqs.searchers import methods
from fliqs.trainables.checkpoints import KEEP_CHECKPOINTS
from fliqs.trainables.loop import NonFiniteLoss, run_in_process, train_func_per_worker
from fliqs.trainables.plan import Plan
from fliqs.trainables.ray_private import keeping_our_sigint
from fliqs.trainables.result import RunResult, total_accounting
from fliqs.trainables.worker import WorkerJob


@dataclass(frozen=True)
class RunContext:
    """Where one run of a method logs and checkpoints, and its plan (its configuration, network and target)."""

    uri: str  # MLflow tracking URI
    experiment_id: str
    run_id: str  # the MLflow run this method run logs into
    run_name: str  # its MLflow name (nested runs are "<run_name>/<label>")
    name: str  # Ray Train run name: checkpoints live in storage / name; reusing it resumes
    storage: Path
    plan: Plan

    @property
    def cfg(self) -> FliqsConfig:
        return self.plan.cfg

    @property
    def target(self) -> float:
        return self.plan.target


def fit(run: RunContext, method: str, **args) -> RunResult:
    """Fit one training run of ``method`` (a `fliqs.trainables.worker.TrainMethod`, ``"module:Class"``) on the run's
    configuration.

    A Ray Train ``TorchTrainer`` with ``train.num_workers`` workers; reusing ``(storage, name)`` resumes from the
    latest checkpoint. ``num_workers=0`` runs the same loop in this process, with the same checkpoint folders
    under ``storage / name`` (Ray Train's own local mode keeps no checkpoints, and its API is unavailable inside
    a Ray Tune trial).
    """
    cfg = run.cfg
    job = WorkerJob(cfg, method, run.run_id, run.uri, run.target, args)
    try:
        report = run_in_process(job, run.storage / run.name) if cfg.train.num_workers == 0 else _fit_on_ray(run, job)
    except NonFiniteLoss as err:  # name the checkpoint a user can go back to
        kept = sorted((run.storage / run.name).glob("checkpoint_[0-9]*"))
        raise NonFiniteLoss(f"{err}: {kept[-1] if kept else 'no checkpoint was written yet'}") from None
    return RunResult.from_report(report)


def _fit_on_ray(run: RunContext, job: WorkerJob) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    cfg = run.cfg
    trainer = keeping_our_sigint(TorchTrainer)(
        train_func_per_worker, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(name=run.name, storage_path=str(run.storage),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))
    try:
        return trainer.fit().metrics
    except WorkerGroupError as err:
        bad = [e for e in err.worker_failures.values() if isinstance(e, BadInput)]
        if bad:  # the same one line as in-process
            raise bad[0] from None
        raise


def child_run(run: RunContext, label: str, role: str, cfg: FliqsConfig | None = None,
              params: bool = False) -> RunContext:
    """A nested MLflow run ``<run>/<label>`` (a candidate, a phase) of ``run``, on ``cfg`` (the run's own
    configuration by default) and the plan derived for it; ``params``: log ``cfg`` as its params."""
    cfg = run.cfg if cfg is None else cfg
    plan = run.plan if cfg is run.cfg else run.plan.derive(cfg)
    tags = {schema.METHOD: cfg.method, schema.ROLE: role}
    run_name = f"{run.run_name}/{label}"
    run_id, _ = start_run(run.uri, run.experiment_id, run_name, to_flat_dict(cfg) if params else {}, tags,
                          parent_run_id=run.run_id, allow_changes=cfg.allow_resume_changes)
    return replace(run, run_id=run_id, run_name=run_name, name=f"{run.name}-{label}", plan=plan)


def fit_child(run: RunContext, label: str, role: str, method: str, cfg: FliqsConfig | None = None,
              params: bool = False, **args) -> RunResult:
    """One training run inside a method run, as a nested MLflow run (`child_run`); its result names that run."""
    child = child_run(run, label, role, cfg, params)
    try:
        result = fit(child, method, **args)
    except BaseException as err:
        client(run.uri).set_terminated(child.run_id, end_status(err))
        raise
    client(run.uri).set_terminated(child.run_id)
    return replace(result, model_run_id=child.run_id)


def retrain(run: RunContext, found: RunResult, epochs: int) -> RunResult:
    """A baseline's protocol after its search: the assignment ``found`` trained from scratch with plain QAT for
    ``epochs`` (then ``train.finetune_epochs``, as every method), as the nested run ``retrain``. Its result carries
    ``test_accuracy_before_retraining`` (the search's own result) and the search's accounting added."""
    space = run.plan.network.space
    choices = space.choices_of(found.assignment)
    retrained = fit_child(run, "retrain", schema.PHASE, methods.FIXED_QAT, derive(run.cfg, {"train.epochs": epochs}),
                          params=True, choices=choices)
    return retrained.with_accounting(total_accounting(found, retrained)).with_extras(
        **{schema.TEST_ACCURACY_BEFORE_RETRAINING: found.test_accuracy})


def train_once(run: RunContext) -> RunResult:
    """The runner of every method trained once: one fit of its registry entry's worker."""
    return fit(run, methods.get(run.cfg.method).worker)
