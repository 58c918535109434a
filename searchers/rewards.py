"""Reward functions: quality traded against cost. Pure functions of (quality, cost, target, beta).

``beta < 0`` in every form (TuNAS default -0.10; MnasNet uses about -0.07 for the soft form).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fliqs.choices import Choice


class RewardKind(Choice):
    """How quality is traded against cost (the functions below, by name)."""

    absolute = "absolute"  # TuNAS: Q + beta * |C/C_T - 1|
    one_sided = "one_sided"  # Q + beta * max(0, C/C_T - 1)
    mnas_soft = "mnas_soft"  # Q * (C/C_T) ** beta
    mnas_hard = "mnas_hard"  # Q * min(1, (C/C_T) ** beta)


class CostKind(Choice):
    """What a cost target measures."""

    bops = "bops"  # GBOPs: MACs x weight bits x activation bits
    size = "size"  # model size in MB


class QualityKind(Choice):
    """The quality a one-shot controller's reward reads."""

    val_accuracy = "val_accuracy"  # accuracy on a held-out validation batch after the weight update (TuNAS)
    neg_train_loss = "neg_train_loss"  # minus the training loss of the same batch (public FLIQS code)


def absolute(quality: float, cost: float, target: float, beta: float) -> float:
    """TuNAS "absolute": penalise any deviation from the target, above or below."""
    return quality + beta * abs(cost / target - 1.0)


def one_sided(quality: float, cost: float, target: float, beta: float) -> float:
    """Penalise only cost above the target."""
    return quality + beta * max(0.0, cost / target - 1.0)


def mnas_soft(quality: float, cost: float, target: float, beta: float) -> float:
    """MnasNet soft constraint: Q * (C / C_T) ** beta."""
    return quality * (cost / target) ** beta


def mnas_hard(quality: float, cost: float, target: float, beta: float) -> float:
    """MnasNet hard constraint: Q * min(1, (C / C_T) ** beta): no bonus for undershooting the target."""
    return quality * min(1.0, (cost / target) ** beta)


REWARDS: dict[str, Callable[[float, float, float, float], float]] = {
    f.__name__: f for f in (absolute, one_sided, mnas_soft, mnas_hard)
}


ONE_SIDED = (RewardKind.one_sided, RewardKind.mnas_hard)  # no penalty below the target: a budget, not a target to meet


def get_reward(name: str) -> Callable[[float, float, float, float], float]:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARDS)}") from None


def entropy_weight(step: int, warmup_steps: int, total_steps: int, beta_max: float) -> float:
    """Cosine entropy-penalty ramp: 0 through warm-up, then ``beta_max * (1 - cos(pi * progress)) / 2``.

    The entropy is *penalised* (added to the minimised loss): weak early, strongest at the last step, so the
    policy sharpens as training ends.
    """
    if step <= warmup_steps or total_steps <= warmup_steps:
        return 0.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return beta_max * (1.0 - math.cos(math.pi * progress)) / 2.0
