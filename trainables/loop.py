"""The training loop every trained method shares, as one function a reader follows top to bottom.

`train(job, session)` is what every Ray Train worker runs (`train_func_per_worker` is Ray Train's entry point) and
what ``train.num_workers=0`` runs in this process (`run_in_process`). It builds the data and the network, lets the
method set itself up (`fliqs.trainables.worker`), wraps the model for data parallelism, restores the latest
checkpoint (`fliqs.trainables.checkpoints`), trains, and finishes: the method's result is evaluated on the whole test
split, logged and saved as the final checkpoint.

The loop owns the data (``DistributedSampler`` with ``set_epoch``), DDP (``forward_sync_buffers=False``: format
buffers legitimately differ between replicas; `fliqs.trainables.parallel`), SGD with a cosine schedule, gradient
clipping, checkpoints from rank 0 every ``train.checkpoint_every`` steps with stable names, MLflow logging into the
run the driver created, the optional fine-tune and the equal-budget accounting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fliqs.data.datasets import load_configured
from fliqs.errors import BadInput
from fliqs.quant.cost import summarize
from fliqs.quant.layers import get_assignment, set_assignment
from fliqs.quant.policy import RangeMode
from fliqs.run import schema
from fliqs.run.config import to_dict
from fliqs.run.console import step_line
from fliqs.run.tracking import RunLogger
from fliqs.searchers.methods import resolve
from fliqs.trainables.checkpoints import (
    FINAL_CHECKPOINT,
    MODEL_FORMAT,
    LocalSession,
    RaySession,
    checkpoint_state,
    report,
    restore,
    save_model,
)
from fliqs.trainables.parallel import (
    all_reduce_mean,
    clip_gradients,
    memory_format,
    peak_memory_mb,
    reset_peak_memory,
    training_model,
    worker_device,
)
from fliqs.trainables.plan import build_network
from fliqs.trainables.worker import Result, TrainMethod, WorkerContext, WorkerJob
from fliqs.training.evaluation import dynamic_ranges, sync_buffers
from fliqs.training.evaluation import recalibrate as recalibrate_statistics
from fliqs.training.step import train_step

RECALIBRATION_STREAM = 2**32  # the BatchNorm recalibration batches' random stream (not a step)


class NonFiniteLoss(BadInput):
    """The loss became NaN or inf: a configuration problem (learning rate, formats), reported in one line."""


def train_func_per_worker(config: dict) -> None:
    """Ray Train's entry point: ``config["job"]`` is the run's `fliqs.trainables.worker.WorkerJob`."""
    train(config["job"], RaySession())


def run_in_process(job: WorkerJob, root: Path) -> dict:
    """The same run in this process (no Ray Train), checkpointing under ``root``; returns the final report."""
    session = LocalSession(root)
    train(job, session)
    return session.metrics


def train(job: WorkerJob, session: RaySession | LocalSession) -> None:
    cfg = job.cfg
    start_wall = time.monotonic()
    device = worker_device(cfg)
    reset_peak_memory(device)

    # 1. Data and network (the same on every rank); the sharded loader of the part of the training split the
    #    method trains its weights on.
    splits = load_configured(cfg.data, cfg.model.input_size)
    net = build_network(cfg, splits.info)
    net.model.to(device, memory_format=memory_format(net.model, device))
    method_class: type[TrainMethod] = resolve(job.method)
    weight_data, method_data = method_class.split_train(cfg, splits.train)
    loader = training_loader(weight_data, cfg, session, device)
    total_steps = cfg.train.epochs * len(loader)
    worker = WorkerContext(cfg, session.rank, session.world, device, splits, net, total_steps, job.target,
                           torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None,
                           all_reduce_mean(session.world) if session.world > 1 else None, len(loader), method_data)

    # 2. The method (it may swap modules, so wrap afterwards), the training model and the weights' optimizer.
    method = method_class(worker, **job.args)
    train_model = training_model(net.model, worker, net.space.searches_architecture)
    optimizer, scheduler = weight_optimizer(net.model, cfg, total_steps)

    # 3. Resume from the latest checkpoint, if any.
    step, digest = restore(session, job, net.model, optimizer, scheduler, method)
    logger = RunLogger(job.tracking_uri, job.run_id) if session.rank == 0 else None
    log_start(logger, step, total_steps, digest)

    # 4. Train.
    state = lambda at: checkpoint_state(job, at, net.model, optimizer, scheduler, method)  # noqa: E731
    step = run_steps(method, worker, train_model, optimizer, scheduler, loader, step, session, logger, state)

    # 5. The result as it is saved (`finish`), then the optional fine-tune, reported apart, and the accounting.
    result = method.result()
    metrics, saved = finish(result, worker, job)
    if logger is not None:
        method.artifacts(logger, result)
        save_model(saved, logger)
    if cfg.train.finetune_epochs > 0:
        metrics[schema.TEST_ACCURACY_FINETUNED] = finetune(result.model, worker, loader)
    wall = time.monotonic() - start_wall
    accounting = {"epochs": cfg.train.epochs + cfg.train.finetune_epochs, "train_wall_s": wall,
                  "worker_s": wall * worker.world, "peak_memory_mb": peak_memory_mb(device)}
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}  # text goes in the report only
    if logger is not None:
        logger.metrics({**numeric, **accounting}, total_steps)
        logger.json_artifact(schema.ASSIGNMENT_FILE, {"assignment": saved["assignment"], "decisions": result.decisions,
                                                      schema.GBOPS: metrics[schema.GBOPS],
                                                      schema.SIZE_MB: metrics[schema.SIZE_MB]})
    final = {**metrics, **accounting, "steps": total_steps, "assignment": json.dumps(saved["assignment"]),
             "decisions": json.dumps(result.decisions)}
    report(session, final, FINAL_CHECKPOINT, {**state(step), "result": saved})


def training_loader(data: Dataset, cfg, session, device: torch.device) -> DataLoader:
    """This rank's shard of ``data`` in shuffled batches, the last incomplete batch dropped."""
    sampler = DistributedSampler(data, num_replicas=session.world, rank=session.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    return DataLoader(data, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.loader_workers, pin_memory=device.type == "cuda",
                      persistent_workers=cfg.data.loader_workers > 0)  # no loader restart per epoch


def weight_optimizer(model: nn.Module, cfg, total_steps: int):
    """SGD with Nesterov momentum, a cosine schedule over the run, and gradient clipping before each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    clip_gradients(optimizer, cfg.train.grad_clip)
    return optimizer, scheduler


def log_start(logger: RunLogger | None, step: int, total_steps: int, digest: str) -> None:
    """The driver's progress bar reads the progress tag (`fliqs.run.watch`); a resume records what it restored."""
    if logger is None:
        return
    logger.tags({schema.PROGRESS: f"{step}/{total_steps}"})
    if digest:
        logger.metrics({schema.RESUMED_FROM_STEP: step}, step)
        logger.tags({f"{schema.RESUME_PREFIX}{step:07d}.method_state_sha256": digest})
        step_line(f"resumed from step {step}/{total_steps}")


def run_steps(method: TrainMethod, worker: WorkerContext, train_model: nn.Module, optimizer, scheduler,
              loader: DataLoader, step: int, session, logger: RunLogger | None, state) -> int:
    """Train from ``step`` to the end: the method's steps, window means logged every ``train.log_every`` steps and
    checkpoints every ``train.checkpoint_every`` (``state(step)`` is what a checkpoint holds). Returns the last step."""
    cfg, total_steps = worker.cfg, worker.total_steps
    window: dict[str, list[float]] = {}
    start, start_step = time.monotonic(), step
    while step < total_steps:
        epoch, skip = divmod(step, len(loader))
        loader.sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            stats = method.step(train_model, optimizer, (x.to(worker.device, non_blocking=True),
                                                         y.to(worker.device, non_blocking=True)), step)
            scheduler.step()
            if not np.isfinite(stats["loss"]):
                raise NonFiniteLoss(f"non-finite training loss at step {step}; the last good checkpoint is kept")
            for k, v in stats.items():
                window.setdefault(k, []).append(v)
            step += 1
            if step % cfg.train.log_every == 0 or step == total_steps:
                if logger is not None:
                    metrics = {**method.progress({k: float(np.mean(v)) for k, v in window.items()}, step),
                               "epoch": epoch}
                    logger.metrics(metrics, step, tags={schema.PROGRESS: f"{step}/{total_steps}"})
                    shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
                    rate = (step - start_step) / (time.monotonic() - start)
                    step_line(f"{cfg.method} step {step}/{total_steps} epoch {epoch} {shown} {rate:.1f} steps/s")
                window = {}
            if step % cfg.train.checkpoint_every == 0 and step < total_steps:
                sync_buffers(worker.net.model, worker.world)  # the checkpoint holds the model every replica holds
                method.on_checkpoint(logger)
                report(session, {"step": step, "epoch": epoch}, f"checkpoint_{step:07d}", state(step))
            if step >= total_steps:
                break
    return step


def finish(result: Result, worker: WorkerContext, job: WorkerJob) -> tuple[dict, dict]:
    """The result as it is saved: the replicas' statistics averaged, activation ranges and BatchNorm re-estimated
    for the final network (one protocol for every method: ``train.bn_recalibration_batches``), evaluated without
    retraining (with the calibrated, static ranges it is exported with; the per-batch ranges apart), the
    alternatives beside it. Returns (its metrics, the saved model's content)."""
    evaluate = lambda split: worker.accuracy(result.model, split)  # noqa: E731
    sync_buffers(result.model, worker.world)
    metrics = {}
    for label, other in result.alternatives.items():
        metrics.update(evaluate_alternative(result, label, other, worker, evaluate))
    if worker.cfg.train.bn_recalibration_batches > 0:
        metrics[schema.TEST_ACCURACY_NO_RECALIBRATION] = evaluate("test")
    recalibrate(result.model, worker)
    assignment = get_assignment(result.layers)
    summary = summarize(list(result.shapes), assignment, total_params=sum(p.numel() for p in result.model.parameters()))
    metrics = {schema.TEST_ACCURACY: evaluate("test"), schema.VALIDATION_ACCURACY: evaluate("val"), **metrics,
               schema.GBOPS: summary.gbops, schema.SIZE_MB: summary.size_mb, schema.GMACS: summary.gmacs,
               schema.TARGET: worker.target, **result.metrics}
    if worker.cfg.quant.act_range is RangeMode.ema:  # the reported accuracy is the static (deployable) one
        with dynamic_ranges(result.model):
            metrics[schema.TEST_ACCURACY_DYNAMIC_RANGES] = evaluate("test")
    saved = {"format": MODEL_FORMAT, "config": to_dict(job.cfg), "assignment": assignment,
             "decisions": result.decisions, "metrics": metrics,
             "model": {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}}
    return metrics, saved


def recalibrate(model: nn.Module, worker: WorkerContext) -> None:
    """Re-estimate the final network's calibrated activation ranges and BatchNorm statistics on
    ``train.bn_recalibration_batches`` training batches (the same batches on every rank and for every assignment
    evaluated), averaged over the replicas."""
    def batches():
        stream = worker.batches(worker.splits.train, RECALIBRATION_STREAM, per_rank=False)
        return (x for x, _ in iter(stream.next, None))

    # Augmentations differ across ranks: average what they estimated, after each pass.
    recalibrate_statistics(model, batches, worker.cfg.train.bn_recalibration_batches, worker.autocast,
                           sync=lambda: sync_buffers(model, worker.world))


def evaluate_alternative(result: Result, label: str, assignment: dict, worker: WorkerContext,
                         evaluate) -> dict[str, float]:
    """``assignment`` on the result's network, evaluated with the result's protocol (BatchNorm recalibration, the
    test split); the network and its formats are restored afterwards. Metrics named `schema.alternative_metric`."""
    kept = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    own = get_assignment(result.layers)
    set_assignment(result.layers, assignment)
    recalibrate(result.model, worker)
    summary = summarize(list(result.shapes), assignment, total_params=sum(p.numel() for p in result.model.parameters()))
    out = {schema.alternative_metric(label, schema.TEST_ACCURACY): evaluate("test"),
           schema.alternative_metric(label, schema.GBOPS): summary.gbops,
           schema.alternative_metric(label, schema.SIZE_MB): summary.size_mb}
    result.model.load_state_dict(kept)
    set_assignment(result.layers, own)
    return out


def finetune(model: nn.Module, worker: WorkerContext, loader: DataLoader) -> float:
    """``train.finetune_epochs`` of plain QAT on the final assignment at a tenth of the learning rate; returns the
    test accuracy after it (reported apart from the no-retraining result)."""
    cfg = worker.cfg
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr * 0.1, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    clip_gradients(optimizer, cfg.train.grad_clip)
    wrapped = training_model(model, worker, searches_architecture=False)
    for epoch in range(cfg.train.finetune_epochs):
        loader.sampler.set_epoch(cfg.train.epochs + epoch)
        losses = [train_step(wrapped, optimizer, (x.to(worker.device, non_blocking=True),
                                                  y.to(worker.device, non_blocking=True)), worker.autocast)
                  for x, y in loader]
        if worker.rank == 0:
            step_line(f"fine-tune epoch {epoch + 1}/{cfg.train.finetune_epochs} train_loss {np.mean(losses):.4g}")
    recalibrate(model, worker)  # the result's protocol: ranges and BatchNorm re-estimated, replicas averaged
    return worker.accuracy(model, "test")
