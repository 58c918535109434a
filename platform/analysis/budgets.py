"""A study's methods compared at each of its budgets (cost targets), not only over their whole fronts.

The whole-front hypervolume (`fliqs.analysis.fronts.hypervolume`) credits every cost a front covers: a method whose
point lands far below its target, cheaper and less accurate, can have the larger hypervolume although another method was
more accurate at the budget of every target. Here each method is scored where the study asked for it. Everything
works on `fliqs.analysis.points.Point` s (accuracy 0..1, cost and target in GBOPs); accuracy is maximised.

- **Budgets** (`budgets`): the distinct cost targets (`Point.target`) among the points, values equal to within
  1e-9 relative being one budget, sorted, each labelled by its target fraction of the uniform-int8 cost when known.
- **Within budget** (`within_budget`): cost <= B x (1 + 1e-9), so a point landing exactly on its budget counts.
- **Accuracy at budget** (`accuracy_at_budget`): for a method and a budget B, per seed the best accuracy among that
  method's points of that seed within B. ALL its points count, whatever target they were aimed at, uniform formats
  too (by their cost). Then the mean +- sample standard deviation (n - 1; 0 for one seed) over the seeds that have
  such a point, and how many of the method's seeds have one. A method with no point within B at any seed gets None,
  reported as "none within budget": never 0, never left out.
- **Landed cost / target** (`landed_cost`): per method and per target it was aimed at, cost / own target of each of
  its points aimed there: mean +- std, max, and how many are over their target (cost > target x (1 + 1e-9)).
- **Windowed hypervolume** (`windowed_hypervolume`): over the study's common cost window [B_lo, B_hi] (its lowest
  and highest budget)::

      HV_w = 1 / (B_hi - B_lo) x integral from B_lo to B_hi of a(c) dc,
      a(c) = the best accuracy among the method's points with cost <= c (0 where there is none),

  i.e. the mean accuracy at budget over the window, cost linear like the whole-front hypervolume, reference
  accuracy 0. With one budget only (B_lo == B_hi) it is a(B_lo) within budget, the accuracy at that budget. Given
  per seed (mean +- std over the method's seeds; a seed with no point in the window scores 0) and for all seeds'
  points together.

`budget_report` puts it all together (JSON-ready: ``fliqs pareto --json``, ``fronts.json``, ``study.json``);
`budget_tables` is its plain-text form (the console, ``fliqs pareto``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fliqs.analysis.points import Point, by_method, finite, mean_std
from fliqs.run.console import table

REL_TOL = 1e-9  # budgets closer than this (relative) are one budget; a point this close over its budget is on it
REFERENCE_ACCURACY = 0.0  # a(c) where a method has no point with cost <= c
NONE_WITHIN = "none within budget"
AT_BUDGET_TITLE = "accuracy at budget (best test accuracy with cost <= budget, mean +- std over seeds; seeds within " \
                  "budget)"
LANDED_TITLE = "landed cost / target (each point's cost over its own target: mean +- std over seeds, max, points " \
               "over their target)"


@dataclass(frozen=True)
class Budget:
    """One cost target of a study, in GBOPs; ``fraction``: the target as a fraction of the uniform-int8 cost."""

    gbops: float
    fraction: float | None = None

    @property
    def label(self) -> str:
        """``0.12x int8``, or ``30 GBOPs`` without a known fraction."""
        return f"{self.fraction:g}x int8" if self.fraction is not None else f"{self.gbops:.4g} GBOPs"

    @property
    def key(self) -> str:
        """The budget in a column name: ``0.12x``, or ``30gbops`` without a known fraction."""
        return f"{self.fraction:g}x" if self.fraction is not None else f"{self.gbops:.6g}gbops"

    @property
    def heading(self) -> str:
        """A table heading: ``0.12x int8 (30 GBOPs)``."""
        return f"{self.label} ({self.gbops:.4g} GBOPs)" if self.fraction is not None else self.label

    def to_dict(self) -> dict:
        return {"gbops": self.gbops, "fraction": self.fraction, "label": self.label}


def within_budget(cost: float, budget: float) -> bool:
    """``cost <= budget`` up to 1e-9 relative: a point that lands exactly on its budget counts."""
    return cost <= budget + REL_TOL * abs(budget)


def same_budget(a: float, b: float) -> bool:
    """Two targets equal to within 1e-9 relative."""
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def _has_target(p: Point) -> bool:
    return p.target is not None and math.isfinite(p.target) and p.target > 0


def _seeds(points: Iterable[Point]) -> list[int | None]:
    return sorted({p.seed for p in points}, key=lambda s: (s is None, s))


def budgets(points: Iterable[Point]) -> list[Budget]:
    """The study's budgets: the distinct targets of the points (equal to 1e-9 relative: one), sorted by cost; each
    labelled by the first known target fraction among its points. Points without a target (uniform) add none."""
    targeted = sorted((p for p in finite(points) if _has_target(p)), key=lambda p: p.target)
    groups: list[list[Point]] = []
    for p in targeted:
        if groups and same_budget(groups[-1][0].target, p.target):
            groups[-1].append(p)
        else:
            groups.append([p])
    return [Budget(g[0].target, next((p.target_fraction for p in g if p.target_fraction is not None), None))
            for g in groups]


def best_within(points: Iterable[Point], budget: float) -> float | None:
    """The best accuracy among ``points`` within ``budget`` (`within_budget`); None when there is none."""
    accuracies = [p.accuracy for p in finite(points) if within_budget(p.cost, budget)]
    return max(accuracies) if accuracies else None


def accuracy_at_budget(points: Iterable[Point], budget: float) -> dict:
    """Accuracy at budget of one method's ``points``: ``{"mean", "std", "seeds_within", "seeds", "by_seed"}``.

    ``by_seed``: ``{str(seed): best accuracy of that seed's points within budget, or None}`` over the method's
    seeds; mean and std over the seeds with such a point (None and None when no seed has one)."""
    points = finite(points)
    by_seed = {str(s): best_within([p for p in points if p.seed == s], budget) for s in _seeds(points)}
    found = [a for a in by_seed.values() if a is not None]
    mean, std = mean_std(found) if found else (None, None)
    return {"mean": mean, "std": std, "seeds_within": len(found), "seeds": len(by_seed), "by_seed": by_seed}


def landed_cost(points: Iterable[Point], budget: float) -> dict | None:
    """Landed cost / target of one method's points aimed at ``budget`` (their target is that budget):
    ``{"mean", "std", "max", "over", "points", "ratios"}`` (``ratios`` by seed; ``over``: how many points cost more
    than their target x (1 + 1e-9)). None when none of the points was aimed at it."""
    aimed = sorted((p for p in finite(points) if _has_target(p) and same_budget(p.target, budget)),
                   key=lambda p: (p.seed is None, p.seed))
    if not aimed:
        return None
    ratios = [p.cost / p.target for p in aimed]
    mean, std = mean_std(ratios)
    over = sum(not within_budget(p.cost, p.target) for p in aimed)
    return {"mean": mean, "std": std, "max": max(ratios), "over": over, "points": len(aimed), "ratios": ratios}


def attainment(points: Iterable[Point], cost: float) -> float:
    """a(cost): the best accuracy among ``points`` within ``cost``; `REFERENCE_ACCURACY` (0) where there is none."""
    best = best_within(points, cost)
    return max(best, REFERENCE_ACCURACY) if best is not None else REFERENCE_ACCURACY


def windowed_hypervolume(points: Iterable[Point], lo: float, hi: float) -> float:
    """The integral of the attainment function a(c) over [lo, hi], divided by hi - lo: the mean accuracy at budget
    over the window. ``lo == hi`` (to 1e-9 relative): a(hi). Raises ValueError when hi < lo.

    a is a staircase that steps up at the points' costs: sweep the points by cost, adding (next step - this step)
    x the best accuracy so far.
    """
    if hi < lo and not same_budget(lo, hi):
        raise ValueError(f"windowed_hypervolume: window [{lo}, {hi}] is empty")
    points = finite(points)
    if same_budget(lo, hi):
        return attainment(points, hi)
    ordered = sorted(points, key=lambda p: p.cost)
    best, i = REFERENCE_ACCURACY, 0
    while i < len(ordered) and ordered[i].cost <= lo:
        best, i = max(best, ordered[i].accuracy), i + 1
    area, left = 0.0, lo
    for p in ordered[i:]:
        if p.cost >= hi:
            break
        area += (p.cost - left) * best
        best, left = max(best, p.accuracy), p.cost
    area += (hi - left) * best
    return area / (hi - lo)


def budget_report(points: Iterable[Point]) -> dict:
    """The study's budget analysis, JSON-ready::

        {"budgets": [{"gbops", "fraction", "label"}], "window": {"lo_gbops", "hi_gbops"} or None,
         "methods": {method: {"accuracy_at_budget": [one per budget: its fields and `accuracy_at_budget`'s],
                              "landed_cost_ratio": [per budget the method was aimed at: its fields and
                                                    `landed_cost`'s],
                              "windowed_hypervolume": all seeds' points, "windowed_hypervolume_mean",
                              "windowed_hypervolume_std", "windowed_hypervolume_by_seed": {str(seed): x}}}}

    Without budgets (no point has a target) the lists are empty and the windowed figures None.
    """
    points = finite(points)
    study_budgets = budgets(points)
    window = (study_budgets[0].gbops, study_budgets[-1].gbops) if study_budgets else None
    out = {}
    for method, ps in by_method(points).items():
        landed = [(b, landed_cost(ps, b.gbops)) for b in study_budgets]
        entry = {"accuracy_at_budget": [{**b.to_dict(), **accuracy_at_budget(ps, b.gbops)} for b in study_budgets],
                 "landed_cost_ratio": [{**b.to_dict(), **stats} for b, stats in landed if stats is not None],
                 "windowed_hypervolume": None, "windowed_hypervolume_mean": None, "windowed_hypervolume_std": None,
                 "windowed_hypervolume_by_seed": {}}
        if window:
            per_seed = {str(s): windowed_hypervolume([p for p in ps if p.seed == s], *window) for s in _seeds(ps)}
            mean, std = mean_std(list(per_seed.values()))
            entry.update({"windowed_hypervolume": windowed_hypervolume(ps, *window), "windowed_hypervolume_mean": mean,
                          "windowed_hypervolume_std": std, "windowed_hypervolume_by_seed": per_seed})
        out[method] = entry
    return {"budgets": [b.to_dict() for b in study_budgets],
            "window": {"lo_gbops": window[0], "hi_gbops": window[1]} if window else None, "methods": out}


# --- as text ----------------------------------------------------------------------------------------------------

def report_budgets(report: Mapping) -> list[Budget]:
    """The `Budget` s of a `budget_report`."""
    return [Budget(b["gbops"], b["fraction"]) for b in report.get("budgets", [])]


def ranked_methods(report: Mapping) -> list[str]:
    """A `budget_report` 's methods, highest windowed hypervolume first (None last), then by name."""
    methods = report.get("methods", {})
    return sorted(methods, key=lambda m: (methods[m]["windowed_hypervolume"] is None,
                                          -(methods[m]["windowed_hypervolume"] or 0.0), m))


def landed_at(entry: Mapping, budget: float) -> dict | None:
    """A method's landed cost / target entry for ``budget`` in a `budget_report` (None: not aimed at it)."""
    return next((e for e in entry.get("landed_cost_ratio", []) if same_budget(e["gbops"], budget)), None)


def format_at_budget(stats: Mapping) -> str:
    """``0.952 +- 0.017 (3/3)`` (mean +- std (seeds within budget / seeds)), or ``none within budget``."""
    if stats["mean"] is None:
        return NONE_WITHIN
    return f"{stats['mean']:.3f} +- {stats['std']:.3f} ({stats['seeds_within']}/{stats['seeds']})"


def format_landed(stats: Mapping | None) -> str:
    """``0.850 +- 0.071, max 0.900, 0/2 over``, or ``-`` for a target the method was not aimed at."""
    if stats is None:
        return "-"
    return (f"{stats['mean']:.3f} +- {stats['std']:.3f}, max {stats['max']:.3f}, "
            f"{stats['over']}/{stats['points']} over")


def format_windowed(entry: Mapping) -> tuple[str, str]:
    """A method's windowed hypervolume as (all seeds, per seed mean +- std) cells."""
    if entry["windowed_hypervolume"] is None:
        return "-", "-"
    return (f"{entry['windowed_hypervolume']:.4f}",
            f"{entry['windowed_hypervolume_mean']:.4f} +- {entry['windowed_hypervolume_std']:.4f}")


def window_text(report: Mapping) -> str:
    """``[30, 50] GBOPs`` (the common cost window of a `budget_report`)."""
    w = report.get("window")
    return f"[{w['lo_gbops']:.4g}, {w['hi_gbops']:.4g}] GBOPs" if w else "no window"


def budget_tables(report: Mapping) -> str:
    """Plain text of a `budget_report`: the accuracy-at-budget table (with the windowed hypervolume), then the
    landed cost / target table (methods with targets)."""
    study_budgets = report_budgets(report)
    if not study_budgets:
        return "accuracy at budget: no trial has a cost target (uniform formats only): no budgets to compare at"
    methods = report["methods"]
    order = ranked_methods(report)
    header = ["method", *(b.heading for b in study_budgets), "windowed HV", "per seed"]
    rows = [[m, *(format_at_budget(s) for s in methods[m]["accuracy_at_budget"]), *format_windowed(methods[m])]
            for m in order]
    lines = [f"{AT_BUDGET_TITLE}; windowed HV: mean accuracy at budget over {window_text(report)}:",
             table(rows, header, right=header[1:])]
    landed_rows = [[m, *(format_landed(landed_at(methods[m], b.gbops)) for b in study_budgets)]
                   for m in order if methods[m]["landed_cost_ratio"]]
    if landed_rows:
        header = ["method", *(b.heading for b in study_budgets)]
        lines += ["", f"{LANDED_TITLE}:", table(landed_rows, header, right=header[1:])]
    return "\n".join(lines)
