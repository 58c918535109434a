"""Pareto fronts of a study: accuracy against cost, per search method, with a hypervolume per method.

A study runs many trials (method x cost target x seed); each trial is an MLflow child run of the study's parent
run, tagged ``method`` and ``family``, with final metrics ``test_accuracy`` (0..1) and ``gbops`` (lower is
better). Everything here works on `Point` s: accuracy is maximised, cost minimised.

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

Files for people (`plot_fronts`: PNG; `write_html`: self-contained HTML with an inline SVG and a tooltip per
point; `write_csv`: one row per point) and MLflow glue (`collect_points` reads a study's trials,
`log_study_artifacts` logs fronts, files and ``hypervolume_<method>`` metrics on the parent run).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fliqs.errors import BadInput

REFERENCE_COST_MARGIN = 1.1
REFERENCE_ACCURACY = 0.0
CSV_COLUMNS = ["method", "family", "target", "seed", "accuracy", "gbops", "on_front", "run_id"]
ACCURACY_METRIC, COST_METRIC = "test_accuracy", "gbops"
REFERENCE_TAG = "hypervolume_reference"
HYPERVOLUME_METRIC_PREFIX = "hypervolume_"
ARTIFACT_FILES = ("fronts.json", "summary.csv", "pareto.png", "pareto.html")
LOG_SCALE_SPAN = 10.0  # the cost axis is logarithmic when max cost / min cost exceeds this
# matplotlib's tab10, so the PNG and the HTML colour methods alike
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
FAMILY_MARKERS = {"one-shot": "*", "multi-trial": "o", "differentiable": "s", "uniform": "D"}


@dataclass(frozen=True)
class Point:
    """One trial: its method and family, final accuracy (0..1) and cost (GBOPs), and where it came from."""

    method: str
    family: str
    accuracy: float
    cost: float
    run_id: str = ""
    target: float | None = None
    seed: int | None = None

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


def study_report(points: Iterable[Point]) -> dict[str, dict]:
    """``{method: {"front": [point dicts, by cost], "hypervolume": x}}`` (what ``fliqs pareto --json`` prints)."""
    points = list(points)
    hv = hypervolume_by_method(points)
    return {m: {"front": [p.to_dict() for p in front], "hypervolume": hv.get(m, 0.0)}
            for m, front in fronts_by_method(points).items()}


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
            rows.append({"method": method, "family": p.family, "target": p.target, "seed": p.seed,
                         "accuracy": p.accuracy, "gbops": p.cost, "on_front": id(p) in front_ids,
                         "run_id": p.run_id})
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


def _colors(methods: Sequence[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


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
    """PNG: every point coloured by method (marker by family), each method's front as a step line.

    Cost on x (logarithmic when the costs span more than 10x), accuracy on y.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _finite(points)
    groups = by_method(points)
    colors = _colors(list(groups))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, ps in groups.items():
        color = colors[method]
        for family in sorted({p.family for p in ps}):
            fam = [p for p in ps if p.family == family]
            ax.scatter([p.cost for p in fam], [p.accuracy for p in fam], color=color, alpha=0.55, s=28,
                       marker=FAMILY_MARKERS.get(family, "o"), edgecolors="none")
        front = pareto_front(ps)
        xy = _steps(front)
        family = ps[0].family
        ax.plot([x for x, _ in xy], [y for _, y in xy], color=color, lw=1.6, marker=FAMILY_MARKERS.get(family, "o"),
                markevery=list(range(0, len(xy), 2)), ms=6, label=f"{method} ({family})")
    if _log_x([p.cost for p in points]):
        ax.set_xscale("log")
    ax.set_xlabel("cost (GBOPs, lower is better)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3, which="both")
    if groups:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "accuracy against cost: every trial, and each method's Pareto front", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10.0 ** e for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    return ticks


def write_html(points: Iterable[Point], path: str | Path, title: str = "") -> Path:
    """A self-contained HTML page: an inline SVG scatter (hover a point for method, accuracy, GBOPs, run id),
    each method's front as a step line, a legend and a table of the fronts with hypervolumes. No JS, no CDN."""
    points = _finite(points)
    groups = by_method(points)
    colors = _colors(list(groups))
    width, height, left, right, top, bottom = 760, 460, 64, 190, 20, 48
    pw, ph = width - left - right, height - top - bottom
    costs = [p.cost for p in points] or [0.0, 1.0]
    accs = [p.accuracy for p in points] or [0.0, 1.0]
    log = _log_x(costs)
    if log:
        x_lo, x_hi = math.log10(min(costs)) - 0.05, math.log10(max(costs)) + 0.05
        ticks = _log_ticks(10 ** x_lo, 10 ** x_hi)
    else:
        pad = (max(costs) - min(costs)) * 0.05 or 0.5
        x_lo, x_hi = min(costs) - pad, max(costs) + pad
        ticks = _nice_ticks(x_lo, x_hi)
    pad = (max(accs) - min(accs)) * 0.05 or 0.05
    y_lo, y_hi = min(accs) - pad, max(accs) + pad

    def sx(c: float) -> float:
        v = math.log10(c) if log else c
        return left + (v - x_lo) / (x_hi - x_lo) * pw

    def sy(a: float) -> float:
        return top + (y_hi - a) / (y_hi - y_lo) * ph

    e = html.escape
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for t in ticks:
        x = sx(t)
        svg.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{t:g}</text>')
    for t in _nice_ticks(y_lo, y_hi, 5):
        y = sy(t)
        svg.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    scale = ", log scale" if log else ""
    svg.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">cost (GBOPs{scale}, lower is better)'
               '</text>'
               f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">test accuracy</text>')
    for i, (method, ps) in enumerate(groups.items()):
        color = colors[method]
        front = pareto_front(ps)
        on_front = {id(p) for p in front}
        svg.append(f'<g class="method" data-method="{e(method)}">')
        if len(front) > 1:
            pts = " ".join(f"{sx(c):.1f},{sy(a):.1f}" for c, a in _steps(front))
            svg.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        for p in ps:
            tip = (f"{p.method} ({p.family})\naccuracy {p.accuracy:.4f}\nGBOPs {p.cost:.6g}"
                   + (f"\ntarget {p.target:g}" if p.target is not None else "")
                   + (f"\nseed {p.seed}" if p.seed is not None else "")
                   + ("\non the front" if id(p) in on_front else "") + (f"\nrun {p.run_id}" if p.run_id else ""))
            r, opacity = (5, 0.95) if id(p) in on_front else (3.5, 0.5)
            svg.append(f'<circle cx="{sx(p.cost):.1f}" cy="{sy(p.accuracy):.1f}" r="{r}" fill="{color}" '
                       f'fill-opacity="{opacity}" stroke="{color}"><title>{e(tip)}</title></circle>')
        svg.append("</g>")
        ly = top + 12 + 18 * i
        svg.append(f'<circle cx="{left + pw + 16}" cy="{ly}" r="5" fill="{color}"/>'
                   f'<text x="{left + pw + 26}" y="{ly + 4}">{e(method)} ({e(ps[0].family)})</text>')
    svg.append("</svg>")

    hv = hypervolume_by_method(points)
    rows = []
    for method, front in fronts_by_method(points).items():
        for j, p in enumerate(front):
            rows.append("<tr>" + (f'<td rowspan="{len(front)}">{e(method)}</td><td rowspan="{len(front)}">'
                                  f"{hv[method]:.6g}</td>" if j == 0 else "")
                        + f"<td>{p.accuracy:.4f}</td><td>{p.cost:.6g}</td><td><code>{e(p.run_id)}</code></td></tr>")
    reference = e(describe_reference(points)) if points else "no points"
    heading = e(title or "Pareto fronts: accuracy against GBOPs")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
circle {{ cursor: pointer; }} circle:hover {{ stroke: #000; stroke-width: 2; }}
g.method:hover polyline {{ stroke-width: 3.5; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
</style></head><body>
<h2>{heading}</h2>
<p>{len(points)} trials, {len(groups)} methods. Hover a point for its method, accuracy, GBOPs and MLflow run;
large points are on their method's front. Hypervolume reference: {reference}.</p>
{"".join(svg)}
<h3>Fronts</h3>
<table><tr><th>method</th><th>hypervolume</th><th>accuracy</th><th>GBOPs</th><th>run id</th></tr>
{"".join(rows)}
</table></body></html>
"""
    path = Path(path)
    path.write_text(page)
    return path


# --- MLflow ---------------------------------------------------------------------------------------------------

# The study tags each trial with ``target_fraction`` ("None" for uniform formats) and ``seed``; a plain search
# run has the resolved target as metric ``target`` (in its cost unit) and ``seed`` as a param.
TARGET_KEYS = ("target_fraction", "target", "cost_target", "reward.target_fraction", "reward.target_gbops")
SEED_KEYS = ("seed",)
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


def _lookup(run, keys: Sequence[str], cast):
    """The first of ``keys`` present among the run's tags, params and metrics decides: its leading number through
    ``cast``, or None when it has none (``"None"``)."""
    for key in keys:
        for source in (run.data.tags, run.data.params, run.data.metrics):
            value = source.get(key)
            if value is None:
                continue
            match = _NUMBER.match(str(value))
            try:
                return cast(float(match.group(1))) if match else None
            except (ValueError, OverflowError):
                return None
    return None


def _check_store(tracking_uri: str) -> None:
    from fliqs.tracking import check_server

    if tracking_uri.startswith("sqlite:///") and ":memory:" not in tracking_uri:
        db = Path(tracking_uri[len("sqlite:///"):].split("?")[0])
        if not db.exists():  # MLflow would silently create an empty store
            raise BadInput(f"no MLflow store at {db} (tracking URI {tracking_uri})")
    check_server(tracking_uri)


def collect_points(tracking_uri: str, experiment_name: str, parent_run_id: str | None = None) -> list[Point]:
    """A study's trials as Points, read through ``MlflowClient(tracking_uri)`` (a server or a SQLite store).

    Every active run of the experiment (only the children of ``parent_run_id``, by tag ``mlflow.parentRunId``,
    when it is given) with metrics ``test_accuracy`` and ``gbops`` (finite) and a ``method`` tag; ``family`` is
    the tag of that name (``""`` without it), ``target`` and ``seed`` from the first of `TARGET_KEYS` /
    `SEED_KEYS` present among the tags, params and metrics (None when its value is not a number, e.g. "None").
    Raises BadInput for an unknown experiment or parent run, a missing SQLite file or an unreachable server.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _check_store(tracking_uri)
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
        filter_string = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    points, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string=filter_string,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        for run in page:
            metrics, tags = run.data.metrics, run.data.tags
            accuracy, cost, method = metrics.get(ACCURACY_METRIC), metrics.get(COST_METRIC), tags.get("method")
            # A multi-trial candidate or a sequential search's phase is part of a trial, not a point of its own.
            if accuracy is None or cost is None or not method or tags.get("role") in ("candidate", "phase"):
                continue
            if not (math.isfinite(accuracy) and math.isfinite(cost)):
                continue
            points.append(Point(method=method, family=tags.get("family", ""), accuracy=float(accuracy),
                                cost=float(cost), run_id=run.info.run_id, target=_lookup(run, TARGET_KEYS, float),
                                seed=_lookup(run, SEED_KEYS, int)))
        token = page.token
        if not token:
            break
    return sorted(points, key=lambda p: (p.method, p.cost, -p.accuracy, p.run_id))


def metric_name(method: str) -> str:
    """``hypervolume_<method>``, with characters MLflow refuses in a metric name replaced by ``_``."""
    return HYPERVOLUME_METRIC_PREFIX + re.sub(r"[^A-Za-z0-9_\-. /]", "_", method)


def log_study_artifacts(tracking_uri: str, parent_run_id: str, points: Iterable[Point],
                        out_dir: str | Path) -> dict[str, float]:
    """Write and log the study's Pareto analysis on its parent run; returns {method: hypervolume}.

    Files in ``out_dir`` (logged at the root of the parent's artifacts): ``fronts.json``
    (``{"reference": {...}, "methods": {method: {"front": [...], "hypervolume": x}}}``), ``summary.csv``
    (`write_csv`), ``pareto.png`` (`plot_fronts`) and ``pareto.html`` (`write_html`). Metrics on the parent:
    ``hypervolume_<method>`` (see `metric_name`); tag ``hypervolume_reference``: `describe_reference`.
    """
    from fliqs.tracking import RunLogger

    points = _finite(points)
    if not points:
        raise BadInput(f"no trials with finite {ACCURACY_METRIC} and {COST_METRIC} to analyse "
                       f"(parent run {parent_run_id})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = study_report(points)
    ref_cost, ref_acc = reference_point(points)
    (out / "fronts.json").write_text(json.dumps(
        {"reference": {"gbops": ref_cost, "accuracy": ref_acc, "rule": describe_reference(points)},
         "methods": report}, indent=2))
    write_csv(points, out / "summary.csv")
    plot_fronts(points, out / "pareto.png")
    write_html(points, out / "pareto.html")
    logger = RunLogger(tracking_uri, parent_run_id)
    for name in ARTIFACT_FILES:
        logger.artifact(out / name)
    hypervolumes = {m: r["hypervolume"] for m, r in report.items()}
    logger.metrics({metric_name(m): hv for m, hv in hypervolumes.items()}, step=0)
    logger.tags({REFERENCE_TAG: describe_reference(points)})
    return hypervolumes
