"""The integer program that picks one candidate per decision under a cost budget: least total score, cost <= budget.

Two methods use it: the sensitivity method (`fliqs.searchers.sensitivity`; scores are estimated loss increases) and
the budget-respecting extraction of a one-shot search (`fliqs.searchers.budget`; scores are minus the policy's
log-probabilities, so the solution is the most probable assignment within the budget).

Variables: binary x_{d,k}, one per (decision, candidate), with sum_k x_{d,k} = 1 for every decision. The cost is

    const + sum_{d,k} c_{d,k} x_{d,k} + sum_{(d,e)} sum_{k,j} P^{de}_{kj} x_{d,k} x_{e,j}  <=  budget

and, optionally, at least ``lower``. The pairwise part is BOPs with separate weight and activation decisions (weight
bits x activation bits, bilinear). It is linearised exactly: a continuous y_{de,kj} in [0, 1] with
y >= x_{d,k} + x_{e,j} - 1, y <= x_{d,k} and y <= x_{e,j} replaces each product, which pins y to the product for
binary x. HiGHS (`scipy.optimize.milp`, relative gap 0) solves it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fliqs.errors import BadInput
from fliqs.quant.formats import get_format
from fliqs.searchers.space import FORMAT, ExpectedCost, SearchSpace

Pairs = Mapping[tuple[int, int], Sequence[Sequence[float]]]  # (d, e) -> P[k][j], the cost of x_{d,k} x_{e,j}


def program_costs(space: SearchSpace, shapes, total_params: int | None, cost: str = "bops") \
        -> tuple[float, list[list[float]], dict[tuple[int, int], list[list[float]]]]:
    """(const, c[decision][candidate], pairs) with cost(choices) = `program_cost` of them, in GBOPs or MB: the
    coefficients of `fliqs.searchers.space.ExpectedCost` (one cost model) at one-hot choices. ``pairs`` is empty
    unless separate weight and activation decisions set one layer under BOPs. Format decisions only."""
    if any(d.kind != FORMAT for d in space.decisions):
        raise BadInput("the integer program covers format decisions only; this space searches an architecture")
    expected = ExpectedCost(space, shapes, total_params, cost)
    bits = [[float(get_format(c).effective_bits) for c in d.candidates] for d in space.decisions]
    linear = []
    for d, row in enumerate(bits):
        if cost == "size":
            linear.append([float(expected.size_w[d]) * b / 8 / 1e6 for b in row])
        else:
            linear.append([float(expected.s2[d]) * b * b + float(expected.s1[d]) * b for b in row])
    pairs: dict[tuple[int, int], list[list[float]]] = {}
    if cost == "bops":
        for d, e in zip(*np.nonzero(expected.pair.numpy()), strict=True):
            weight = float(expected.pair[d, e])
            pairs[(int(d), int(e))] = [[weight * bd * be for be in bits[e]] for bd in bits[d]]
    const = expected.size_const / 8 / 1e6 if cost == "size" else expected.const
    return float(const), linear, pairs


def linear_costs(space: SearchSpace, shapes, total_params: int | None, cost: str = "bops") \
        -> tuple[float, list[list[float]]]:
    """`program_costs` without pairs; BadInput when the cost is not linear in the decisions (separate weight and
    activation decisions under BOPs), for a caller whose program must be linear."""
    const, linear, pairs = program_costs(space, shapes, total_params, cost)
    if pairs:
        raise BadInput("BOPs of separate weight and activation decisions are bilinear (weight bits x activation "
                       "bits): the integer program needs space.shared_wa=true, space.weight_only=true or "
                       "reward.cost=size")
    return const, linear


def program_cost(costs: Sequence[Sequence[float]], choices: Sequence[int], const: float = 0.0,
                 pairs: Pairs | None = None) -> float:
    """const + sum_d costs[d][choices[d]] (+ the pairs' terms), summed in decision order (the solver's own check)."""
    terms = [costs[d][int(k)] for d, k in enumerate(choices)]
    terms += [p[int(choices[d])][int(choices[e])] for (d, e), p in (pairs or {}).items()]
    return const + math.fsum(terms)


def program_score(scores: Sequence[Sequence[float]], choices: Sequence[int]) -> float:
    return math.fsum(scores[d][int(k)] for d, k in enumerate(choices))


def cheapest_cost(costs: Sequence[Sequence[float]], const: float = 0.0, pairs: Pairs | None = None) -> float:
    """A lower bound of every assignment's cost, exact without pairs (each decision at its cheapest)."""
    return const + math.fsum(min(row) for row in costs) + math.fsum(min(map(min, p)) for p in (pairs or {}).values())


def solve(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float,
          const: float = 0.0, pairs: Pairs | None = None, lower: float | None = None,
          exclude: Sequence[Sequence[int]] = ()) -> list[int]:
    """The choices (one candidate index per decision) of least total score whose cost is at most ``budget`` (and at
    least ``lower`` when given), other than the assignments of ``exclude`` (one no-good cut each: the sum of an
    excluded assignment's variables is at most D - 1).

    The scores are divided by the largest magnitude (HiGHS's absolute gap, 1e-6, is then relative to it). HiGHS
    accepts a constraint violated by its feasibility tolerance: the choice is checked in exact order
    (`program_cost`), and on an overshoot the program is solved again with the budget lowered by it. BadInput in
    one line when no assignment fits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    pairs = dict(pairs or {})
    sizes = [len(row) for row in scores]
    if [len(row) for row in costs] != sizes or not sizes or min(sizes) < 1:
        raise ValueError(f"scores {sizes} and costs {[len(row) for row in costs]} must have the same non-empty rows")
    flat_s = np.array([v for row in scores for v in row], dtype=np.float64)
    flat_c = np.array([v for row in costs for v in row], dtype=np.float64)
    pair_c = np.array([v for (d, e), p in pairs.items() for row in p for v in row], dtype=np.float64)
    if not (np.isfinite(flat_s).all() and np.isfinite(flat_c).all() and np.isfinite(pair_c).all()):
        raise ValueError("scores and costs must be finite")
    if (pair_c < 0).any():
        raise ValueError("pairwise costs must be non-negative (the linearisation relies on it)")
    if not pairs and cheapest_cost(costs, const) > budget:
        raise BadInput(f"cost budget {budget:.6g} is below the cheapest assignment ({cheapest_cost(costs, const):.6g}):"
                       f" no assignment fits")
    n_x, n_y = flat_s.size, pair_c.size
    offsets = np.cumsum([0, *sizes])
    onehot = np.zeros((len(sizes), n_x + n_y))
    for d in range(len(sizes)):
        onehot[d, offsets[d]:offsets[d + 1]] = 1.0
    # y - x_{d,k} - x_{e,j} >= -1, y - x_{d,k} <= 0, y - x_{e,j} <= 0: three rows per product variable y_{de,kj}.
    links = np.zeros((3 * n_y, n_x + n_y))
    row = 0
    for (d, e), p in pairs.items():
        for k in range(len(p)):
            for j in range(len(p[k])):
                y = n_x + row
                links[3 * row, [offsets[d] + k, offsets[e] + j, y]] = (-1.0, -1.0, 1.0)
                links[3 * row + 1, [offsets[d] + k, y]] = (-1.0, 1.0)
                links[3 * row + 2, [offsets[e] + j, y]] = (-1.0, 1.0)
                row += 1
    link_low = np.tile([-1.0, -np.inf, -np.inf], n_y)
    link_high = np.tile([np.inf, 0.0, 0.0], n_y)
    scale = float(np.abs(flat_s).max()) or 1.0
    objective = np.concatenate([flat_s / scale, np.zeros(n_y)])
    cost_row = np.concatenate([flat_c, pair_c])
    cost_scale = max(float(np.abs(cost_row).max()), abs(budget - const), 1e-300)
    integrality = np.concatenate([np.ones(n_x), np.zeros(n_y)])
    limit = budget - const
    floor = -np.inf if lower is None else (lower - const) / cost_scale
    for _ in range(8):
        constraints = [LinearConstraint(onehot, 1, 1),
                       LinearConstraint(cost_row[None, :] / cost_scale, floor, limit / cost_scale)]
        if n_y:
            constraints.append(LinearConstraint(links, link_low, link_high))
        if exclude:
            cuts = np.zeros((len(exclude), n_x + n_y))
            for row, choices in enumerate(exclude):
                cuts[row, [offsets[d] + int(k) for d, k in enumerate(choices)]] = 1.0
            constraints.append(LinearConstraint(cuts, -np.inf, len(sizes) - 1))
        result = milp(objective, integrality=integrality, bounds=Bounds(0, 1), constraints=constraints,
                      options={"mip_rel_gap": 0.0})
        if result.x is None:
            raise BadInput(f"the integer program found no assignment within {budget:.6g}: {result.message}")
        choices = [int(np.argmax(result.x[offsets[d]:offsets[d + 1]])) for d in range(len(sizes))]
        total = program_cost(costs, choices, const, pairs)
        if total <= budget:
            return choices
        limit -= (total - budget) + 1e-12 * cost_scale  # within HiGHS's tolerance, not within the budget
    raise BadInput(f"the integer program kept exceeding the budget {budget:.6g} (numerically ill-conditioned costs)")
