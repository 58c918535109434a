"""The training loop every trained method shares, as one function a reader follows top to bottom.

`train(config, session)` is what every Ray Train worker runs (`train_func_per_worker` is Ray Train's entry point)
and what ``train.num_workers=0`` runs in this process (`run_in_process`). It builds the data and the network,
lets the method set itself up, wraps the model for data parallelism, restores the latest checkpoint, trains, and
finishes: the method's result is evaluated on the whole test split, logged and saved as the final checkpoint.

A method is a small object (`TrainMethod`): built from the `WorkerContext`, it provides one training step, the
metrics it logs, its checkpointed state and its result (the network to evaluate, with its final formats). The
loop owns everything else: data (``DistributedSampler`` with ``set_epoch``), DDP (``forward_sync_buffers=False``:
format buffers legitimately differ between replicas), SGD with a cosine schedule, gradient clipping, checkpoints
from rank 0 every ``train.checkpoint_every`` steps with stable names, MLflow logging into the run the driver
created, the optional fine-tune and the equal-budget accounting.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fliqs import schema
from fliqs.console import step_line
from fliqs.cost import LayerShape, summarize
from fliqs.data import Splits, load_data
from fliqs.errors import BadInput
from fliqs.evaluation import recalibrate_batchnorm, split_accuracy, sync_buffers
from fliqs.layers import QuantLayer, get_assignment, set_assignment
from fliqs.searchers.methods import resolve
from fliqs.tracking import RunLogger
from fliqs.trainables.plan import Network, build_network

CHECKPOINT_FORMAT = "fliqs-run/2"
MODEL_FORMAT = "fliqs-model/1"  # the evaluated model: config, state, assignment, reported metrics
RECALIBRATION_STREAM = 2**32  # the BatchNorm recalibration batches' random stream (not a step)
CHECKPOINT_FILE = "state.pt"
FINAL_CHECKPOINT = "checkpoint_final"
KEEP_CHECKPOINTS = 2  # the newest checkpoints kept, by Ray Train's CheckpointConfig and by the in-process session


class NonFiniteLoss(BadInput):
    """The loss became NaN or inf: a configuration problem (learning rate, formats), reported in one line."""


class CheckpointError(BadInput):
    """A corrupt or foreign checkpoint where a run would resume: the user must move it or pick another name."""


def derived_seed(*keys: int) -> int:
    """A seed for the random stream named by ``keys`` (e.g. seed, rank, step): distinct keys give independent
    streams, where ``seed + 1000 * rank + step`` would collide (rank 1, step 0 = rank 0, step 1000)."""
    entropy = [int(k) % 2**64 for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] % 2**63)


# -- what a method sees and provides -------------------------------------------------------------------------------
@dataclass
class WorkerContext:
    """Everything a method may use on one worker; built by `train` before the method."""

    cfg: DictConfig
    rank: int
    world: int
    device: torch.device
    splits: Splits
    net: Network
    total_steps: int
    target: float  # the cost target, GBOPs or MB (`fliqs.trainables.plan.Plan.target`)
    autocast: torch.autocast | None
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None  # mean over the replicas; None in one process
    steps_per_epoch: int = 1
    method_data: Dataset | None = None  # the part of the training split the method keeps from the weights (DNAS)

    def generator(self, *stream: int) -> torch.Generator:
        """A CPU generator for this rank's random stream ``stream`` (e.g. the step a sampling sequence starts at)."""
        return torch.Generator().manual_seed(derived_seed(self.cfg.seed, self.rank, *stream))

    def accuracy(self, model: nn.Module, split: str) -> float:
        """``model``'s exact accuracy on the whole split ``split`` ("val", "test"), the same on every rank."""
        return split_accuracy(model, getattr(self.splits, split), self.cfg.data.batch_size, self.device,
                              self.autocast, self.rank, self.world, dist.all_reduce if self.world > 1 else None)

    def batches(self, data: Dataset, *stream: int, per_rank: bool = True) -> Batches:
        """Endless batches of ``data`` from random stream ``stream`` of this rank (or, ``per_rank=False``, the same
        stream on every rank)."""
        seed = derived_seed(self.cfg.seed, self.rank, *stream) if per_rank else derived_seed(self.cfg.seed, *stream)
        return Batches(data, self.cfg.data.batch_size, seed, self.device)


@dataclass
class Result:
    """A method's result: the network that is evaluated and saved, at its final formats (set by the method)."""

    model: nn.Module
    layers: list[QuantLayer]
    shapes: list[LayerShape]
    decisions: list[dict]  # `fliqs.searchers.space.SearchSpace.report` rows
    metrics: dict[str, float | str] = field(default_factory=dict)  # the method's own (final entropy, architecture)
    # Other assignments of the same network, evaluated beside the result with the same protocol (a one-shot
    # search's argmax beside its extraction within the budget): label -> assignment.
    alternatives: dict[str, dict] = field(default_factory=dict)


class TrainMethod:
    """What a trained method adds to the loop: `step` and `result` are required, the rest is optional."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    @classmethod
    def split_train(cls, cfg: DictConfig, data: Dataset) -> tuple[Dataset, Dataset | None]:
        """(what the weights train on, what the method keeps for itself): by default the whole training split."""
        return data, None

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
             step: int) -> dict[str, float]:
        """One training step of ``model`` (DDP / compiled wrapper of the network); the stats include ``loss``."""
        raise NotImplementedError

    def progress(self, means: dict[str, float], step: int) -> dict[str, float]:
        """Metrics logged every ``train.log_every`` steps (rank 0) from the window means of `step`'s stats."""
        return {"train_loss": means["loss"]}

    def on_checkpoint(self, logger: RunLogger | None) -> None:
        """At every periodic checkpoint (periodic artifacts; ``logger`` on rank 0 only)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def result(self) -> Result:
        raise NotImplementedError

    def artifacts(self, logger: RunLogger, result: Result) -> None:
        """The method's artifacts (rank 0)."""


# -- the loop ------------------------------------------------------------------------------------------------------
def train_func_per_worker(config: dict) -> None:
    """Ray Train's entry point. ``config``: {"cfg": resolved config, "worker": "module:TrainMethod", "run_id",
    "tracking_uri", "target", "args": keyword arguments of the method}."""
    train(config, RaySession())


def run_in_process(config: dict, root: Path) -> dict:
    """The same run in this process (no Ray Train), checkpointing under ``root``; returns the final metrics."""
    session = LocalSession(root)
    train(config, session)
    return session.metrics


def train(config: dict, session: RaySession | LocalSession) -> None:
    cfg = OmegaConf.create(config["cfg"])
    start_wall = time.monotonic()
    device = worker_device(cfg)
    reset_peak_memory(device)

    # 1. Data and network (the same on every rank), the sharded training loader (of the part of the training split
    #    the method trains its weights on).
    splits = load_data(cfg.data.name, cfg.data.path, cfg.model.input_size, cfg.data.val_fraction,
                       cfg.data.test_fraction, cfg.data.seed)
    net = build_network(cfg, splits.info)
    net.model.to(device, memory_format=memory_format(net.model, device))
    method_class: type[TrainMethod] = resolve(config["worker"])
    weight_data, method_data = method_class.split_train(cfg, splits.train)
    sampler = DistributedSampler(weight_data, num_replicas=session.world, rank=session.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(weight_data, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.loader_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.loader_workers > 0)  # no loader restart per epoch
    total_steps = cfg.train.epochs * len(loader)
    ctx = WorkerContext(cfg, session.rank, session.world, device, splits, net, total_steps, float(config["target"]),
                        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None,
                        all_reduce_mean(session.world) if session.world > 1 else None, len(loader), method_data)

    # 2. The method (it may swap modules, so wrap afterwards), the training model and the weights' optimizer.
    method = method_class(ctx, **config.get("args", {}))
    train_model = training_model(net.model, ctx, net.space.searches_architecture)
    optimizer = torch.optim.SGD(net.model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    clip_gradients(optimizer, cfg.train.grad_clip)

    # 3. Resume from the latest checkpoint, if any.
    step, digest = restore(session, config, net.model, optimizer, scheduler, method)
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if session.rank == 0 else None
    if logger is not None:  # the driver's progress bar reads it (`fliqs.watch`)
        logger.tags({schema.PROGRESS: f"{step}/{total_steps}"})
    if logger is not None and digest:  # what the restored search state is, to audit resumes
        logger.metrics({schema.RESUMED_FROM_STEP: step}, step)
        logger.tags({f"{schema.RESUME_PREFIX}{step:07d}.method_state_sha256": digest})
        step_line(f"resumed from step {step}/{total_steps}")

    # 4. Train.
    state = lambda: checkpoint_state(config, step, net.model, optimizer, scheduler, method)  # noqa: E731
    window: dict[str, list[float]] = {}
    start, start_step = time.monotonic(), step
    while step < total_steps:
        epoch, skip = divmod(step, len(loader))
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            stats = method.step(train_model, optimizer, (x.to(device, non_blocking=True),
                                                         y.to(device, non_blocking=True)), step)
            scheduler.step()
            if not np.isfinite(stats["loss"]):
                raise NonFiniteLoss(f"non-finite training loss at step {step}; the last good checkpoint is kept")
            for k, v in stats.items():
                window.setdefault(k, []).append(v)
            step += 1
            if logger is not None and (step % cfg.train.log_every == 0 or step == total_steps):
                means = {k: float(np.mean(v)) for k, v in window.items()}
                metrics = {**method.progress(means, step), "epoch": epoch}
                logger.metrics(metrics, step, tags={schema.PROGRESS: f"{step}/{total_steps}"})
                shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
                rate = (step - start_step) / (time.monotonic() - start)
                step_line(f"{cfg.method} step {step}/{total_steps} epoch {epoch} {shown} {rate:.1f} steps/s")
            if step % cfg.train.log_every == 0 or step == total_steps:
                window = {}
            if step % cfg.train.checkpoint_every == 0 and step < total_steps:
                sync_buffers(net.model, ctx.world)  # the checkpoint holds the model every replica holds
                method.on_checkpoint(logger)
                report(session, {"step": step, "epoch": epoch}, f"checkpoint_{step:07d}", state())
            if step >= total_steps:
                break

    # 5. The result as it is saved: the replicas' statistics averaged, BatchNorm re-estimated for the final network
    #    (one protocol for every method: train.bn_recalibration_batches), evaluated without retraining; then the
    #    optional fine-tune, reported apart.
    result = method.result()
    evaluate = lambda split: ctx.accuracy(result.model, split)  # noqa: E731
    sync_buffers(result.model, ctx.world)
    metrics = {}
    for label, other in result.alternatives.items():
        metrics.update(evaluate_alternative(result, label, other, ctx, evaluate))
    if cfg.train.bn_recalibration_batches > 0:
        metrics[schema.TEST_ACCURACY_NO_RECALIBRATION] = evaluate("test")
    recalibrate(result.model, ctx)
    assignment = get_assignment(result.layers)
    summary = summarize(list(result.shapes), assignment, total_params=sum(p.numel() for p in result.model.parameters()))
    metrics = {schema.TEST_ACCURACY: evaluate("test"), schema.VALIDATION_ACCURACY: evaluate("val"), **metrics,
               schema.GBOPS: summary.gbops, schema.SIZE_MB: summary.size_mb, schema.GMACS: summary.gmacs,
               schema.TARGET: ctx.target, **result.metrics}
    saved = {"format": MODEL_FORMAT, "config": config["cfg"], "assignment": assignment,
             "decisions": result.decisions, "metrics": metrics,
             "model": {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}}
    if logger is not None:
        method.artifacts(logger, result)
        save_model(saved, logger)
    if cfg.train.finetune_epochs > 0:
        metrics[schema.TEST_ACCURACY_FINETUNED] = finetune(result.model, ctx, loader, sampler, evaluate)
    wall = time.monotonic() - start_wall
    accounting = {"epochs": cfg.train.epochs + cfg.train.finetune_epochs, "train_wall_s": wall,
                  "worker_s": wall * ctx.world, "peak_memory_mb": peak_memory_mb(device)}
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}  # text goes in the report only
    if logger is not None:
        logger.metrics({**numeric, **accounting}, total_steps)
        logger.json_artifact(schema.ASSIGNMENT_FILE, {"assignment": assignment, "decisions": result.decisions,
                                                      "gbops": summary.gbops, "size_mb": summary.size_mb})
    final = {**metrics, **accounting, "steps": total_steps, "assignment": json.dumps(assignment),
             "decisions": json.dumps(result.decisions)}
    report(session, final, FINAL_CHECKPOINT, {**state(), "result": saved})


def recalibrate(model: nn.Module, ctx: WorkerContext) -> None:
    """Re-estimate the final network's BatchNorm statistics on ``train.bn_recalibration_batches`` training batches
    (the same batches on every rank and for every assignment evaluated), averaged over the replicas."""
    batches = ctx.batches(ctx.splits.train, RECALIBRATION_STREAM, per_rank=False)
    if recalibrate_batchnorm(model, (x for x, _ in iter(batches.next, None)), ctx.cfg.train.bn_recalibration_batches,
                             ctx.autocast):
        sync_buffers(model, ctx.world)  # augmentations differ across ranks: average what they estimated


def evaluate_alternative(result: Result, label: str, assignment: dict, ctx: WorkerContext,
                         evaluate: Callable[[str], float]) -> dict[str, float]:
    """``assignment`` on the result's network, evaluated with the result's protocol (BatchNorm recalibration, the
    test split); the network and its formats are restored afterwards. Metrics named `schema.alternative_metric`."""
    kept = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    own = get_assignment(result.layers)
    set_assignment(result.layers, assignment)
    recalibrate(result.model, ctx)
    summary = summarize(list(result.shapes), assignment, total_params=sum(p.numel() for p in result.model.parameters()))
    out = {schema.alternative_metric(label, schema.TEST_ACCURACY): evaluate("test"),
           schema.alternative_metric(label, schema.GBOPS): summary.gbops,
           schema.alternative_metric(label, schema.SIZE_MB): summary.size_mb}
    result.model.load_state_dict(kept)
    set_assignment(result.layers, own)
    return out


def save_model(saved: dict, logger: RunLogger) -> None:
    """The evaluated model as the run's ``model.pt`` artifact (`fliqs.trainables.saved` rebuilds it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / schema.MODEL_FILE
        torch.save(saved, path)
        logger.artifact(path)


def qat_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
             autocast: torch.autocast | None = None) -> float:
    """One plain quantization-aware training step of the formats currently set; returns the loss."""
    x, y = batch
    model.train()
    with autocast or nullcontext():
        loss = F.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def finetune(model: nn.Module, ctx: WorkerContext, loader: DataLoader, sampler: DistributedSampler,
             evaluate: Callable[[str], float]) -> float:
    """``train.finetune_epochs`` of plain QAT on the final assignment at a tenth of the learning rate; returns the
    test accuracy after it (reported apart from the no-retraining result)."""
    cfg = ctx.cfg
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr * 0.1, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    clip_gradients(optimizer, cfg.train.grad_clip)
    wrapped = training_model(model, ctx, searches_architecture=False)
    for epoch in range(cfg.train.finetune_epochs):
        sampler.set_epoch(cfg.train.epochs + epoch)
        losses = [qat_step(wrapped, optimizer, (x.to(ctx.device, non_blocking=True),
                                                y.to(ctx.device, non_blocking=True)), ctx.autocast)
                  for x, y in loader]
        if ctx.rank == 0:
            step_line(f"fine-tune epoch {epoch + 1}/{cfg.train.finetune_epochs} train_loss {np.mean(losses):.4g}")
    return evaluate("test")


# -- pieces of the loop --------------------------------------------------------------------------------------------
class Batches:
    """Endless shuffled batches (the per-step validation batch of the searches)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device):
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                                 generator=torch.Generator().manual_seed(seed))
        self.device = device
        self._it = iter(self.loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            x, y = next(self._it)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def worker_device(cfg: DictConfig) -> torch.device:
    if cfg.train.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def all_reduce_mean(world: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out)
        return out / world

    return reduce


def use_compile(flag: bool | None, device: torch.device, searches_architecture: bool = False) -> bool:
    """``train.compile``, resolved: ``None`` compiles on GPUs only. On CPUs compiling takes longer than a short
    search saves, and the eager fake quantization is within the CPU target (benchmarks/RESULTS.md, issue 6).
    An architecture search (FLIQNAS) changes the graph's shapes with every sampled architecture: one graph per
    architecture would be compiled, so ``None`` leaves it eager."""
    if flag is None:
        return device.type == "cuda" and not searches_architecture
    return bool(flag)


def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for conv models on GPUs (cuDNN's fast NHWC kernels, bf16 tensor cores; the first conv turns
    NCHW inputs into NHWC activations), the default layout otherwise."""
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return torch.channels_last
    return torch.preserve_format


def training_model(model: nn.Module, ctx: WorkerContext, searches_architecture: bool) -> nn.Module:
    """DDP over the workers (the model itself in one process), compiled when ``train.compile`` says so.

    Compile the DDP wrapper, not the module inside it: dynamo's DDPOptimizer then splits the graph at DDP's bucket
    boundaries, so the gradient all-reduce still overlaps the backward pass. The format buffers are data: one
    training and one evaluation graph serve every sampled assignment.
    """
    wrapped = model
    if ctx.world > 1:
        import ray.train.torch

        # No buffer sync in forward: each replica keeps its own format buffers (sampled per replica). A supernet's
        # sampled path leaves parameters (skipped blocks) without gradients: DDP must be told to expect that.
        # forward_sync_buffers=False (what broadcast_buffers=False was before torch 2.13 deprecated it) still
        # broadcasts the buffers once at wrapping: they are identical on every rank then (same seed, no step yet).
        kwargs = {"forward_sync_buffers": False, "find_unused_parameters": searches_architecture}
        wrapped = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=kwargs)
    return torch.compile(wrapped) if use_compile(ctx.cfg.train.compile, ctx.device, searches_architecture) \
        else wrapped


def clip_gradients(optimizer: torch.optim.Optimizer, clip: float | None) -> None:
    """Clip the gradient norm of ``optimizer``'s parameters before each of its steps, whatever method steps it: at
    2-3 bits a channel quantized to all zeros meets BatchNorm's 1/sqrt(eps) and the weights explode."""
    if not clip:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip_before_step(*_) -> None:  # a step pre-hook must return None
        torch.nn.utils.clip_grad_norm_(params, clip)

    optimizer.register_step_pre_hook(clip_before_step)


_PROC_STATUS, _PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start counting `peak_memory_mb` from now: a process runs several fits (an in-process search's phases, the
    trials a reused Ray Tune actor runs one after another), and each reports the peak during its own run (which
    still counts what the process holds at its start). Linux resets the resident high-water mark on writing "5" to
    clear_refs; elsewhere the process's lifetime peak stays, an upper bound."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_CLEAR_REFS.exists():
        try:
            _PROC_CLEAR_REFS.write_text("5")
        except OSError:  # a sandbox may refuse it: the lifetime peak is an upper bound
            pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory since `reset_peak_memory` on GPU, else the peak resident set (Linux: VmHWM, KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if _PROC_STATUS.exists():
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


# -- checkpoints ---------------------------------------------------------------------------------------------------
def state_digest(obj) -> str:
    """sha256 of a (nested) state: dict keys in order, tensors by dtype, shape and bytes. Equal digests mean
    bit-identical states (used to check that a resume restored exactly what was checkpointed)."""
    digest = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                digest.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            # reshape(-1): a 0-dim tensor (Adam's step count) cannot be viewed as bytes directly.
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(repr(x).encode())

    walk(obj)
    return digest.hexdigest()


def _identity(config: dict) -> dict:
    """What a checkpoint must match to be resumed by this run: the worker, the method and the MLflow run."""
    return {"worker": config["worker"], "method": config["cfg"]["method"], "mlflow_run_id": config["run_id"]}


def checkpoint_state(config: dict, step: int, model: nn.Module, optimizer, scheduler, method: TrainMethod) -> dict:
    return {"format": CHECKPOINT_FORMAT, **_identity(config), "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "method_state": method.state_dict()}


def report(session: RaySession | LocalSession, metrics: dict, name: str, state: dict) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint holding ``state``."""
    if session.rank != 0:
        session.report(metrics, None, name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        session.report(metrics, tmp, name)


def load_checkpoint(folder: str | Path) -> dict:
    """A fliqs checkpoint's state (``weights_only``: tensors and plain data, no code); CheckpointError otherwise."""
    try:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is a corrupt or foreign checkpoint
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {folder} is corrupt or not a fliqs checkpoint: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {folder} is not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def restore(session, config: dict, model: nn.Module, optimizer, scheduler, method: TrainMethod) -> tuple[int, str]:
    """Load the latest checkpoint into the run; returns (step, sha256 of the restored method state) or (0, "")."""
    found = session.latest_checkpoint()
    if found is None:
        return 0, ""
    with found as folder:
        state = load_checkpoint(folder)
    expected = _identity(config)
    for key in ("worker", "method"):
        if state[key] != expected[key]:
            raise CheckpointError(f"checkpoint {folder} is a {state['method']} checkpoint ({state['worker']}), not "
                                  f"{expected['method']} ({expected['worker']})")
    if state["mlflow_run_id"] != expected["mlflow_run_id"]:
        raise CheckpointError(f"checkpoint {folder} belongs to MLflow run {state['mlflow_run_id']}, not "
                              f"{expected['mlflow_run_id']}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method_state"])
    except (RuntimeError, KeyError, ValueError) as err:  # shapes or keys of another model / space / method config
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {folder} does not fit this configuration (model, space or method "
                              f"changed since it was written): {reason[:300]}; use another name") from None
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), state_digest(state["method_state"])


class RaySession:
    """Rank, reports and checkpoints through Ray Train (a worker of a TorchTrainer)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics: dict, state_dir: str | None, name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(state_dir) if state_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)

    def latest_checkpoint(self):
        """A context manager yielding the latest checkpoint folder, or None."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else None


class LocalSession:
    """The same in the calling process, for ``num_workers=0`` where Ray Train's API is unavailable (inside a Ray
    Tune trial): checkpoints are folders under ``root`` with the same names, so a rerun resumes the same way."""

    rank, world = 0, 1

    def __init__(self, root: Path):
        self.root = Path(root)
        self.metrics: dict = {}

    def report(self, metrics: dict, state_dir: str | None, name: str) -> None:
        if state_dir:
            # Written under a temporary name, then renamed: a stop signal during the copy leaves no partial
            # checkpoint for a rerun to resume from (a rename within one folder is atomic).
            for stale in self.root.glob(".checkpoint_*.partial"):  # left by an earlier interrupted write
                shutil.rmtree(stale, ignore_errors=True)
            partial = self.root / f".{name}.partial"
            shutil.copytree(state_dir, partial)
            shutil.rmtree(self.root / name, ignore_errors=True)
            partial.rename(self.root / name)
            for old in sorted(self.root.glob("checkpoint_*"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        self.metrics = metrics

    def latest_checkpoint(self):
        found = sorted(self.root.glob("checkpoint_*"))  # checkpoint_final sorts after the numbered ones
        return nullcontext(str(found[-1])) if found else None
