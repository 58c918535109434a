"""Ray Train loop for one-shot FLIQS: data-parallel training of one shared network with per-replica sampling.

Each worker samples its own assignment per step (as TuNAS does per replica). Shared weights are all-reduced by
DDP (``broadcast_buffers=False``: the format buffers legitimately differ between replicas); the policy gradient
and the reward fed to the baseline are all-reduced by the controller, so the controller stays identical on
every rank. Rank 0 checkpoints every ``train.checkpoint_every`` steps (and at the end, with the final metrics)
and logs to the MLflow run created by the driver. ``num_workers=0`` runs this same loop in-process.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, Subset

from fliqs.cost import measure_layers, summarize
from fliqs.data import load_data
from fliqs.layers import get_assignment, quantize_model
from fliqs.models import create_model
from fliqs.plots import plot_policy_history
from fliqs.searchers.fliqs import accuracy, expected_search_cost, fliqs_step, make_search
from fliqs.searchers.space import build_space
from fliqs.tracking import RunLogger

CHECKPOINT_FORMAT = "fliqs-oneshot/1"
CHECKPOINT_FILE = "state.pt"
FINAL_CHECKPOINT = "checkpoint_final"


def progress(message: str) -> None:
    """One progress line. Written to the process' real stdout: Ray Train V2 patches ``print`` in workers and,
    when another library wraps ``sys.stdout`` (MLflow does), tees every line twice."""
    sys.__stdout__.write(f"[fliqs] {message}\n")
    sys.__stdout__.flush()


class NonFiniteLoss(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    pass


def build_model_and_space(cfg):
    """Data splits, the model with its quantized layers, measured layer shapes and the search space.

    Deterministic in ``cfg``: the driver calls it to plan, every worker to train, and they agree.
    """
    splits = load_data(cfg.data.name, cfg.data.path, cfg.model.input_size, cfg.data.val_fraction,
                       cfg.data.test_fraction, cfg.data.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes or splits.num_classes,
                         in_chans=splits.in_chans)
    layers = quantize_model(model, default=cfg.quant.default_format, pinned=cfg.quant.pinned,
                            range_mode=cfg.quant.act_range, exclude=cfg.quant.exclude)
    shapes = measure_layers(model, splits.input_size, splits.in_chans)
    space = build_space([layer.name for layer in layers], cfg.space.candidates, shared_wa=cfg.space.shared_wa,
                        weight_only=cfg.space.weight_only, groups=cfg.space.groups, pinned=cfg.quant.pinned,
                        activation_format=cfg.quant.default_format)
    return splits, model, layers, shapes, space


class _Batches:
    """Endless shuffled batches (the per-step validation batch)."""

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


class OneShotRun:
    """One worker's share of a search: built from the config, resumed from a checkpoint if Ray gives one."""

    def __init__(self, config: dict):
        import ray.train

        self.cfg = cfg = OmegaConf.create(config["cfg"])
        self.run_id, self.target = config["run_id"], float(config["target"])
        self.fail_marker = Path(config["fail_marker"]) if config.get("fail_marker") else None
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = self._device()
        self.splits, self.model, layers, self.shapes, space = build_model_and_space(cfg)
        self.model.to(self.device)
        self.total_params = sum(p.numel() for p in self.model.parameters())

        self.sampler = DistributedSampler(self.splits.train, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        self.loader = DataLoader(self.splits.train, batch_size=cfg.data.batch_size, sampler=self.sampler,
                                 drop_last=True, num_workers=cfg.data.loader_workers,
                                 pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        self.search = make_search(space, layers, self.shapes, self.total_params, total_steps=self.total_steps,
                                  target=self.target, cost_kind=cfg.reward.cost, reward_kind=cfg.reward.kind,
                                  beta=cfg.reward.beta, quality=cfg.reward.quality,
                                  controller_kwargs=dict(cfg.controller), autocast=self.autocast)
        self.train_model = self.model
        if self.world > 1:
            import ray.train.torch

            # broadcast_buffers=False: each replica keeps its own sampled format buffers.
            self.train_model = ray.train.torch.prepare_model(
                self.model, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False})
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay, nesterov=True)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, self.total_steps))
        self.history: dict[str, list] = {"steps": [], "probs": []}
        self.step = 0
        self._restore()
        # The sampling stream of a rank is a function of (seed, rank, start step): a resume is deterministic.
        self.generator = torch.Generator().manual_seed(hash((cfg.seed, self.rank, self.step)) % (2**63))
        self.val_batches = _Batches(self.splits.val, cfg.data.batch_size, cfg.seed + 1000 * self.rank + self.step,
                                    self.device)
        self.logger = RunLogger(config["tracking_uri"], self.run_id) if self.rank == 0 else None
        self.reduce = self._allreduce_mean() if self.world > 1 else None

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

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "mlflow_run_id": self.run_id, "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "controller": self.search.controller.state_dict(),
                "history": self.history, "torch_rng": torch.get_rng_state()}

    def _report(self, metrics: dict, name: str) -> None:
        """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(self._state(), os.path.join(tmp, CHECKPOINT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    def _restore(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            try:
                state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
            except Exception as err:  # any unreadable file is a corrupt or foreign checkpoint
                raise CheckpointError(f"checkpoint {ckpt.path} is corrupt or not a fliqs checkpoint: {err}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {ckpt.path} is not a {CHECKPOINT_FORMAT} checkpoint")
        if state["mlflow_run_id"] != self.run_id:
            raise CheckpointError(f"checkpoint {ckpt.path} belongs to MLflow run {state['mlflow_run_id']}, "
                                  f"not {self.run_id}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.search.controller.load_state_dict(state["controller"])
        self.history = state["history"]
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if self.rank == 0:
            progress(f"resumed from step {self.step}/{self.total_steps}")

    # -- training ---------------------------------------------------------------------------------------------
    def _maybe_inject_failure(self) -> None:
        fail_at = self.cfg.train.fail_once_at_step
        if fail_at is None or self.step != fail_at or self.fail_marker is None or self.fail_marker.exists():
            return
        self.fail_marker.write_text(str(self.step))
        raise RuntimeError(f"injected failure at step {self.step} (train.fail_once_at_step)")

    def train(self) -> None:
        window: dict[str, list[float]] = {}
        start, start_step = time.monotonic(), self.step
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            for i, (x, y) in enumerate(self.loader):
                if i < skip:
                    continue
                self._maybe_inject_failure()
                batch = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                stats = fliqs_step(self.train_model, self.search, self.optimizer, batch, self.val_batches.next(),
                                   self.step, self.generator, self.reduce)
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
                    self._log_policy_history()
                    self._report({"step": self.step, "epoch": epoch}, f"checkpoint_{self.step:07d}")
                if self.step >= self.total_steps:
                    break

    def _log_progress(self, epoch: int, window: dict[str, list[float]], rate: float) -> None:
        if self.logger is None:
            return
        mean = {k: float(np.mean(v)) for k, v in window.items()}
        cost_kind = self.cfg.reward.cost
        unit = "gbops" if cost_kind == "bops" else "mb"
        expected = expected_search_cost(self.search, self.shapes, self.total_params, cost_kind)
        probs = self.search.controller.policy.probs().detach()
        self.history["steps"].append(self.step)
        self.history["probs"].append([row[:n].tolist() for row, n in zip(probs, self.search.space.sizes, strict=True)])
        metrics = {"train_loss": mean["loss"], "reward": mean["reward"], "baseline": mean["baseline"],
                   "policy_entropy": mean["entropy"], "entropy_weight": mean["entropy_weight"],
                   f"expected_{unit}": expected, f"sampled_{unit}": mean["sampled_cost"], "epoch": epoch,
                   "val_accuracy" if self.search.quality.value == "val_accuracy" else "quality": mean["quality"]}
        self.logger.metrics(metrics, self.step)
        progress(f"step {self.step}/{self.total_steps} epoch {epoch} loss {mean['loss']:.3f} "
                 f"quality {mean['quality']:.3f} reward {mean['reward']:.3f} entropy {mean['entropy']:.3f} "
                 f"E[{unit}] {expected:.4g} (target {self.target:.4g}) {rate:.1f} steps/s")

    def _log_policy_history(self) -> tuple[list[str], list[list[str]]]:
        """The per-decision format probabilities so far, as a JSON artifact (rewritten at every checkpoint)."""
        names = [d.name for d in self.search.space.decisions]
        cands = [list(d.candidates) for d in self.search.space.decisions]
        if self.logger is not None:
            self.logger.json_artifact("policy_history.json", {"decisions": names, "candidates": cands,
                                                              **self.history})
        return names, cands

    # -- result -----------------------------------------------------------------------------------------------
    def test_accuracy(self) -> float:
        """Exact accuracy on the whole test split: each rank takes every world-th sample, counts are summed."""
        shard = Subset(self.splits.test, range(self.rank, len(self.splits.test), self.world))
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
        self.train_model.train()
        for epoch in range(epochs):
            self.sampler.set_epoch(self.cfg.train.epochs + epoch)
            for x, y in self.loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.autocast or torch.autocast("cpu", enabled=False):
                    loss = F.cross_entropy(self.train_model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return self.test_accuracy()

    def controller_divergence(self) -> float:
        """Largest difference between this rank's policy logits and any other rank's (must be 0)."""
        if self.world == 1:
            return 0.0
        logits = self.search.controller.policy.logits.detach().clone()
        gathered = [torch.empty_like(logits) for _ in range(self.world)]
        dist.all_gather(gathered, logits)
        return max(float((g - logits).abs().max()) for g in gathered)

    def finish(self) -> None:
        """Argmax assignment, test accuracy with the shared weights (no retraining), artifacts, final report."""
        search = self.search
        probs = search.controller.policy.probs().detach()
        divergence = self.controller_divergence()
        choices = search.final_choices()
        assignment = search.apply(choices)
        test_acc = self.test_accuracy()
        summary = summarize(list(self.shapes), assignment, total_params=self.total_params)
        decisions = [{"decision": d.name, "choice": d.candidates[c], "probability": float(probs[i, c]),
                      "probs": dict(zip(d.candidates, probs[i, :len(d.candidates)].tolist(), strict=True))}
                     for i, (d, c) in enumerate(zip(search.space.decisions, choices, strict=True))]
        layers = get_assignment(search.layers)
        metrics = {"test_accuracy": test_acc, "gbops": summary.gbops, "size_mb": summary.size_mb,
                   "gmacs": summary.gmacs, "target": self.target, "controller_divergence": divergence,
                   "final_entropy": search.controller.policy.entropy().detach().item()}
        finetuned = self.finetune()
        if finetuned is not None:
            metrics["test_accuracy_finetuned"] = finetuned
        if self.logger is not None:
            self.logger.metrics(metrics, self.total_steps)
            self.logger.json_artifact("assignment.json", {"assignment": layers, "decisions": decisions,
                                                          "gbops": summary.gbops, "size_mb": summary.size_mb})
            names, cands = self._log_policy_history()
            with tempfile.TemporaryDirectory() as tmp:
                png = plot_policy_history(self.history["steps"], self.history["probs"], names, cands,
                                          Path(tmp) / "policy_probs.png", search.controller.warmup_steps)
                self.logger.artifact(png)
        self._report({**metrics, "steps": self.total_steps, "assignment": json.dumps(layers),
                      "decisions": json.dumps(decisions)}, FINAL_CHECKPOINT)


def train_loop(config: dict) -> None:
    """Ray Train entry point. ``config``: {"cfg": resolved config dict, "run_id", "tracking_uri", "target",
    "fail_marker"}."""
    run = OneShotRun(config)
    run.train()
    run.finish()
