"""A study's methods at each budget (`fliqs.analysis.budgets`): budgets, accuracy at budget, landed cost / target and
the windowed hypervolume, by hand and against an independent numeric integral; and the issue they answer: a cheap,
inaccurate point below its target wins the whole-front hypervolume but not the comparison at budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fliqs.analysis.budgets import (
    NONE_WITHIN,
    Budget,
    accuracy_at_budget,
    attainment,
    budget_report,
    budget_tables,
    budgets,
    format_at_budget,
    format_landed,
    landed_cost,
    windowed_hypervolume,
    within_budget,
)
from fliqs.analysis.fronts import hypervolume_by_method
from fliqs.analysis.points import Point

SETTINGS = settings(max_examples=150, deadline=None)
GRID_COST = [1.0, 2.0, 2.0, 8.0]


def _p(method: str, accuracy: float, cost: float, target: float | None, seed: int = 0, fraction=None,
       family: str = "one-shot", label: str = "") -> Point:
    return Point(method, family, accuracy, cost, run_id=f"{method}-{cost}-{seed}", seed=seed, label=label,
                 target=target, target_fraction=fraction)


# Budgets 10 GBOPs (0.25 x int8) and 20 GBOPs (0.5 x int8).
AT_BUDGET = [
    # on budget: seed 0 exactly on 10, seed 1 a hair above 10 (within 1e-9 relative); target 10 (1 + 1e-10) is 10
    _p("onbudget", 0.80, 10.0, 10.0, 0, 0.25), _p("onbudget", 0.90, 20.0, 20.0, 0, 0.5),
    _p("onbudget", 0.70, 10.0 * (1 + 5e-10), 10.0 * (1 + 1e-10), 1, 0.25), _p("onbudget", 0.88, 19.0, 20.0, 1, 0.5),
    # aimed at 10, landed above it: none within 10, but it counts for 20
    _p("over", 0.95, 12.0, 10.0, 0, 0.25),
    # uniform formats: no target, counted by their cost
    _p("uniform", 0.85, 15.0, None, 0, family="uniform", label="int4"),
    _p("uniform", 0.97, 30.0, None, 0, family="uniform", label="int8"),
    # seed 0 within 10, seed 1 above it
    _p("halfseeds", 0.60, 9.0, 10.0, 0, 0.25), _p("halfseeds", 0.65, 11.0, 10.0, 1, 0.25),
]


def _of(method: str) -> list[Point]:
    return [p for p in AT_BUDGET if p.method == method]


def test_budgets_are_the_distinct_targets_sorted_and_labelled():
    assert budgets(AT_BUDGET) == [Budget(10.0, 0.25), Budget(20.0, 0.5)]  # 10 (1 + 1e-10) is 10
    more = [*AT_BUDGET, _p("x", 0.5, 1.0, 40.0), _p("x", 0.5, 1.0, 10.0 * (1 + 1e-6))]  # apart: new budgets
    assert [b.gbops for b in budgets(more)] == [10.0, pytest.approx(10.00001), 20.0, 40.0]
    assert [b.label for b in budgets(more)] == ["0.25x int8", "10 GBOPs", "0.5x int8", "40 GBOPs"]
    assert Budget(30.0, 0.12).label == "0.12x int8" and Budget(30.0, 0.12).key == "0.12x"
    assert Budget(30.0).key == "30gbops"
    assert budgets([_p("uniform", 0.9, 1.0, None)]) == []
    assert within_budget(10.0 * (1 + 5e-10), 10.0) and not within_budget(10.0 * (1 + 2e-9), 10.0)


def test_accuracy_at_budget_by_hand():
    on = _of("onbudget")
    # B=10: seed 0 has 0.80 (cost exactly 10), seed 1 0.70 (10 x (1 + 5e-10) counts): mean 0.75,
    # std sqrt((0.05^2 + 0.05^2) / 1) = 0.05 sqrt(2)
    at10 = accuracy_at_budget(on, 10.0)
    assert at10["mean"] == pytest.approx(0.75) and at10["std"] == pytest.approx(0.05 * math.sqrt(2))
    assert (at10["seeds_within"], at10["seeds"]) == (2, 2) and at10["by_seed"] == {"0": 0.80, "1": 0.70}
    # B=20: seed 0 max(0.80, 0.90) = 0.90, seed 1 max(0.70, 0.88) = 0.88: mean 0.89, std 0.01 sqrt(2)
    at20 = accuracy_at_budget(on, 20.0)
    assert at20["mean"] == pytest.approx(0.89) and at20["std"] == pytest.approx(0.01 * math.sqrt(2))
    # over: its only point (12 GBOPs) is above 10: none, not 0; at 20 it counts whatever it was aimed at
    assert accuracy_at_budget(_of("over"), 10.0) == {"mean": None, "std": None, "seeds_within": 0, "seeds": 1,
                                                     "by_seed": {"0": None}}
    assert accuracy_at_budget(_of("over"), 20.0)["mean"] == 0.95
    # uniform: int4 (15 GBOPs) is over 10, within 20; int8 (30) within neither
    assert accuracy_at_budget(_of("uniform"), 10.0)["mean"] is None
    assert accuracy_at_budget(_of("uniform"), 20.0)["mean"] == 0.85
    # halfseeds at 10: seed 0 0.60 (9 GBOPs), seed 1 nothing (11 GBOPs): 0.60 +- 0 from 1 of 2 seeds
    half = accuracy_at_budget(_of("halfseeds"), 10.0)
    assert (half["mean"], half["std"], half["seeds_within"], half["seeds"]) == (0.60, 0.0, 1, 2)
    assert half["by_seed"] == {"0": 0.60, "1": None}
    # at 20 both seeds: (0.60 + 0.65) / 2
    assert accuracy_at_budget(_of("halfseeds"), 20.0)["mean"] == pytest.approx(0.625)


def test_budget_report_and_its_text_say_none_within_budget():
    report = budget_report(AT_BUDGET)
    assert report["budgets"] == [{"gbops": 10.0, "fraction": 0.25, "label": "0.25x int8"},
                                 {"gbops": 20.0, "fraction": 0.5, "label": "0.5x int8"}]
    assert report["window"] == {"lo_gbops": 10.0, "hi_gbops": 20.0}
    over = report["methods"]["over"]["accuracy_at_budget"]
    assert [e["mean"] for e in over] == [None, 0.95] and [e["label"] for e in over] == ["0.25x int8", "0.5x int8"]
    assert format_at_budget(over[0]) == NONE_WITHIN == "none within budget"
    assert format_at_budget(report["methods"]["halfseeds"]["accuracy_at_budget"][0]) == "0.600 +- 0.000 (1/2)"
    assert format_at_budget({"mean": 0.952, "std": 0.017, "seeds_within": 3, "seeds": 3}) == "0.952 +- 0.017 (3/3)"
    assert report["methods"]["uniform"]["landed_cost_ratio"] == []  # no targets
    text = budget_tables(report)
    assert "accuracy at budget" in text and "0.25x int8 (10 GBOPs)" in text and "landed cost / target" in text
    over_row = next(line for line in text.splitlines() if line.startswith("over "))
    assert over_row.count(NONE_WITHIN) == 1 and "0.950 +- 0.000 (1/1)" in over_row
    uniform_rows = [line for line in text.splitlines() if line.startswith("uniform ")]
    assert len(uniform_rows) == 1, "uniform has no targets: in the accuracy table, not in the landed one"
    assert uniform_rows[0].count(NONE_WITHIN) == 1 and "0.850 +- 0.000 (1/1)" in uniform_rows[0]
    # no targets at all (uniform formats only): said so, no window
    only_uniform = budget_report(_of("uniform"))
    assert only_uniform["budgets"] == [] and only_uniform["window"] is None
    assert only_uniform["methods"]["uniform"]["windowed_hypervolume"] is None
    assert "no trial has a cost target" in budget_tables(only_uniform)


def test_landed_cost_over_target_by_hand():
    pts = [_p("m", 0.9, 8.0, 10.0, 0), _p("m", 0.9, 11.0, 10.0, 1), _p("m", 0.9, 10.0, 10.0, 2),
           _p("m", 0.9, 20.0 * (1 + 5e-10), 20.0, 0), _p("m", 0.9, 21.0, 20.0, 1),
           _p("u", 0.9, 9.0, None, 0, family="uniform", label="int4")]
    at10 = landed_cost(pts[:5], 10.0)
    # 8/10, 11/10, 10/10: mean (0.8 + 1.1 + 1.0) / 3 = 0.96667; deviations -0.16667, 0.13333, 0.03333:
    # std sqrt((0.027778 + 0.017778 + 0.001111) / 2) = sqrt(0.023333) = 0.15275; over: only 11 (10 exactly is on it)
    assert at10["ratios"] == pytest.approx([0.8, 1.1, 1.0])
    assert at10["mean"] == pytest.approx(2.9 / 3) and at10["std"] == pytest.approx(math.sqrt(0.07 / 3))
    assert (at10["max"], at10["over"], at10["points"]) == (pytest.approx(1.1), 1, 3)
    at20 = landed_cost(pts[:5], 20.0)
    # 20 (1 + 5e-10) / 20 ~ 1 (within: not over), 21 / 20 = 1.05: mean 1.025, std 0.025 sqrt(2), 1 over
    assert at20["mean"] == pytest.approx(1.025) and at20["std"] == pytest.approx(0.025 * math.sqrt(2))
    assert (at20["max"], at20["over"]) == (pytest.approx(1.05), 1)
    assert landed_cost(pts[5:], 10.0) is None and landed_cost(pts[:5], 15.0) is None
    assert format_landed(at20) == "1.025 +- 0.035, max 1.050, 1/2 over" and format_landed(None) == "-"
    landed = budget_report(pts)["methods"]["m"]["landed_cost_ratio"]
    assert [(e["gbops"], e["points"], e["over"]) for e in landed] == [(10.0, 3, 1), (20.0, 2, 1)]


def test_windowed_hypervolume_by_hand():
    pts = [_p("m", 0.5, 5.0, None), _p("m", 0.8, 12.0, None), _p("m", 0.9, 18.0, None), _p("m", 0.99, 25.0, None)]
    # over [10, 20]: a = 0.5 on [10, 12), 0.8 on [12, 18), 0.9 on [18, 20]: (2 x 0.5 + 6 x 0.8 + 2 x 0.9) / 10
    assert windowed_hypervolume(pts, 10.0, 20.0) == pytest.approx((1.0 + 4.8 + 1.8) / 10)
    # nothing below the window: a = 0 on [10, 15), 0.7 on [15, 20]: 5 x 0.7 / 10
    assert windowed_hypervolume([_p("m", 0.7, 15.0, None)], 10.0, 20.0) == pytest.approx(0.35)
    assert windowed_hypervolume([], 10.0, 20.0) == 0.0
    # one budget: the accuracy at that budget (a point exactly on it counts)
    assert windowed_hypervolume(pts, 12.0, 12.0) == 0.8 == attainment(pts, 12.0)
    assert windowed_hypervolume(pts, 11.0, 11.0) == 0.5 and windowed_hypervolume(pts, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        windowed_hypervolume(pts, 20.0, 10.0)
    # per seed and all seeds together, over the study's window [10, 20] (targets 10 and 20)
    seeded = [_p("m", 0.8, 10.0, 10.0, 0), _p("m", 0.9, 15.0, 20.0, 1), _p("m", 0.6, 20.0, 20.0, 0)]
    entry = budget_report(seeded)["methods"]["m"]
    # seed 0: 0.8 over the whole window = 0.8; seed 1: 0 on [10, 15), 0.9 on [15, 20] = 0.45;
    # all: 0.8 on [10, 15), 0.9 on [15, 20] = 0.85; mean (0.8 + 0.45) / 2 = 0.625, std 0.35 / sqrt(2)
    assert entry["windowed_hypervolume"] == pytest.approx(0.85)
    assert entry["windowed_hypervolume_by_seed"] == pytest.approx({"0": 0.8, "1": 0.45})
    assert entry["windowed_hypervolume_mean"] == pytest.approx(0.625)
    assert entry["windowed_hypervolume_std"] == pytest.approx(0.35 / math.sqrt(2))


def _midpoint(points: list[Point], lo: float, hi: float, n: int) -> float:
    """Independent integral: the attainment function at the midpoints of n equal cells of [lo, hi], averaged."""
    mids = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    cost = np.array([p.cost for p in points] or [np.inf])
    acc = np.array([p.accuracy for p in points] or [0.0])
    return float(np.where(cost[None, :] <= mids[:, None], acc[None, :], 0.0).max(axis=1).mean())


points_st = st.lists(st.builds(_p, method=st.just("m"), accuracy=st.floats(0.0, 1.0),
                               cost=st.one_of(st.floats(0.5, 50.0), st.sampled_from(GRID_COST)),
                               target=st.none()), max_size=12)


@SETTINGS
@given(points_st, st.floats(0.5, 40.0), st.floats(0.01, 30.0))
def test_windowed_hypervolume_matches_a_midpoint_integral(points, lo, width):
    hi, cells = lo + width, 4000
    hv = windowed_hypervolume(points, lo, hi)
    # a is a staircase with at most len(points) steps of height <= 1: each misplaces at most one cell of 1 / cells
    assert hv == pytest.approx(_midpoint(points, lo, hi, cells), abs=len(points) / cells + 1e-12)
    assert attainment(points, lo) - 1e-6 <= hv <= attainment(points, hi) + 1e-12  # the mean of a rising a
    best = max((p.accuracy for p in points), default=0.0)
    assert windowed_hypervolume([*points, _p("m", best, lo, None)], lo, hi) == pytest.approx(best)


def test_a_cheap_point_below_its_target_wins_the_whole_front_but_not_at_budget():
    """The issue: A aimed at 10 GBOPs and landed at 2 (accuracy 0.5); B was more accurate at 10 and at 20."""
    pts = [_p("A", 0.50, 2.0, 10.0, fraction=0.25), _p("A", 0.80, 20.0, 20.0, fraction=0.5),
           _p("B", 0.85, 10.0, 10.0, fraction=0.25), _p("B", 0.90, 20.0, 20.0, fraction=0.5)]
    hv = hypervolume_by_method(pts)
    # reference 1.1 x 20 = 22: A (20 - 2) x 0.5 + (22 - 20) x 0.8 = 10.6; B (20 - 10) x 0.85 + 2 x 0.9 = 10.3
    assert hv["A"] == pytest.approx(10.6) and hv["B"] == pytest.approx(10.3) and hv["A"] > hv["B"]
    methods = budget_report(pts)["methods"]
    # window [10, 20]: A 0.5 on [10, 20) and 0.8 at 20 = 0.5; B 0.85 on [10, 20) and 0.9 at 20 = 0.85
    assert methods["A"]["windowed_hypervolume"] == pytest.approx(0.5)
    assert methods["B"]["windowed_hypervolume"] == pytest.approx(0.85)
    a_at = [e["mean"] for e in methods["A"]["accuracy_at_budget"]]
    b_at = [e["mean"] for e in methods["B"]["accuracy_at_budget"]]
    assert a_at == [0.50, 0.80] and b_at == [0.85, 0.90]
    assert all(b > a for a, b in zip(a_at, b_at, strict=True))
    # and A landed at a fifth of its first target
    assert methods["A"]["landed_cost_ratio"][0]["mean"] == pytest.approx(0.2)
