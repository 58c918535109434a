"""The integer program (`fliqs.searchers.program`) against brute force: linear costs, pairwise (bilinear) costs, the
boundary of the budget, and a budget nothing fits."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fliqs.errors import BadInput
from fliqs.run.loading import load_config
from fliqs.searchers.program import program_cost, program_costs, program_score, solve
from fliqs.searchers.space import assignment_cost
from fliqs.trainables.plan import make_plan


def brute_force(score_table, costs, budget, const=0.0, pairs=None, lower=-math.inf):
    """(least score, choices) over every assignment within [lower, budget] (same summation order as the solver)."""
    best = None
    for choices in itertools.product(*(range(len(row)) for row in score_table)):
        if lower <= program_cost(costs, choices, const, pairs) <= budget:
            s = program_score(score_table, choices)
            if best is None or s < best[0]:
                best = (s, list(choices))
    return best


def test_the_program_finds_the_brute_force_optimum_ties_included():
    rng = random.Random(0)
    for instance in range(40):
        sizes = [rng.randint(2, 4) for _ in range(rng.randint(2, 4))]
        tied = instance % 3 == 0  # few distinct values: many optimal assignments
        table = [[float(rng.randint(0, 3)) if tied else rng.random() for _ in range(k)] for k in sizes]
        costs = [[float(rng.randint(1, 4)) if tied else rng.uniform(0.1, 5) for _ in range(k)] for k in sizes]
        const = rng.choice([0.0, 1.5])
        every = sorted(program_cost(costs, c, const) for c in itertools.product(*(range(k) for k in sizes)))
        # Budgets between the extremes, and exactly at an assignment's cost (the boundary is feasible).
        for budget in (rng.uniform(every[0], every[-1]), rng.choice(every), every[0], every[-1]):
            choices = solve(table, costs, budget, const)
            best, _ = brute_force(table, costs, budget, const)
            assert program_cost(costs, choices, const) <= budget
            assert program_score(table, choices) == pytest.approx(best, abs=1e-9), (instance, budget)


def test_pairwise_costs_are_linearised_exactly():
    """Products of two decisions' choices (weight bits x activation bits): the same optimum as brute force over the
    true bilinear cost, at budgets between the extremes and on an assignment's exact cost."""
    rng = random.Random(3)
    for instance in range(30):
        sizes = [rng.randint(2, 3) for _ in range(rng.randint(2, 4))]
        table = [[rng.random() for _ in range(k)] for k in sizes]
        costs = [[rng.uniform(0, 2) for _ in range(k)] for k in sizes]
        pairs = {(0, 1): [[rng.uniform(0, 3) for _ in range(sizes[1])] for _ in range(sizes[0])]}
        if len(sizes) > 2:
            pairs[(2, 1)] = [[rng.uniform(0, 3) for _ in range(sizes[1])] for _ in range(sizes[2])]
        every = sorted(program_cost(costs, c, 0.0, pairs) for c in itertools.product(*(range(k) for k in sizes)))
        for budget in (rng.uniform(every[0], every[-1]), rng.choice(every), every[0], every[-1]):
            choices = solve(table, costs, budget, pairs=pairs)
            best, _ = brute_force(table, costs, budget, pairs=pairs)
            assert program_cost(costs, choices, 0.0, pairs) <= budget, (instance, budget)
            assert program_score(table, choices) == pytest.approx(best, abs=1e-9), (instance, budget)


def test_a_lower_bound_on_the_cost_is_kept_too():
    """With ``lower``, the least score among the assignments costing in [lower, budget], pairs included."""
    rng = random.Random(5)
    for instance in range(30):
        sizes = [rng.randint(2, 3) for _ in range(3)]
        table = [[rng.random() for _ in range(k)] for k in sizes]
        costs = [[rng.uniform(0, 2) for _ in range(k)] for k in sizes]
        pairs = {(0, 2): [[rng.uniform(0, 3) for _ in range(sizes[2])] for _ in range(sizes[0])]} if instance % 2 \
            else None
        every = sorted(program_cost(costs, c, 0.0, pairs) for c in itertools.product(*(range(k) for k in sizes)))
        i = rng.randrange(len(every))
        lower, budget = every[i], every[min(len(every) - 1, i + rng.randint(0, 3))]
        choices = solve(table, costs, budget, pairs=pairs, lower=lower)
        best, _ = brute_force(table, costs, budget, pairs=pairs, lower=lower)
        assert lower - 1e-9 <= program_cost(costs, choices, 0.0, pairs) <= budget, instance
        assert program_score(table, choices) == pytest.approx(best, abs=1e-9), instance


def test_a_budget_below_the_cheapest_assignment_is_one_line():
    table, costs = [[1.0, 0.0], [2.0, 0.0]], [[1.0, 3.0], [2.0, 4.0]]
    with pytest.raises(BadInput) as info:
        solve(table, costs, 2.9999)
    assert "below the cheapest assignment (3)" in str(info.value) and "\n" not in str(info.value)
    assert solve(table, costs, 3.0) == [0, 0]  # the cheapest itself fits
    assert solve(table, costs, 7.0) == [1, 1]  # everything fits: the least score
    with pytest.raises(BadInput, match="no assignment within"):  # with pairs: the solver's own verdict
        solve(table, costs, 2.9999, pairs={(0, 1): [[0.0, 0.0], [0.0, 0.0]]})


def test_separate_weight_and_activation_decisions_cost_what_summarize_reports():
    """The pairwise coefficients of BOPs with separate weight and activation decisions are the reported cost."""
    cfg = load_config(["space=int_wide", "space.shared_wa=false"])
    net = make_plan(cfg).network
    const, costs, pairs = program_costs(net.space, net.shapes, net.total_params, "bops")
    assert pairs  # one (weight, activation) pair per layer
    rng = random.Random(2)
    for _ in range(20):
        choices = [rng.randrange(len(d.candidates)) for d in net.space.decisions]
        reported = assignment_cost(net.shapes, net.space.assignment(choices), net.total_params, "bops")
        assert program_cost(costs, choices, const, pairs) == pytest.approx(reported, rel=1e-12)
