"""Accuracy of one batch (a search's quality signal) and of a whole split (every reported number), and the
statistics a network carries between training and evaluation: BatchNorm's running statistics and the calibrated
activation ranges.

* `accuracy` with ``stateless_bn=True`` measures the network as it is *now sampled*: BatchNorm normalises with the
  batch's own statistics and updates nothing, activation ranges come from the batch (TuNAS' stateless BatchNorm).
  Running statistics mix every assignment sampled over the last few hundred steps; a reward read through them
  would depend on what was sampled before, not on the sample.
* `split_accuracy` shards a split across replicas by whole batches of the same sequential batching, so a
  distributed evaluation sees exactly the batches a single process sees (activation ranges that follow the batch
  then give the same predictions).
* `sync_buffers` averages the running statistics over the replicas, so every replica holds the model that rank 0
  saves; `recalibrate` re-estimates them for the final network: the calibrated activation ranges (static scales,
  as hardware deploys them) and BatchNorm's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fliqs.quant.layers import FormatQuantizer
from fliqs.quant.policy import RangeMode


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def stateless(model: nn.Module) -> Iterator[None]:
    """Evaluation mode, except BatchNorm (batch statistics, no running update) and activation quantizers (batch
    range, no EMA update); every mode and flag is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    norms = _norms(model)
    quantizers = [m for m in model.modules() if isinstance(m, FormatQuantizer)]
    tracking = [m.track_running_stats for m in norms]
    ranges = [q.track_range for q in quantizers]
    model.eval()
    try:
        for m in norms:
            m.train()
            m.track_running_stats = False
        for q in quantizers:
            q.train()
            q.track_range = False
        yield
    finally:
        for m, flag in zip(norms, tracking, strict=True):
            m.track_running_stats = flag
        for q, flag in zip(quantizers, ranges, strict=True):
            q.track_range = flag
        for m, mode in modes.items():
            m.training = mode


def _predict(model: nn.Module, x: torch.Tensor, autocast) -> torch.Tensor:
    with autocast or nullcontext():
        return model(x).argmax(-1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.autocast | None = None,
             stateless_bn: bool = False) -> float:
    """Fraction of ``x`` classified as ``y``: in evaluation mode, or `stateless` (the mode is restored)."""
    was_training = model.training
    mode = stateless(model) if stateless_bn else nullcontext()
    if not stateless_bn:
        model.eval()
    try:
        with mode:
            return (_predict(model, x, autocast) == y).float().mean().item()
    finally:
        if not stateless_bn:
            model.train(was_training)


def batch_shard(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The sample indices of batches ``rank, rank + world, ...`` of ``range(n)`` cut into batches of ``batch_size``."""
    return [i for b in range(rank, -(-n // batch_size), world) for i in range(b * batch_size,
                                                                              min(n, (b + 1) * batch_size))]


@torch.no_grad()
def split_accuracy(model: nn.Module, data: Dataset, batch_size: int, device: torch.device | str = "cpu",
                   autocast: torch.autocast | None = None, rank: int = 0, world: int = 1,
                   all_reduce: Callable[[torch.Tensor], object] | None = None) -> float:
    """Exact accuracy on a whole split, in evaluation mode. With ``world > 1`` each rank counts its `batch_shard`
    and ``all_reduce`` (sum in place, e.g. ``torch.distributed.all_reduce``) adds the counts of all ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    try:
        shard = data if world == 1 else Subset(data, batch_shard(len(data), batch_size, rank, world))
        for x, y in DataLoader(shard, batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            counts += torch.tensor([int((_predict(model, x, autocast) == y).sum()), len(y)], dtype=torch.float64)
    finally:
        model.train(was_training)
    if all_reduce is not None:
        all_reduce(counts)
    return float(counts[0] / counts[1])


def statistics(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a replica accumulates on its own: BatchNorm running means and variances, calibrated ranges."""
    out = []
    for m in _norms(model):
        if m.running_mean is not None:
            out += [m.running_mean, m.running_var]
    return out + [q.running_amax for q in model.modules() if isinstance(q, FormatQuantizer)]


@torch.no_grad()
def sync_buffers(model: nn.Module, world: int) -> None:
    """Average `statistics` over the replicas (a collective: every rank calls it), so each holds the same model."""
    if world <= 1:
        return
    for buffer in statistics(model):
        dist.all_reduce(buffer)
        buffer.div_(world)


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Callable[[], Iterator[torch.Tensor]], n: int,
                autocast: torch.autocast | None = None, sync: Callable[[], object] | None = None) -> bool:
    """Re-estimate the final network's statistics on ``n`` input batches (``batches()`` gives a fresh iterator
    over the same samples each time it is called; random augmentations may differ), as cumulative averages; weights
    are not touched. ``sync`` (the replicas' average, `sync_buffers`) runs after each pass, so that BatchNorm is
    estimated with the ranges every replica ends with.

    1. Calibrated activation ranges (`RangeMode.ema` quantizers): each batch quantized with its own range while the
       average of those ranges is taken, BatchNorm estimated alongside;
    2. BatchNorm's running statistics, everything else in evaluation mode (activations quantized with the ranges
       just calibrated, as at evaluation and in an export).

    Returns whether anything was recalibrated."""
    norms = _norms(model)
    calibrated = [q for q in model.modules() if isinstance(q, FormatQuantizer) and q.per_channel_axis is None
                  and q.range_mode is RangeMode.ema]
    if n <= 0 or not (norms or calibrated):
        return False
    if calibrated:
        with _estimating(model, norms, calibrated):
            _forward(model, batches(), n, autocast)
        if sync is not None:
            sync()
    if norms:
        with _estimating(model, norms, []):
            _forward(model, batches(), n, autocast)
        if sync is not None:
            sync()
    return True


def _forward(model: nn.Module, batches: Iterator[torch.Tensor], n: int, autocast) -> None:
    for _ in range(n):
        with autocast or nullcontext():
            model(next(batches))


@contextmanager
def _estimating(model: nn.Module, norms: list, quantizers: list[FormatQuantizer]) -> Iterator[None]:
    """Evaluation mode but for BatchNorm and ``quantizers``, which start their running estimates afresh as
    cumulative averages; modes and momenta are restored afterwards."""
    momenta = [m.momentum for m in norms]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for q in quantizers:
            q.running_amax.zero_()
            q.calibrated_batches = 0
            q.train()
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for q in quantizers:
            q.calibrated_batches = None
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def dynamic_ranges(model: nn.Module) -> Iterator[None]:
    """Every activation quantizer in `RangeMode.dynamic` (each batch's own range) for the duration: the accuracy a
    search trained with, reported beside the deployable (calibrated) one."""
    quantizers = [q for q in model.modules() if isinstance(q, FormatQuantizer) and q.per_channel_axis is None]
    modes = [q.range_mode for q in quantizers]
    try:
        for q in quantizers:
            q.range_mode = RangeMode.dynamic
        yield
    finally:
        for q, mode in zip(quantizers, modes, strict=True):
            q.range_mode = mode
