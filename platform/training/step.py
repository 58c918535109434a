"""The one training step every method shares: the classification loss of a batch, and one descent on a loss.

QAT of a fixed assignment (`train_step`), the FLIQS step (`fliqs.searchers.reinforce`: the same step under the sampled
formats) and the differentiable searches (`fliqs.searchers.relaxed`: their own objective, the same descent) all go
through these two functions.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                        autocast: torch.autocast | None = None) -> torch.Tensor:
    """Cross-entropy of ``model`` on ``batch`` (in float32 whatever the autocast dtype)."""
    x, y = batch
    with autocast or nullcontext():
        return F.cross_entropy(model(x).float(), y)


def descend(loss: torch.Tensor, *optimizers: torch.optim.Optimizer,
            before_step: Callable[[], None] | None = None) -> None:
    """One step of every optimizer on ``loss``'s gradients (each starts from zero gradients); ``before_step`` runs
    between the backward pass and the steps (an all-reduce of gradients that DDP does not own)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    for optimizer in optimizers:
        optimizer.step()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
               autocast: torch.autocast | None = None) -> float:
    """One training step of ``model`` at the formats currently set on it; returns the loss."""
    model.train()
    loss = classification_loss(model, batch, autocast)
    descend(loss, optimizer)
    return loss.item()
