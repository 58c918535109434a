"""Pareto fronts of a study: accuracy against cost, per search method, with a hypervolume per method.

A study runs many trials (method x cost target x seed); each trial is an MLflow child run of the study's parent
run, named and tagged as `fliqs.run.schema` says, with final metrics ``test_accuracy`` (0..1) and ``gbops`` (lower is
better). Everything here works on `Point` s: accuracy is maximised, cost minimised. A method is one series: the
uniform formats together make the uniform front.

- `pareto_front`: the non-dominated points of a set, sorted by cost (so accuracy increases along the front).
  ``a`` dominates ``b`` when ``a`` is at least as accurate and at most as costly and strictly better in one of
  the two; of several identical (cost, accuracy) points the front keeps one (the first in input order).
- `hypervolume`: the 2-D area dominated by a front inside the box bounded by a reference point
  ``(ref_cost, ref_accuracy)``; points at or beyond the reference (cost >= ref_cost or accuracy <= ref_accuracy)
  contribute nothing.
- **Reference point of a study** (`reference_point`): cost = 1.1 x the largest cost among ALL points of the
  study, accuracy = 0.0. One shared reference makes the hypervolumes of all methods of one study comparable
  (not across studies); the 10 % margin lets the most expensive point still contribute its accuracy.
  `hypervolume_by_method` uses it.

The whole-front hypervolume credits every cost a front covers, below a method's targets too; `fliqs.analysis.budgets`
compares the methods at each budget of the study (accuracy at budget, landed cost / target, and the windowed
hypervolume over the common cost window: the definitions are in its docstring), and `study_report` carries both.

The points themselves: `fliqs.analysis.points`; the plot: `fliqs.analysis.plots.plot_fronts`; a study's record
in MLflow (reading its trials, logging its files and metrics): `fliqs.analysis.store`.
"""

from __future__ import annotations

from collections.abc import Iterable

from fliqs.analysis.budgets import budget_report
from fliqs.analysis.points import Point, by_method, finite, mean_std

REFERENCE_COST_MARGIN = 1.1
REFERENCE_ACCURACY = 0.0


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as accurate and at most as costly as ``b``, and strictly better in one of the two."""
    return (a.accuracy >= b.accuracy and a.cost <= b.cost) and (a.accuracy > b.accuracy or a.cost < b.cost)


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The non-dominated points (maximise accuracy, minimise cost), sorted by cost; one of identical points.

    Points with a non-finite accuracy or cost are ignored. O(n log n): sort by (cost, -accuracy), keep a point
    when it is strictly more accurate than every cheaper-or-equal point kept so far.
    """
    ordered = sorted(finite(points), key=lambda p: (p.cost, -p.accuracy))  # stable: ties keep input order
    front: list[Point] = []
    for p in ordered:
        if not front or p.accuracy > front[-1].accuracy:
            front.append(p)
    return front


def hypervolume(points: Iterable[Point], ref_cost: float, ref_accuracy: float = REFERENCE_ACCURACY) -> float:
    """Area dominated by the front of ``points`` and bounded by the reference point (ref_cost, ref_accuracy).

    The region is every (cost, accuracy) with cost in [c, ref_cost) and accuracy in (ref_accuracy, a] for some
    point (c, a); points with cost >= ref_cost or accuracy <= ref_accuracy contribute nothing. Along the front
    (cost ascending, accuracy ascending) it is a sum of rectangles: sum_i (c_{i+1} - c_i) * (a_i - ref_accuracy),
    with c_{n} = ref_cost.
    """
    inside = [p for p in finite(points) if p.cost < ref_cost and p.accuracy > ref_accuracy]
    front = pareto_front(inside)
    area = 0.0
    for i, p in enumerate(front):
        next_cost = front[i + 1].cost if i + 1 < len(front) else ref_cost
        area += (next_cost - p.cost) * (p.accuracy - ref_accuracy)
    return area


def reference_point(points: Iterable[Point]) -> tuple[float, float]:
    """The study's reference point: (1.1 x the largest cost among ALL points, accuracy 0.0).

    Costs are non-negative (GBOPs); raises ValueError when there is no point with a finite cost.
    """
    costs = [p.cost for p in finite(points)]
    if not costs:
        raise ValueError("reference_point needs at least one point with a finite cost and accuracy")
    return REFERENCE_COST_MARGIN * max(costs), REFERENCE_ACCURACY


def fronts_by_method(points: Iterable[Point]) -> dict[str, list[Point]]:
    """Each method's own Pareto front (methods sorted by name)."""
    return {m: pareto_front(ps) for m, ps in by_method(points).items()}


def hypervolume_by_method(points: Iterable[Point]) -> dict[str, float]:
    """Each method's hypervolume against the shared `reference_point` of all ``points``."""
    points = list(points)
    if not finite(points):
        return {}
    ref_cost, ref_acc = reference_point(points)
    return {m: hypervolume(ps, ref_cost, ref_acc) for m, ps in by_method(points).items()}


def hypervolume_by_seed(points: Iterable[Point]) -> dict[str, dict[int | None, float]]:
    """``{method: {seed: hypervolume of that seed's points}}`` against the shared `reference_point` of all points
    (every seed of every method measured in one box)."""
    points = list(points)
    if not finite(points):
        return {}
    ref_cost, ref_acc = reference_point(points)
    out: dict[str, dict[int | None, float]] = {}
    for method, ps in by_method(points).items():
        seeds = sorted({p.seed for p in ps}, key=lambda s: (s is None, s))
        out[method] = {seed: hypervolume([p for p in ps if p.seed == seed], ref_cost, ref_acc) for seed in seeds}
    return out


def paired_comparison(points: Iterable[Point], reference: str) -> dict[str, dict]:
    """Each method against ``reference``, seed by seed (the same seed: the same data split and initial weights):
    the mean and standard deviation of ``hv(reference) - hv(method)`` over their common seeds, and how often the
    reference was ahead, level or behind. Methods without a seed in common are left out."""
    per_seed = hypervolume_by_seed(points)
    if reference not in per_seed:
        return {}
    ref = per_seed[reference]
    out = {}
    for method, hv in per_seed.items():
        common = [s for s in hv if s in ref]
        if method == reference or not common:
            continue
        diffs = [ref[s] - hv[s] for s in common]
        mean, std = mean_std(diffs)
        out[method] = {"seeds": len(common), "mean_difference": mean, "std_difference": std,
                       "reference_ahead": sum(d > 0 for d in diffs), "level": sum(d == 0 for d in diffs),
                       "reference_behind": sum(d < 0 for d in diffs)}
    return out


def study_report(points: Iterable[Point]) -> dict[str, dict]:
    """``{method: {"front": [point dicts, by cost], "hypervolume": x, "hypervolume_mean": m, "hypervolume_std": s,
    "hypervolume_by_seed": {seed: x}, ...}}`` (what ``fliqs pareto --json`` prints). ``hypervolume`` is the front of
    every seed's points together; the mean and standard deviation are over the seeds' own fronts. The rest is the
    method's part of `fliqs.analysis.budgets.budget_report`: ``accuracy_at_budget`` (one entry per budget of the study),
    ``landed_cost_ratio`` and ``windowed_hypervolume`` (all seeds; ``_mean``, ``_std``, ``_by_seed``)."""
    points = list(points)
    hv, per_seed = hypervolume_by_method(points), hypervolume_by_seed(points)
    at_budget = budget_report(points)["methods"]
    report = {}
    for m, front in fronts_by_method(points).items():
        mean, std = mean_std(list(per_seed[m].values()))
        report[m] = {"front": [p.to_dict() for p in front], "hypervolume": hv.get(m, 0.0), "hypervolume_mean": mean,
                     "hypervolume_std": std, "hypervolume_by_seed": {str(k): v for k, v in per_seed[m].items()},
                     **at_budget[m]}
    return report


def describe_reference(points: Iterable[Point]) -> str:
    """One line naming the reference point and how it was chosen (the ``hypervolume_reference`` tag)."""
    points = list(points)
    ref_cost, ref_acc = reference_point(points)
    return (f"gbops={ref_cost:.6g}, accuracy={ref_acc:g} ({REFERENCE_COST_MARGIN:g} x the largest GBOPs of "
            f"{len(finite(points))} points; shared by every method of the study)")
