"""Runs' records in MLflow: a search's result plot (`log_search_plot`), and a study's trials read back as points
(`collect_points`), one row per point as CSV (`write_csv`), and the analysis logged on the parent run
(`log_study_artifacts`: fronts, budgets, files, plot, metrics and the parent's description)."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

from fliqs.analysis.budgets import budget_report
from fliqs.analysis.fronts import describe_reference, paired_comparison, pareto_front, reference_point, study_report
from fliqs.analysis.plots import plot_fronts, plot_search_result
from fliqs.analysis.points import Point, by_method, finite
from fliqs.analysis.review import method_rows, study_note
from fliqs.errors import BadInput
from fliqs.run import schema
from fliqs.run.tracking import RunLogger, check_store
from fliqs.searchers import methods

CSV_COLUMNS = ["method", "family", "label", "target_fraction", "target", "seed", "accuracy", "gbops", "on_front",
               "run_id"]


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


def collect_points(tracking_uri: str, experiment_name: str, parent_run_id: str | None = None) -> list[Point]:
    """A study's trials as Points, read through ``MlflowClient(tracking_uri)`` (a server or a SQLite store).

    Every active run of the experiment (only the children of ``parent_run_id`` when it is given) whose role is a
    point's (`fliqs.run.schema.POINT_ROLES`: a search or a study trial) with finite metrics ``test_accuracy`` and
    ``gbops``; method, family, seed, target fraction and uniform format come from the schema's tags, the target
    (GBOPs) from the metric ``target`` of a run with a target in GBOPs (tag `fliqs.run.schema.COST_TARGET`; a uniform
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
    `paired_comparison` against FLIQS}``; budgets and window: `fliqs.analysis.budgets.budget_report`), ``summary.csv``
    (`write_csv`), ``methods.csv`` (`fliqs.analysis.review.method_rows`: per method its trials, front, hypervolume
    of all seeds, mean +- std over the seeds, the paired difference with FLIQS, best and cheapest point, accuracy at
    budget, landed cost / target and windowed hypervolume) and ``pareto.png`` (`plot_fronts`); the parent's description
    shows the per-method table, the accuracy-at-budget table and the plot (`fliqs.analysis.review.study_note`).
    Metrics on the parent: ``hypervolume_<method>`` (see `metric_name`), and ``hypervolume_mean_<method>`` /
    ``hypervolume_std_<method>`` over the seeds; tag ``hypervolume_reference``.
    """
    points = finite(points)
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


HISTORY_KEYS = ("expected_gbops", "expected_mb", schema.BATCH_VAL_ACCURACY)  # what a result plot draws over steps


def log_search_plot(tracking_uri: str, experiment_id: str, run_id: str, summary: dict, model: str, dataset: str,
                    out_dir: str | Path) -> Path:
    """Draw and log a search run's result plot (`fliqs.analysis.plots.plot_search_result`, artifact
    `fliqs.run.schema.RESULT_PLOT`): the result and its argmax beside it, the target, the finished uniform runs of
    the same model and data in this experiment (mean accuracy per format), and the run's history of `HISTORY_KEYS`."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`{schema.METHOD}` = 'uniform' and tags.`{schema.MODEL}` = '{model}' and "
        f"tags.`{schema.DATASET}` = '{dataset}' and attributes.status = 'FINISHED'"),
        run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    per_format: dict[str, list[tuple[float, float]]] = {}
    for run in found:
        m = run.data.metrics
        if schema.GBOPS in m and schema.TEST_ACCURACY in m and schema.UNIFORM_FORMAT in run.data.tags:
            per_format.setdefault(run.data.tags[schema.UNIFORM_FORMAT], []).append((m[schema.GBOPS],
                                                                                   m[schema.TEST_ACCURACY]))
    references = [(f, sum(c for c, _ in v) / len(v), sum(a for _, a in v) / len(v)) for f, v in per_format.items()]
    unit = summary["target_unit"]
    cost = summary["gbops"] if unit == "GBOPs" else summary["size_mb"]
    argmax = summary.get(schema.alternative_metric(schema.ARGMAX, schema.TEST_ACCURACY))
    alternatives = [("policy argmax", summary[schema.ARGMAX_COST_RATIO] * summary["target"], argmax)] \
        if argmax is not None else []
    history = {key: [(h.step, h.value) for h in client.get_metric_history(run_id, key)] for key in HISTORY_KEYS}
    path = plot_search_result((cost, summary["accuracy"]), summary["target"], unit, Path(out_dir) / schema.RESULT_PLOT,
                              references=references if unit == "GBOPs" else [], alternatives=alternatives,
                              history=history, title=f"{summary['method']} {summary['run_name']}: test accuracy "
                                                     f"{summary['accuracy']:.4f} at {cost:.4g} {unit}")
    RunLogger(tracking_uri, run_id).artifact(path)
    return path
