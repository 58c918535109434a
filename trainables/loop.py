"""The Ray Train loop every trained method shares; a method supplies the step and the final assignment.

`TrainRun` holds what is the same for FLIQS, uniform or candidate QAT and the differentiable searches: data
(DistributedSampler with ``set_epoch``), the model with its quantized layers, DDP (``broadcast_buffers=False``:
format buffers legitimately differ between replicas), SGD with a cosine schedule, checkpoints from rank 0 every
``train.checkpoint_every`` steps with stable names, resume from Ray's checkpoint, progress lines, MLflow logging
into the run the driver created, exact test accuracy, the optional fine-tune and the final report with the
equal-budget accounting. ``num_workers=0`` runs the same loop in-process.
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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, Subset

from fliqs.cost import measure_layers, summarize
from fliqs.data import load_data
from fliqs.errors import BadInput
from fliqs.layers import get_assignment, quantize_model, set_assignment
from fliqs.models import create_model
from fliqs.searchers.fliqs import accuracy
from fliqs.searchers.space import build_space
from fliqs.supernet import block_options, extract, is_supernet, measure_architectures
from fliqs.tracking import RunLogger

CHECKPOINT_FORMAT = "fliqs-run/1"
CHECKPOINT_FILE = "state.pt"
FINAL_CHECKPOINT = "checkpoint_final"


def progress(message: str) -> None:
    """One progress line. Written to the process' real stdout: Ray Train V2 patches ``print`` in workers and,
    when another library wraps ``sys.stdout`` (MLflow does), tees every line twice."""
    sys.__stdout__.write(f"[fliqs] {message}\n")
    sys.__stdout__.flush()


def qat_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
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


class NonFiniteLoss(RuntimeError):
    pass


class CheckpointError(BadInput):
    """A corrupt or foreign checkpoint where a run would resume: the user must move it or pick another name."""


def build_model_and_space(cfg):
    """Data splits, the model with its quantized layers, measured layer shapes and the search space.

    Deterministic in ``cfg``: the driver calls it to plan, every worker to train, and they agree.
    """
    splits = load_data(cfg.data.name, cfg.data.path, cfg.model.input_size, cfg.data.val_fraction,
                       cfg.data.test_fraction, cfg.data.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes or splits.num_classes,
                         in_chans=splits.in_chans, **cfg.model.kwargs)
    search_arch = cfg.method == "fliqnas"
    if search_arch and not is_supernet(model):
        raise BadInput(f"method=fliqnas searches a supernet's architecture; {cfg.model.name!r} is not one "
                       f"(use model=fliqnas_digits or model=fliqnas_mbv2)")
    if is_supernet(model) and not search_arch:  # a fixed architecture: train the plain network, no supernet
        model = extract(model)
    layers = quantize_model(model, default=cfg.quant.default_format, pinned=cfg.quant.pinned,
                            range_mode=cfg.quant.act_range, exclude=cfg.quant.exclude)
    shapes = measure_architectures(model, splits.input_size, splits.in_chans) if search_arch else \
        measure_layers(model, splits.input_size, splits.in_chans)
    space = build_space([layer.name for layer in layers], cfg.space.candidates, shared_wa=cfg.space.shared_wa,
                        weight_only=cfg.space.weight_only, groups=cfg.space.groups, pinned=cfg.quant.pinned,
                        activation_format=cfg.quant.default_format,
                        blocks=block_options(model) if search_arch else None)
    return splits, model, layers, shapes, space


class Batches:
    """Endless shuffled batches (the per-step validation batch of the searches)."""

    def __init__(self, dataset, batch_size: int, seed: int, device):
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                                 generator=torch.Generator().manual_seed(seed))
        self.device = device
        self._it = iter(self.loader)

    def next(self):
        try:
            x, y = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            x, y = next(self._it)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory of this process on GPU, else its peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def use_compile(flag: bool | None, device: torch.device, searches_architecture: bool = False) -> bool:
    """``train.compile``, resolved: ``None`` compiles on GPUs only. On CPUs compiling takes longer than a short
    search saves, and the eager fake quantization is within the CPU target (benchmarks/RESULTS.md, issue 6).
    An architecture search (FLIQNAS) changes the graph's shapes with every sampled architecture: one graph per
    architecture would be compiled, so ``None`` leaves it eager."""
    if flag is None:
        return device.type == "cuda" and not searches_architecture
    return bool(flag)


def memory_format(model: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for conv models on GPUs (cuDNN's fast NHWC kernels, bf16 tensor cores; the first conv turns
    NCHW inputs into NHWC activations), the default layout otherwise."""
    if device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return torch.channels_last
    return torch.preserve_format


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
            shutil.copytree(state_dir, self.root / name, dirs_exist_ok=True)
            for old in sorted(self.root.glob("checkpoint_*"))[:-2]:  # keep two, as CheckpointConfig does
                shutil.rmtree(old, ignore_errors=True)
        self.metrics = metrics

    def latest_checkpoint(self):
        found = sorted(self.root.glob("checkpoint_*"))  # checkpoint_final sorts after the numbered ones
        return nullcontext(str(found[-1])) if found else None


class TrainRun:
    """One worker's share of a training run. Subclasses implement `train_step` and `final_choices`."""

    method = "base"

    def __init__(self, config: dict, session: RaySession | LocalSession):
        self.cfg = cfg = OmegaConf.create(config["cfg"])
        self.session = session
        self.run_id, self.target = config["run_id"], float(config["target"])
        self.rank, self.world = session.rank, session.world
        self.device = self._device()
        self.splits, self.model, self.layers, self.shapes, self.space = build_model_and_space(cfg)
        self.model.to(self.device, memory_format=memory_format(self.model, self.device))
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.sampler = DistributedSampler(self.splits.train, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        self.loader = DataLoader(self.splits.train, batch_size=cfg.data.batch_size, sampler=self.sampler,
                                 drop_last=True, num_workers=cfg.data.loader_workers,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=cfg.data.loader_workers > 0)  # no worker restart per epoch
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        self.setup()
        self.compiled = use_compile(cfg.train.compile, self.device, self.space.searches_architecture)
        # Compile the DDP wrapper, not the module inside it: dynamo's DDPOptimizer then splits the graph at DDP's
        # bucket boundaries, so gradient all-reduce still overlaps the backward pass (PyTorch's DDP + compile notes).
        # The format buffers are data: one training and one evaluation graph serve every sampled assignment.
        distributed = self._distributed(self.model)
        self.train_model = torch.compile(distributed) if self.compiled else distributed
        self.optimizer = torch.optim.SGD(self.weight_parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay, nesterov=True)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, self.total_steps))
        self._clip_gradients(self.optimizer)
        self.history: dict[str, list] = {"steps": [], "probs": []}
        self.step = 0
        self.resumed_digest = ""
        self._restore()
        self.logger = RunLogger(config["tracking_uri"], self.run_id) if self.rank == 0 else None
        if self.logger is not None and self.resumed_digest:  # what the restored search state is, to audit resumes
            self.logger.metrics({"resumed_from_step": self.step}, self.step)
            self.logger.tags({f"fliqs.resume.{self.step:07d}.method_state_sha256": self.resumed_digest})
        self.reduce = self._allreduce_mean() if self.world > 1 else None
        self.start_wall = time.monotonic()

    # -- what a method provides -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build the method's own state (controller, architecture parameters) before any checkpoint restore."""

    def weight_parameters(self):
        return self.model.parameters()

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def final_choices(self) -> list[int]:
        """One choice index per decision of ``self.space`` for the result."""
        raise NotImplementedError

    def final_assignment(self) -> tuple[dict, list[dict]]:
        """The result's assignment ``{layer: {"w", "a"}}`` and its per-decision description."""
        choices = self.final_choices()
        return self.space.assignment(choices), self.decisions(choices)

    def finalize(self, assignment: dict) -> None:
        """Put the final assignment on the model that `finish` evaluates (no retraining)."""
        set_assignment(self.layers, assignment)

    def method_state(self) -> dict:
        return {}

    def load_method_state(self, state: dict) -> None:
        pass

    def progress_metrics(self, mean: dict[str, float]) -> dict[str, float]:
        """Metrics logged every ``train.log_every`` steps from the window means of `train_step`'s stats."""
        return {"train_loss": mean["loss"]}

    def final_metrics(self) -> dict[str, float]:
        """Extra final metrics (called on every rank: may use collectives)."""
        return {}

    def final_artifacts(self, logger: RunLogger) -> None:
        """Log method-specific artifacts (rank 0 only)."""

    def decisions(self, choices: list[int]) -> list[dict]:
        return [{"decision": d.name, "choice": d.candidates[c], "probability": 1.0}
                for d, c in zip(self.space.decisions, choices, strict=True)]

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _distributed(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over the workers (the model itself in one process)."""
        if self.world == 1:
            return model
        import ray.train.torch

        # broadcast_buffers=False: each replica keeps its own format buffers (sampled per replica). A supernet's
        # sampled path leaves parameters (skipped blocks) without gradients: DDP must be told to expect that.
        kwargs = {"broadcast_buffers": False, "find_unused_parameters": self.space.searches_architecture}
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=kwargs)

    def _clip_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the weights' gradient norm before every step of ``optimizer``, whatever method steps it: at 2-3
        bits a channel quantized to all zeros meets BatchNorm's 1/sqrt(eps) and the weights explode."""
        clip = self.cfg.train.grad_clip
        if not clip:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def clip_before_step(*_) -> None:  # a step pre-hook must return None
            torch.nn.utils.clip_grad_norm_(params, clip)

        optimizer.register_step_pre_hook(clip_before_step)

    def _device(self) -> torch.device:
        if self.cfg.train.use_gpu and torch.cuda.is_available():
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    def _allreduce_mean(self):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            out = t.detach().clone()
            dist.all_reduce(out)
            return out / self.world

        return reduce

    def _state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "method": self.method, "mlflow_run_id": self.run_id, "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "history": self.history,
                "torch_rng": torch.get_rng_state(), "method_state": self.method_state()}

    def _report(self, metrics: dict, name: str) -> None:
        """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
        if self.rank != 0:
            self.session.report(metrics, None, name)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(self._state(), os.path.join(tmp, CHECKPOINT_FILE))
            self.session.report(metrics, tmp, name)

    def _restore(self) -> None:
        found = self.session.latest_checkpoint()
        if found is None:
            return
        with found as d:
            try:
                state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
            except Exception as err:  # any unreadable file is a corrupt or foreign checkpoint
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise CheckpointError(f"checkpoint {d} is corrupt or not a fliqs checkpoint: {reason}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT \
                or state.get("method") != self.method:
            raise CheckpointError(f"checkpoint {d} is not a {CHECKPOINT_FORMAT} {self.method} checkpoint")
        if state["mlflow_run_id"] != self.run_id:
            raise CheckpointError(f"checkpoint {d} belongs to MLflow run {state['mlflow_run_id']}, not {self.run_id}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_method_state(state["method_state"])
        self.history = state["history"]
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        self.resumed_digest = state_digest(self.method_state())
        if self.rank == 0:
            progress(f"resumed from step {self.step}/{self.total_steps}")

    # -- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> None:
        window: dict[str, list[float]] = {}
        start, start_step = time.monotonic(), self.step
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            for i, (x, y) in enumerate(self.loader):
                if i < skip:
                    continue
                stats = self.train_step((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
                self.scheduler.step()
                if not np.isfinite(stats["loss"]):
                    raise NonFiniteLoss(f"non-finite training loss at step {self.step}; "
                                        f"the last good checkpoint is kept")
                for k, v in stats.items():
                    window.setdefault(k, []).append(v)
                self.step += 1
                if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
                    self._log_progress(epoch, window, (self.step - start_step) / (time.monotonic() - start))
                    window = {}
                if self.step % self.cfg.train.checkpoint_every == 0 and self.step < self.total_steps:
                    self.checkpoint_logged()
                    self._report({"step": self.step, "epoch": epoch}, f"checkpoint_{self.step:07d}")
                if self.step >= self.total_steps:
                    break

    def checkpoint_logged(self) -> None:
        """Hook at every checkpoint (rank 0 logs periodic artifacts here)."""

    def _log_progress(self, epoch: int, window: dict[str, list[float]], rate: float) -> None:
        if self.logger is None:
            return
        mean = {k: float(np.mean(v)) for k, v in window.items()}
        metrics = {**self.progress_metrics(mean), "epoch": epoch}
        self.logger.metrics(metrics, self.step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
        progress(f"{self.method} step {self.step}/{self.total_steps} epoch {epoch} {shown} {rate:.1f} steps/s")

    def test_accuracy(self, split: str = "test") -> float:
        """Exact accuracy on a whole split: each rank takes every world-th sample, counts are summed."""
        data = getattr(self.splits, split)
        shard = Subset(data, range(self.rank, len(data), self.world))
        counts = torch.zeros(2, dtype=torch.float64)
        for x, y in DataLoader(shard, batch_size=self.cfg.data.batch_size):
            x, y = x.to(self.device), y.to(self.device)
            counts += torch.tensor([accuracy(self.model, x, y, self.autocast) * len(y), len(y)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(counts)
        return float(counts[0] / counts[1])

    def finetune(self) -> float | None:
        """Optional short fine-tune of the final assignment, reported apart from the no-retraining result."""
        epochs = self.cfg.train.finetune_epochs
        if epochs <= 0:
            return None
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.train.lr * 0.1,
                                    momentum=self.cfg.train.momentum, weight_decay=self.cfg.train.weight_decay)
        self._clip_gradients(optimizer)
        for epoch in range(epochs):
            self.sampler.set_epoch(self.cfg.train.epochs + epoch)
            losses = [qat_step(self.train_model, optimizer, (x.to(self.device, non_blocking=True),
                                                             y.to(self.device, non_blocking=True)), self.autocast)
                      for x, y in self.loader]
            if self.rank == 0:
                progress(f"fine-tune epoch {epoch + 1}/{epochs} train_loss {np.mean(losses):.4g}")
        return self.test_accuracy()

    def finish(self) -> None:
        """Final assignment, test accuracy with the shared weights (no retraining), artifacts, final report."""
        assignment, decisions = self.final_assignment()
        self.finalize(assignment)
        test_acc = self.test_accuracy()
        summary = summarize(list(self.shapes), assignment, total_params=self.total_params)
        layers = get_assignment(self.layers)
        # The whole validation split too: what a multi-trial search may select candidates on (never the test split).
        metrics = {"test_accuracy": test_acc, "validation_accuracy": self.test_accuracy("val"),
                   "gbops": summary.gbops, "size_mb": summary.size_mb,
                   "gmacs": summary.gmacs, "target": self.target, **self.final_metrics()}
        if self.logger is not None:
            self.final_artifacts(self.logger)
        finetuned = self.finetune()
        if finetuned is not None:
            metrics["test_accuracy_finetuned"] = finetuned
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}  # text goes in the report only
        epochs = self.cfg.train.epochs + self.cfg.train.finetune_epochs
        wall = time.monotonic() - self.start_wall
        accounting = {"epochs": epochs, "train_wall_s": wall, "worker_s": wall * self.world,
                      "peak_memory_mb": peak_memory_mb(self.device)}
        if self.logger is not None:
            self.logger.metrics({**numeric, **accounting}, self.total_steps)
            self.logger.json_artifact("assignment.json", {"assignment": layers, "decisions": decisions,
                                                          "gbops": summary.gbops, "size_mb": summary.size_mb})
        self._report({**metrics, **accounting, "steps": self.total_steps, "assignment": json.dumps(layers),
                      "decisions": json.dumps(decisions)}, FINAL_CHECKPOINT)


def run_loop(run_class: type[TrainRun]):
    """A Ray Train entry point for ``run_class``. ``config``: {"cfg": resolved config dict, "run_id",
    "tracking_uri", "target", method-specific keys}."""

    def train_loop(config: dict) -> None:
        run = run_class(config, RaySession())
        run.train()
        run.finish()

    train_loop.__name__ = f"train_{run_class.__name__}"
    return train_loop


def run_in_process(run_class: type[TrainRun], config: dict, root: Path) -> dict:
    """The same run in this process (no Ray Train), checkpointing under ``root``; returns the final metrics."""
    session = LocalSession(root)
    run = run_class(config, session)
    run.train()
    run.finish()
    return session.metrics
