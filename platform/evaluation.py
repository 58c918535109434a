"""Accuracy: of one batch (a search's quality signal) and of a whole split (every reported number)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset


def _predict(model: nn.Module, x: torch.Tensor, autocast) -> torch.Tensor:
    with autocast or nullcontext():
        return model(x).argmax(-1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.autocast | None = None) -> float:
    """Fraction of ``x`` classified as ``y``, in evaluation mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return (_predict(model, x, autocast) == y).float().mean().item()
    finally:
        model.train(was_training)


@torch.no_grad()
def split_accuracy(model: nn.Module, data: Dataset, batch_size: int, device: torch.device | str = "cpu",
                   autocast: torch.autocast | None = None, rank: int = 0, world: int = 1, all_reduce=None) -> float:
    """Exact accuracy on a whole split. With ``world > 1`` each rank counts every world-th sample and
    ``all_reduce`` (sum in place, e.g. ``torch.distributed.all_reduce``) adds the counts of all ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    try:
        shard = data if world == 1 else Subset(data, range(rank, len(data), world))
        for x, y in DataLoader(shard, batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            counts += torch.tensor([int((_predict(model, x, autocast) == y).sum()), len(y)], dtype=torch.float64)
    finally:
        model.train(was_training)
    if all_reduce is not None:
        all_reduce(counts)
    return float(counts[0] / counts[1])
