"""The review path in MLflow's UI: where a person looks at a search or a study, and what the pages say.

MLflow 3's UI opens on its GenAI pages (traces, tokens) unless told otherwise. fliqs tells it three ways:

* every experiment fliqs creates is of kind "custom model development" (`fliqs.run.schema.EXPERIMENT_KIND`), and
  its description (`fliqs.run.tracking.EXPERIMENT_NOTE`) says where to look. (MLflow 3.17 still opens an
  experiment's plain address on its GenAI overview in a browser whose GenAI / Model training switch was never
  moved: the description shows there too);
* the links fliqs prints go straight to the runs table in chart view (``workflowType=machine_learning``, MLflow's
  "Model training" side, and ``compareRunsMode=CHART``) and to a run's page;
* a search run's description (its Overview tab) holds its result and its format per layer, a study's parent run's
  description holds the per-method table and the Pareto plot (also logged as ``methods.csv`` and ``pareto.png``,
  which the Artifacts tab shows as a table and an image).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from fliqs.analysis.budgets import (
    AT_BUDGET_TITLE,
    NONE_WITHIN,
    Budget,
    format_at_budget,
    format_landed,
    format_windowed,
    landed_at,
    ranked_methods,
    report_budgets,
    window_text,
)
from fliqs.analysis.fronts import pareto_front
from fliqs.analysis.points import by_method
from fliqs.run import schema
from fliqs.run.config import DEFAULT_EXPERIMENT

DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
ML_VIEW = "workflowType=machine_learning"


def ui_base(uri: str) -> str:
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI


def runs_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs table in chart view."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{ML_VIEW}&compareRunsMode=CHART"


def run_url(uri: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    tail = f"/artifacts/{artifact}" if artifact else ""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}{tail}?{ML_VIEW}"


def ui_command(uri: str) -> str | None:
    """How to start the UI on a local store (None for a server: it is the UI)."""
    if uri.startswith(("http://", "https://")):
        return None
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return f"{python} -m mlflow ui --backend-store-uri {uri} --port 5000"


def store_args(uri: str, output_dir: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The overrides that find a store again on the command line (evaluate, export, pareto): ``output_dir=`` for the
    store an output_dir holds, ``tracking.uri=`` otherwise, and the experiment when it is not the default."""
    own = uri == f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
    where = f"output_dir={Path(output_dir).resolve()}" if own else f"tracking.uri={uri}"
    return where + ("" if experiment == DEFAULT_EXPERIMENT else f" tracking.experiment={experiment}")


def command_lines(summary: Mapping) -> list[str]:
    """The commands that take a finished search further, runnable as printed (tests/test_export.py runs them)."""
    store = store_args(summary["mlflow_tracking_uri"], summary["output_dir"], summary["experiment"])
    return [f"Evaluate: fliqs evaluate {summary['run_name']} {store}",
            f"Export:   fliqs export {summary['run_name']} {store} --to DIR [--onnx]"]


def review_lines(uri: str, experiment_id: str, run_id: str, what: str = "run") -> list[str]:
    lines = [f"Review in MLflow: {ui_command(uri)}, then" if ui_command(uri) else "Review in MLflow:"]
    lines.append(f"  runs and charts  {runs_url(uri, experiment_id)}")
    lines.append(f"  this {what:<11} {run_url(uri, experiment_id, run_id)}")
    return lines


def search_note(summary: Mapping) -> str:
    """Markdown for a search run's description: the result and the format per layer."""
    unit = summary["target_unit"]
    cost = summary["gbops"] if unit == "GBOPs" else summary["size_mb"]
    lines = [f"**{summary['method']}**: test accuracy **{summary['accuracy']:.4f}** (no retraining) at "
             f"**{cost:.4g} {unit}** against a target of {summary['target']:.4g} {unit} "
             f"({summary['gbops']:.4g} GBOPs, {summary['size_mb']:.4g} MB, {summary['epochs']:g} epochs).", ""]
    if summary.get("architecture"):
        lines += [f"Architecture: `{summary['architecture']}`", ""]
    lines += ["| layer | weight | activation |", "|---|---|---|"]
    lines += [f"| {name} | {f['w']} | {f['a']} |" for name, f in summary["assignment"].items()]
    lines += ["", f"![result against its target](get-artifact?path={schema.RESULT_PLOT}&run_uuid="
                  f"{summary['mlflow_run_id']})", "",
              f"Policy over training: `{schema.POLICY_PLOT_FILE}` (Artifacts). Evaluate and take the model out:", ""]
    lines += [f"    {line.split(':', 1)[1].strip()}" for line in command_lines(summary)]
    return "\n".join(lines)


def _budget_columns(entry: Mapping) -> dict:
    """A method's accuracy at budget (``acc_at_<budget>_mean`` / ``_std`` / ``_seeds``, the mean reading ``none
    within budget`` where no seed has a point within it), landed cost / target (``landed_<budget>_mean`` / ``_std``
    / ``_max`` / ``_over``, empty where the method was not aimed at that budget) and windowed hypervolume columns."""
    columns: dict = {}
    at_budget = entry.get("accuracy_at_budget", [])  # one entry per budget of the study, for every method
    for stats in at_budget:
        key, none = Budget(stats["gbops"], stats["fraction"]).key, stats["mean"] is None
        columns.update({f"acc_at_{key}_mean": NONE_WITHIN if none else stats["mean"],
                        f"acc_at_{key}_std": "" if none else stats["std"],
                        f"acc_at_{key}_seeds": f"{stats['seeds_within']}/{stats['seeds']}"})
    for stats in at_budget:
        b = Budget(stats["gbops"], stats["fraction"])
        landed = landed_at(entry, b.gbops) or {}
        columns.update({f"landed_{b.key}_{k}": landed.get(k, "") for k in ("mean", "std", "max", "over")})
    for k in ("windowed_hypervolume", "windowed_hypervolume_mean", "windowed_hypervolume_std"):
        value = entry.get(k)
        columns[k] = "" if value is None else value
    return columns


def method_rows(points: Iterable, report: Mapping[str, dict], paired: Mapping[str, dict]) -> list[dict]:
    """One row per method of a study: family, trials, points on its front, hypervolume (all seeds' points; mean
    and std over the seeds' own fronts), FLIQS' paired hypervolume difference, its most accurate and its cheapest
    point, then per budget its accuracy at budget and landed cost / target, and its windowed hypervolume
    (`fliqs.analysis.budgets`). ``report``: `fliqs.analysis.fronts.study_report`; ``paired``:
    `fliqs.analysis.fronts.paired_comparison`."""

    rows = []
    for method, ps in by_method(points).items():
        best = max(ps, key=lambda p: (p.accuracy, -p.cost))
        cheapest = min(ps, key=lambda p: (p.cost, -p.accuracy))
        r, c = report[method], paired.get(method, {})
        rows.append({"method": method, "family": ps[0].family, "trials": len(ps),
                     "on_front": len(pareto_front(ps)), "hypervolume": r["hypervolume"],
                     "hypervolume_mean": r["hypervolume_mean"], "hypervolume_std": r["hypervolume_std"],
                     "seeds": len(r["hypervolume_by_seed"]), "fliqs_minus_method": c.get("mean_difference", ""),
                     "fliqs_minus_method_std": c.get("std_difference", ""),
                     "fliqs_ahead_of_seeds": f"{c['reference_ahead']}/{c['seeds']}" if c else "",
                     "best_accuracy": best.accuracy, "best_gbops": best.cost,
                     "cheapest_gbops": cheapest.cost, "cheapest_accuracy": cheapest.accuracy,
                     **_budget_columns(r)})
    return sorted(rows, key=lambda r: -r["hypervolume"])


def budget_note(at_budget: Mapping) -> list[str]:
    """Markdown lines of a `fliqs.analysis.budgets.budget_report`: "Accuracy at budget", one row per method and one
    column per budget (``0.952 +- 0.017 (3/3)`` or ``none within budget``), then landed cost / target per budget,
    then the windowed hypervolume."""
    study_budgets = report_budgets(at_budget)
    if not study_budgets:
        return ["**Accuracy at budget**: no trial has a cost target (uniform formats only)."]
    methods = at_budget["methods"]
    n = len(study_budgets)
    lines = ["**Accuracy at budget**" + AT_BUDGET_TITLE.removeprefix("accuracy at budget") + ". Landed cost / "
             "target: each point's cost over its own target (mean +- std, max, points over their target). Windowed "
             f"hypervolume: the mean accuracy at budget over {window_text(at_budget)}.", "",
             "| method | " + " | ".join(f"at {b.heading}" for b in study_budgets) + " | "
             + " | ".join(f"landed / target at {b.label}" for b in study_budgets)
             + " | windowed hypervolume | per seed (mean +- std) |",
             "|---|" + "---:|" * n + "---|" * n + "---:|---|"]
    for m in ranked_methods(at_budget):
        entry = methods[m]
        cells = [format_at_budget(s) for s in entry["accuracy_at_budget"]]
        cells += [format_landed(landed_at(entry, b.gbops)) for b in study_budgets]
        lines.append(f"| {m} | " + " | ".join([*cells, *format_windowed(entry)]) + " |")
    return lines


def study_note(rows: list[dict], parent_run_id: str, reference: str, at_budget: Mapping | None = None) -> str:
    """Markdown for a study's parent run: the per-method table, the accuracy-at-budget table of ``at_budget`` (a
    `fliqs.analysis.budgets.budget_report`; left out when None), then the Pareto plot itself."""
    lines = ["| method | family | trials | on front | hypervolume | per seed (mean +- std) | FLIQS - method "
             "(ahead/seeds) | best accuracy (GBOPs) | cheapest GBOPs (accuracy) |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['family'] or '-'} | {r['trials']} | {r['on_front']} | {r['hypervolume']:.4g} | "
              f"{r['hypervolume_mean']:.4g} +- {r['hypervolume_std']:.2g} | "
              + (f"{r['fliqs_minus_method']:+.3g} +- {r['fliqs_minus_method_std']:.2g} ({r['fliqs_ahead_of_seeds']})"
                 if r["fliqs_ahead_of_seeds"] else "") + " | "
              f"{r['best_accuracy']:.4f} ({r['best_gbops']:.4g}) | {r['cheapest_gbops']:.4g} "
              f"({r['cheapest_accuracy']:.4f}) |" for r in rows]
    if at_budget is not None:
        lines += ["", *budget_note(at_budget)]
    lines += ["", f"Hypervolume reference: {reference}. Trials: the child runs; every point: `{schema.SUMMARY_CSV}`.",
              "", f"![Pareto fronts](get-artifact?path={schema.PARETO_PLOT}&run_uuid={parent_run_id})"]
    return "\n".join(lines)
