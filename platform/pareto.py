"""Pareto fronts of a study: accuracy against cost, per search method, with a hypervolume per method.

A study runs many trials (method x cost target x seed); each trial is an MLflow child run of the study's parent
run, named and tagged as `fliqs.schema` says, with final metrics ``test_accuracy`` (0..1) and ``gbops`` (lower is
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

The whole-front hypervolume credits every cost a front covers, below a method's targets too; `fliqs.budgets`
compares the methods at each budget of the study (accuracy at budget, landed cost / target, and the windowed
hypervolume over the common cost window: the definitions are in its docstring), and `study_report` carries both.

Files for people (`plot_fronts`: PNG; `write_csv`: one row per point) and MLflow glue (`collect_points` reads a
study's trials, `log_study_artifacts` logs fronts, files and ``hypervolume_<method>`` metrics on the parent run).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fliqs import schema
from fliqs.budgets import budget_report, budgets
from fliqs.budgets import mean_std as _mean_std
from fliqs.errors import BadInput
from fliqs.review import method_rows, study_note
from fliqs.searchers import methods
from fliqs.searchers.methods import DIFFERENTIABLE, MULTI_TRIAL, ONE_SHOT, SENSITIVITY, UNIFORM
from fliqs.tracking import check_store

REFERENCE_COST_MARGIN = 1.1
REFERENCE_ACCURACY = 0.0
CSV_COLUMNS = ["method", "family", "label", "target_fraction", "target", "seed", "accuracy", "gbops", "on_front",
               "run_id"]
LOG_SCALE_SPAN = 10.0  # the cost axis is logarithmic when max cost / min cost exceeds this
PALETTE = "tab10"
FAMILY_MARKERS = {ONE_SHOT: "*", MULTI_TRIAL: "o", DIFFERENTIABLE: "s", SENSITIVITY: "P", UNIFORM: "D"}


@dataclass(frozen=True)
class Point:
    """One trial: its method and family, final accuracy (0..1) and cost (GBOPs), and where it came from.

    ``label`` names the point within its series (the uniform format); ``target_fraction`` is its cost target as a
    fraction of the uniform-int8 cost, ``target`` the cost target itself in GBOPs (both None without a target: a
    uniform format)."""

    method: str
    family: str
    accuracy: float
    cost: float
    run_id: str = ""
    target_fraction: float | None = None
    seed: int | None = None
    label: str = ""
    target: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready: ``cost`` is called ``gbops`` like the MLflow metric."""
        d = asdict(self)
        d["gbops"] = d.pop("cost")
        return d


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as accurate and at most as costly as ``b``, and strictly better in one of the two."""
    return (a.accuracy >= b.accuracy and a.cost <= b.cost) and (a.accuracy > b.accuracy or a.cost < b.cost)


def _finite(points: Iterable[Point]) -> list[Point]:
    return [p for p in points if math.isfinite(p.accuracy) and math.isfinite(p.cost)]


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The non-dominated points (maximise accuracy, minimise cost), sorted by cost; one of identical points.

    Points with a non-finite accuracy or cost are ignored. O(n log n): sort by (cost, -accuracy), keep a point
    when it is strictly more accurate than every cheaper-or-equal point kept so far.
    """
    ordered = sorted(_finite(points), key=lambda p: (p.cost, -p.accuracy))  # stable: ties keep input order
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
    inside = [p for p in _finite(points) if p.cost < ref_cost and p.accuracy > ref_accuracy]
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
    costs = [p.cost for p in _finite(points)]
    if not costs:
        raise ValueError("reference_point needs at least one point with a finite cost and accuracy")
    return REFERENCE_COST_MARGIN * max(costs), REFERENCE_ACCURACY


def by_method(points: Iterable[Point]) -> dict[str, list[Point]]:
    """Points grouped by method, methods in sorted order, points in input order."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.method, []).append(p)
    return {m: groups[m] for m in sorted(groups)}


def fronts_by_method(points: Iterable[Point]) -> dict[str, list[Point]]:
    """Each method's own Pareto front (methods sorted by name)."""
    return {m: pareto_front(ps) for m, ps in by_method(points).items()}


def hypervolume_by_method(points: Iterable[Point]) -> dict[str, float]:
    """Each method's hypervolume against the shared `reference_point` of all ``points``."""
    points = list(points)
    if not _finite(points):
        return {}
    ref_cost, ref_acc = reference_point(points)
    return {m: hypervolume(ps, ref_cost, ref_acc) for m, ps in by_method(points).items()}


def hypervolume_by_seed(points: Iterable[Point]) -> dict[str, dict[int | None, float]]:
    """``{method: {seed: hypervolume of that seed's points}}`` against the shared `reference_point` of all points
    (every seed of every method measured in one box)."""
    points = list(points)
    if not _finite(points):
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
        mean, std = _mean_std(diffs)
        out[method] = {"seeds": len(common), "mean_difference": mean, "std_difference": std,
                       "reference_ahead": sum(d > 0 for d in diffs), "level": sum(d == 0 for d in diffs),
                       "reference_behind": sum(d < 0 for d in diffs)}
    return out


def study_report(points: Iterable[Point]) -> dict[str, dict]:
    """``{method: {"front": [point dicts, by cost], "hypervolume": x, "hypervolume_mean": m, "hypervolume_std": s,
    "hypervolume_by_seed": {seed: x}, ...}}`` (what ``fliqs pareto --json`` prints). ``hypervolume`` is the front of
    every seed's points together; the mean and standard deviation are over the seeds' own fronts. The rest is the
    method's part of `fliqs.budgets.budget_report`: ``accuracy_at_budget`` (one entry per budget of the study),
    ``landed_cost_ratio`` and ``windowed_hypervolume`` (all seeds; ``_mean``, ``_std``, ``_by_seed``)."""
    points = list(points)
    hv, per_seed = hypervolume_by_method(points), hypervolume_by_seed(points)
    at_budget = budget_report(points)["methods"]
    report = {}
    for m, front in fronts_by_method(points).items():
        mean, std = _mean_std(list(per_seed[m].values()))
        report[m] = {"front": [p.to_dict() for p in front], "hypervolume": hv.get(m, 0.0), "hypervolume_mean": mean,
                     "hypervolume_std": std, "hypervolume_by_seed": {str(k): v for k, v in per_seed[m].items()},
                     **at_budget[m]}
    return report


def describe_reference(points: Iterable[Point]) -> str:
    """One line naming the reference point and how it was chosen (the ``hypervolume_reference`` tag)."""
    points = list(points)
    ref_cost, ref_acc = reference_point(points)
    return (f"gbops={ref_cost:.6g}, accuracy={ref_acc:g} ({REFERENCE_COST_MARGIN:g} x the largest GBOPs of "
            f"{len(_finite(points))} points; shared by every method of the study)")


def summary_rows(points: Iterable[Point]) -> list[dict]:
    """One row per point (by method, then cost): the `CSV_COLUMNS`; ``on_front``: on its method's front."""
    rows = []
    for method, ps in by_method(points).items():
        front_ids = {id(p) for p in pareto_front(ps)}
        for p in sorted(ps, key=lambda p: (p.cost, -p.accuracy)):
            rows.append({"method": method, "family": p.family, "label": p.label, "target_fraction": p.target_fraction,
                         "target": p.target, "seed": p.seed, "accuracy": p.accuracy, "gbops": p.cost,
                         "on_front": id(p) in front_ids, "run_id": p.run_id})
    return rows


def write_csv(points: Iterable[Point], path: str | Path) -> Path:
    """`summary_rows` as CSV (empty cells for a missing target or seed)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in summary_rows(points):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def _log_x(costs: Sequence[float]) -> bool:
    positive = [c for c in costs if c > 0]
    return bool(positive) and len(positive) == len(costs) and max(positive) / min(positive) > LOG_SCALE_SPAN


def _steps(front: Sequence[Point]) -> list[tuple[float, float]]:
    """The attainment staircase of a front: right from each point, then up to the next one."""
    xy: list[tuple[float, float]] = []
    for i, p in enumerate(front):
        if i:
            xy.append((p.cost, front[i - 1].accuracy))
        xy.append((p.cost, p.accuracy))
    return xy


def plot_fronts(points: Iterable[Point], path: str | Path, title: str = "") -> Path:
    """PNG: every point coloured by method (marker by family), each method's front as a step line, each budget of
    the study (`fliqs.budgets.budgets`) a thin dotted grey vertical line labelled with its fraction.

    Cost on x (logarithmic when the costs span more than 10x), accuracy on y.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _finite(points)
    groups = by_method(points)
    cmap = plt.get_cmap(PALETTE)
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, ps in groups.items():
        color = colors[method]
        for family in sorted({p.family for p in ps}):
            fam = [p for p in ps if p.family == family]
            ax.scatter([p.cost for p in fam], [p.accuracy for p in fam], color=color, alpha=0.55, s=28,
                       marker=FAMILY_MARKERS.get(family, "o"), edgecolors="none")
        seeds = {p.seed for p in ps}
        if len(seeds) > 1:  # every seed's own front, thin, under the front of all its seeds
            for seed in seeds:
                sxy = _steps(pareto_front([p for p in ps if p.seed == seed]))
                ax.plot([x for x, _ in sxy], [y for _, y in sxy], color=color, lw=0.7, alpha=0.45, ls="--")
        front = pareto_front(ps)
        xy = _steps(front)
        family = ps[0].family
        ax.plot([x for x, _ in xy], [y for _, y in xy], color=color, lw=1.6, marker=FAMILY_MARKERS.get(family, "o"),
                markevery=list(range(0, len(xy), 2)), ms=6, label=f"{method} ({family})")
        for p in front:
            if p.label:
                ax.annotate(p.label, (p.cost, p.accuracy), fontsize=6, xytext=(3, -8), textcoords="offset points")
    for budget in budgets(points):
        ax.axvline(budget.gbops, color="grey", lw=0.8, ls=":", zorder=0)
        # y in axes coordinates: the label stays at the top whatever the accuracies
        ax.text(budget.gbops, 0.98, budget.label, transform=ax.get_xaxis_transform(), rotation=90, fontsize=6,
                color="grey", ha="right", va="top")
    if _log_x([p.cost for p in points]):
        ax.set_xscale("log")
    ax.set_xlabel("cost (GBOPs, lower is better)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3, which="both")
    if groups:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "accuracy against cost: every trial, each method's front (dashed: per seed)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- MLflow ---------------------------------------------------------------------------------------------------

def collect_points(tracking_uri: str, experiment_name: str, parent_run_id: str | None = None) -> list[Point]:
    """A study's trials as Points, read through ``MlflowClient(tracking_uri)`` (a server or a SQLite store).

    Every active run of the experiment (only the children of ``parent_run_id`` when it is given) whose role is a
    point's (`fliqs.schema.POINT_ROLES`: a search or a study trial) with finite metrics ``test_accuracy`` and
    ``gbops``; method, family, seed, target fraction and uniform format come from the schema's tags, the target
    (GBOPs) from the metric ``target`` of a run with a target in GBOPs (tag `fliqs.schema.COST_TARGET`; a uniform
    run logs the metric too, and a size target is in MB: their ``target`` is None). Raises
    BadInput for an unknown experiment or parent run, a missing SQLite file or an unreachable server.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except MlflowException as err:
        raise BadInput(f"tracking URI {tracking_uri}: {err.message}") from None
    if experiment is None:
        raise BadInput(f"no experiment named {experiment_name!r} in {tracking_uri}")
    filter_string = ""
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException:
            raise BadInput(f"no run {parent_run_id!r} in {tracking_uri}") from None
        if parent.info.experiment_id != experiment.experiment_id:
            raise BadInput(f"run {parent_run_id!r} is not in experiment {experiment_name!r}")
        filter_string = f"tags.`{schema.PARENT}` = '{parent_run_id}'"
    points, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string=filter_string,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        for run in page:
            metrics, tags = run.data.metrics, run.data.tags
            accuracy, cost = metrics.get(schema.TEST_ACCURACY), metrics.get(schema.GBOPS)
            # A multi-trial candidate or a sequential search's phase is part of a trial, not a point of its own.
            if tags.get(schema.ROLE) not in schema.POINT_ROLES or accuracy is None or cost is None:
                continue
            if not (math.isfinite(accuracy) and math.isfinite(cost)):
                continue
            fraction, seed = tags.get(schema.TARGET_FRACTION), tags.get(schema.SEED)
            target = metrics.get(schema.TARGET)
            targeted = tags.get(schema.COST_TARGET, "").endswith(" GBOPs") and schema.UNIFORM_FORMAT not in tags
            target = float(target) if targeted and target is not None and math.isfinite(target) else None
            points.append(Point(method=tags[schema.METHOD], family=tags[schema.FAMILY], accuracy=float(accuracy),
                                cost=float(cost), run_id=run.info.run_id,
                                target_fraction=float(fraction) if fraction is not None else None,
                                seed=int(seed) if seed is not None else None,
                                label=tags.get(schema.UNIFORM_FORMAT, ""), target=target))
        token = page.token
        if not token:
            break
    return sorted(points, key=lambda p: (p.method, p.cost, -p.accuracy, p.run_id))


def metric_name(method: str) -> str:
    """``hypervolume_<method>``, with characters MLflow refuses in a metric name replaced by ``_``."""
    return schema.HYPERVOLUME_PREFIX + re.sub(r"[^A-Za-z0-9_\-. /]", "_", method)


def log_study_artifacts(tracking_uri: str, parent_run_id: str, points: Iterable[Point],
                        out_dir: str | Path) -> dict[str, float]:
    """Write and log the study's Pareto analysis on its parent run; returns {method: hypervolume}.

    Files in ``out_dir`` (logged at the root of the parent's artifacts): ``fronts.json``
    (``{"reference": {...}, "budgets": [...], "window": {...}, "methods": `study_report`, "paired":
    `paired_comparison` against FLIQS}``; budgets and window: `fliqs.budgets.budget_report`), ``summary.csv``
    (`write_csv`), ``methods.csv`` (`fliqs.review.method_rows`: per method its trials, front, hypervolume of all
    seeds, mean +- std over the seeds, the paired difference with FLIQS, best and cheapest point, accuracy at budget,
    landed cost / target and windowed hypervolume) and ``pareto.png`` (`plot_fronts`); the parent's description
    shows the per-method table, the accuracy-at-budget table and the plot (`fliqs.review.study_note`). Metrics on
    the parent: ``hypervolume_<method>`` (see `metric_name`), and ``hypervolume_mean_<method>`` /
    ``hypervolume_std_<method>`` over the seeds; tag ``hypervolume_reference``.
    """
    from fliqs.tracking import RunLogger

    points = _finite(points)
    if not points:
        raise BadInput(f"no trials with finite {schema.TEST_ACCURACY} and {schema.GBOPS} to analyse "
                       f"(parent run {parent_run_id})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = study_report(points)
    paired = paired_comparison(points, methods.DEFAULT)
    at_budget = budget_report(points)
    ref_cost, ref_acc = reference_point(points)
    (out / schema.FRONTS_FILE).write_text(json.dumps(
        {"reference": {"gbops": ref_cost, "accuracy": ref_acc, "rule": describe_reference(points)},
         "budgets": at_budget["budgets"], "window": at_budget["window"],
         "methods": report, "paired": {"reference_method": methods.DEFAULT, "methods": paired}}, indent=2))
    write_csv(points, out / schema.SUMMARY_CSV)
    plot_fronts(points, out / schema.PARETO_PLOT)
    hypervolumes = {m: r["hypervolume"] for m, r in report.items()}
    rows = method_rows(points, report, paired)
    with (out / schema.METHODS_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    logger = RunLogger(tracking_uri, parent_run_id)
    for name in schema.STUDY_FILES:
        logger.artifact(out / name)
    logger.metrics({**{metric_name(m): hv for m, hv in hypervolumes.items()},
                    **{metric_name(f"mean_{m}"): r["hypervolume_mean"] for m, r in report.items()},
                    **{metric_name(f"std_{m}"): r["hypervolume_std"] for m, r in report.items()}}, step=0)
    # The parent run's page shows the per-method table and the plot without opening a file.
    logger.tags({schema.HYPERVOLUME_REFERENCE: describe_reference(points),
                 schema.NOTE: study_note(rows, parent_run_id, describe_reference(points), at_budget)})
    return hypervolumes
