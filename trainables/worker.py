"""What a training method sees and provides on one worker (a Ray Train worker, or this process with
``train.num_workers=0``): the `WorkerContext` it is built from, the `TrainMethod` interface the loop drives, the
`Result` it hands back, and the random streams and endless batches the searches draw from.

A method is a small object: built from the `WorkerContext`, it provides one training step, the metrics it logs, its
checkpointed state and its result (the network to evaluate, with its final formats). The loop
(`fliqs.trainables.loop`) owns everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fliqs.data.datasets import Splits
from fliqs.quant.cost import LayerShape
from fliqs.quant.layers import QuantLayer
from fliqs.run.config import FliqsConfig
from fliqs.run.tracking import RunLogger
from fliqs.trainables.plan import Network
from fliqs.training.evaluation import split_accuracy


@dataclass(frozen=True)
class WorkerJob:
    """What a driver sends every worker of one training run: the typed configuration, the method's class
    (``"module:Class"``), the MLflow run it logs into, the cost target, and the method's keyword arguments."""

    cfg: FliqsConfig
    method: str  # "package.module:TrainMethod"
    run_id: str
    tracking_uri: str
    target: float  # GBOPs or MB (`fliqs.trainables.plan.Plan.target`)
    args: dict[str, Any] = field(default_factory=dict)


def derived_seed(*keys: int) -> int:
    """A seed for the random stream named by ``keys`` (e.g. seed, rank, step): distinct keys give independent
    streams, where ``seed + 1000 * rank + step`` would collide (rank 1, step 0 = rank 0, step 1000)."""
    entropy = [int(k) % 2**64 for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] % 2**63)


@dataclass
class WorkerContext:
    """Everything a method may use on one worker; built by the loop before the method."""

    cfg: FliqsConfig
    rank: int
    world: int
    device: torch.device
    splits: Splits
    net: Network
    total_steps: int
    target: float  # the cost target, GBOPs or MB
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

    def __init__(self, worker: WorkerContext):
        self.worker = worker

    @classmethod
    def split_train(cls, cfg: FliqsConfig, data: Dataset) -> tuple[Dataset, Dataset | None]:
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
