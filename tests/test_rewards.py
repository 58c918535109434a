"""Reward functions and the cosine entropy ramp (fliqs.searchers.rewards) against hand-computed values."""

from __future__ import annotations

import math

import pytest

from fliqs.searchers.rewards import (
    REWARDS,
    absolute,
    entropy_weight,
    get_reward,
    mnas_hard,
    mnas_soft,
    one_sided,
)

# (quality, cost, target, beta, expected) worked out by hand.
ABSOLUTE = [
    (0.8, 1.5, 1.0, -0.1, 0.75),  # 50 % over target
    (0.8, 0.5, 1.0, -0.1, 0.75),  # 50 % under target: the same penalty
    (0.8, 1.0, 1.0, -0.1, 0.8),  # at target: no penalty
    (0.9, 3.0, 2.0, -0.2, 0.8),  # 0.9 - 0.2 * 0.5
    (0.9, 1.0, 2.0, -0.2, 0.8),  # 0.9 - 0.2 * 0.5, below
    (0.5, 4.0, 1.0, -1.0, -2.5),  # 0.5 - 1.0 * 3
]
ONE_SIDED = [
    (0.8, 1.5, 1.0, -0.1, 0.75),
    (0.8, 0.5, 1.0, -0.1, 0.8),  # under target: no bonus, no penalty
    (0.8, 0.01, 1.0, -0.1, 0.8),
    (0.8, 1.0, 1.0, -0.1, 0.8),
    (0.9, 3.0, 2.0, -0.2, 0.8),
    (0.5, 4.0, 1.0, -1.0, -2.5),
]
MNAS_SOFT = [
    (0.8, 2.0, 1.0, -1.0, 0.4),  # 0.8 * 2 ** -1
    (0.8, 0.5, 1.0, -1.0, 1.6),  # 0.8 * 0.5 ** -1: bonus below target
    (0.8, 1.0, 1.0, -1.0, 0.8),
    (0.9, 4.0, 1.0, -0.5, 0.45),  # 0.9 * 4 ** -0.5
    (0.9, 0.25, 1.0, -0.5, 1.8),  # 0.9 * 0.25 ** -0.5
    (0.6, 3.0, 1.5, -0.07, 0.6 * 2.0 ** -0.07),
]
MNAS_HARD = [
    (0.8, 2.0, 1.0, -1.0, 0.4),
    (0.8, 0.5, 1.0, -1.0, 0.8),  # no bonus below target
    (0.8, 1.0, 1.0, -1.0, 0.8),
    (0.9, 4.0, 1.0, -0.5, 0.45),
    (0.9, 0.25, 1.0, -0.5, 0.9),
    (0.6, 3.0, 1.5, -0.07, 0.6 * 2.0 ** -0.07),
]


@pytest.mark.parametrize(("fn", "cases"), [(absolute, ABSOLUTE), (one_sided, ONE_SIDED),
                                           (mnas_soft, MNAS_SOFT), (mnas_hard, MNAS_HARD)],
                         ids=["absolute", "one_sided", "mnas_soft", "mnas_hard"])
def test_reward_hand_values(fn, cases):
    for quality, cost, target, beta, expected in cases:
        assert fn(quality, cost, target, beta) == pytest.approx(expected, rel=1e-12, abs=1e-12), (
            fn.__name__, quality, cost, target, beta)


def test_absolute_is_symmetric_around_target():
    for delta in (0.05, 0.3, 0.9):
        above = absolute(0.7, 2.0 * (1 + delta), 2.0, -0.1)
        below = absolute(0.7, 2.0 * (1 - delta), 2.0, -0.1)
        assert above == pytest.approx(below, rel=1e-12)
        assert above < 0.7
    # Farther from the target is worse, on both sides.
    assert absolute(0.7, 1.2, 1.0, -0.1) > absolute(0.7, 1.5, 1.0, -0.1)
    assert absolute(0.7, 0.8, 1.0, -0.1) > absolute(0.7, 0.5, 1.0, -0.1)


@pytest.mark.parametrize("fn", [one_sided, mnas_hard])
def test_no_bonus_or_penalty_below_target(fn):
    for cost in (0.01, 0.3, 0.99, 1.0):
        assert fn(0.7, cost, 1.0, -0.3) == pytest.approx(0.7, rel=1e-12)
    assert fn(0.7, 1.01, 1.0, -0.3) < 0.7


def test_mnas_soft_rewards_undershooting():
    assert mnas_soft(0.7, 0.5, 1.0, -0.3) > 0.7 > mnas_soft(0.7, 2.0, 1.0, -0.3)


def test_beta_zero_means_no_cost_pressure():
    for fn in REWARDS.values():
        for cost in (0.1, 1.0, 7.0):
            assert fn(0.63, cost, 1.0, 0.0) == pytest.approx(0.63, rel=1e-12)


def test_get_reward_by_name():
    assert set(REWARDS) == {"absolute", "one_sided", "mnas_soft", "mnas_hard"}
    assert get_reward("absolute") is absolute
    assert get_reward("one_sided") is one_sided
    assert get_reward("mnas_soft") is mnas_soft
    assert get_reward("mnas_hard") is mnas_hard


def test_get_reward_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="unknown reward 'tunas'") as err:
        get_reward("tunas")
    for name in ("absolute", "one_sided", "mnas_soft", "mnas_hard"):
        assert name in str(err.value)


# ---------------------------------------------------------------- cosine entropy ramp

T_D, T, BETA_MAX = 100, 300, 0.5


def test_entropy_weight_zero_through_warmup():
    for step in (0, 1, 50, 99, T_D):
        assert entropy_weight(step, T_D, T, BETA_MAX) == 0.0
    assert entropy_weight(T_D + 1, T_D, T, BETA_MAX) > 0.0


def test_entropy_weight_hand_values():
    assert entropy_weight((T_D + T) // 2, T_D, T, BETA_MAX) == pytest.approx(BETA_MAX / 2, rel=1e-12)
    assert entropy_weight(T, T_D, T, BETA_MAX) == pytest.approx(BETA_MAX, rel=1e-12)
    # A quarter of the way: beta_max * (1 - cos(pi / 4)) / 2.
    assert entropy_weight(150, T_D, T, BETA_MAX) == pytest.approx(BETA_MAX * (1 - math.sqrt(0.5)) / 2, rel=1e-12)
    assert entropy_weight(250, T_D, T, BETA_MAX) == pytest.approx(BETA_MAX * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    # Other beta_max and no warm-up at all.
    assert entropy_weight(50, 0, 100, 2.0) == pytest.approx(1.0, rel=1e-12)
    assert entropy_weight(100, 0, 100, 2.0) == pytest.approx(2.0, rel=1e-12)


def test_entropy_weight_monotone_and_bounded():
    values = [entropy_weight(step, T_D, T, BETA_MAX) for step in range(0, T + 1)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert all(0.0 <= v <= BETA_MAX + 1e-15 for v in values)
    # Strictly increasing after the warm-up (a cosine ramp, not a step).
    assert all(b > a for a, b in zip(values[T_D:], values[T_D + 1:], strict=False))
    # Past the end it stays at beta_max.
    assert entropy_weight(T + 50, T_D, T, BETA_MAX) == pytest.approx(BETA_MAX, rel=1e-12)


def test_entropy_weight_degenerate_schedule():
    # Warm-up as long as training: never any entropy pressure (and no division by zero).
    assert entropy_weight(10, 10, 10, BETA_MAX) == 0.0
    assert entropy_weight(20, 10, 10, BETA_MAX) == 0.0
