"""Pareto fronts and hypervolumes (`fliqs.analysis.fronts`), their files, and a real MLflow SQLite study (with the
budget analysis of `fliqs.analysis.budgets` in its reports: `tests/test_budgets.py` tests the functions themselves).

The pure functions get hypothesis property tests; the MLflow part builds one store per module (experiment,
parent run, child runs) and starts the ``fliqs pareto`` subprocesses at once, so the file stays fast.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fliqs.analysis.fronts import (
    dominates,
    fronts_by_method,
    hypervolume,
    hypervolume_by_method,
    hypervolume_by_seed,
    paired_comparison,
    pareto_front,
    reference_point,
    study_report,
)
from fliqs.analysis.plots import plot_fronts
from fliqs.analysis.points import Point
from fliqs.analysis.store import CSV_COLUMNS, collect_points, log_study_artifacts, summary_rows, write_csv
from fliqs.run import schema

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ["fliqs", "random", "uniform"]
GRID_ACC = [0.1, 0.5, 0.5, 0.9]
GRID_COST = [1.0, 2.0, 2.0, 8.0]

# a small grid makes ties (equal cost, equal accuracy, identical points) frequent
accuracies = st.one_of(st.floats(0.0, 1.0), st.sampled_from(GRID_ACC))
costs = st.one_of(st.floats(0.01, 1000.0), st.sampled_from(GRID_COST))
points_st = st.lists(st.builds(Point, method=st.sampled_from(METHODS), family=st.just("f"), accuracy=accuracies,
                               cost=costs, run_id=st.text("abc", max_size=3)), max_size=25)
SETTINGS = settings(max_examples=150, deadline=None)

# The store fixture's study by hand: reference point 1.1 x the largest cost (130 GBOPs) = 143 at accuracy 0.
EXPECTED_HV = {"fliqs": (40 - 20) * 0.93 + (143 - 40) * 0.95, "random": (60 - 25) * 0.90 + (143 - 60) * 0.94,
               "uniform": (143 - 130) * 0.96}
BUDGET_KEYS = {"accuracy_at_budget", "landed_cost_ratio", "windowed_hypervolume", "windowed_hypervolume_mean",
               "windowed_hypervolume_std", "windowed_hypervolume_by_seed"}
REPORT_KEYS = {"front", "hypervolume", "hypervolume_mean", "hypervolume_std", "hypervolume_by_seed", *BUDGET_KEYS}


def _hv_by_accuracy(points: list[Point], ref_cost: float, ref_acc: float) -> float:
    """Independent hypervolume: integrate over accuracy levels the cost width still dominated."""
    inside = [p for p in points if p.cost < ref_cost and p.accuracy > ref_acc]
    levels = sorted({ref_acc, *(p.accuracy for p in inside)})
    area = 0.0
    for lo, hi in zip(levels, levels[1:], strict=False):
        cheapest = min(p.cost for p in inside if p.accuracy >= hi)
        area += (hi - lo) * (ref_cost - cheapest)
    return area


@SETTINGS
@given(points_st)
def test_front_points_are_not_dominated_and_others_are(points):
    front = pareto_front(points)
    assert [p.cost for p in front] == sorted(p.cost for p in front)
    for f in front:
        assert not any(dominates(q, f) for q in points)
    kept = {id(p) for p in front}
    for p in points:
        if id(p) not in kept:
            # dominated by a front point, or an identical copy of one
            assert any(dominates(f, p) or (f.cost, f.accuracy) == (p.cost, p.accuracy) for f in front)
    assert len({(p.cost, p.accuracy) for p in front}) == len(front)  # identical points: one kept


@SETTINGS
@given(points_st.filter(bool), st.data())
def test_adding_a_dominated_point_changes_neither_front_nor_hypervolume(points, data):
    front = pareto_front(points)
    base = data.draw(st.sampled_from(front))
    worse_acc = data.draw(st.floats(0.0, 0.5))
    worse_cost = data.draw(st.floats(0.0, 50.0))
    dominated = Point(base.method, "f", max(0.0, base.accuracy - worse_acc), base.cost + worse_cost, run_id="new")
    more = [*points, dominated]
    ref = reference_point(more)
    assert pareto_front(more) == front
    assert hypervolume(more, *ref) == hypervolume(points, *ref)


@SETTINGS
@given(points_st, st.builds(Point, method=st.just("fliqs"), family=st.just("f"), accuracy=accuracies, cost=costs),
       st.floats(0.5, 2000.0))
def test_hypervolume_is_monotone_and_matches_an_independent_integral(points, extra, ref_cost):
    before, after = hypervolume(points, ref_cost), hypervolume([*points, extra], ref_cost)
    assert after >= before - 1e-9 * max(1.0, before)
    assert before == pytest.approx(_hv_by_accuracy(points, ref_cost, 0.0), rel=1e-9, abs=1e-9)
    assert 0.0 <= before <= ref_cost * 1.0 + 1e-9


def test_hand_computed_hypervolume_and_ties():
    a, b, c = Point("m", "f", 0.5, 1.0), Point("m", "f", 0.7, 2.0), Point("m", "f", 0.9, 4.0)
    dominated = [Point("m", "f", 0.6, 3.0), Point("m", "f", 0.5, 1.5), Point("m", "f", 0.4, 1.0)]
    points = [c, *dominated, a, b, Point("m", "f", 0.7, 2.0, run_id="copy")]
    assert pareto_front(points) == [a, b, c]
    # (2-1)*0.5 + (4-2)*0.7 + (5-4)*0.9
    assert hypervolume(points, 5.0) == pytest.approx(2.8)
    assert hypervolume(points, 5.0, ref_accuracy=0.5) == pytest.approx(1 * 0.0 + 2 * 0.2 + 1 * 0.4)
    # beyond the reference: contributes nothing
    assert hypervolume(points, 3.0) == pytest.approx(1 * 0.5 + 1 * 0.7)
    assert hypervolume([Point("m", "f", 0.99, 6.0)], 5.0) == 0.0
    assert hypervolume([], 5.0) == 0.0
    assert pareto_front([Point("m", "f", float("nan"), 1.0), a]) == [a]


def test_reference_point_is_shared_by_all_methods_of_a_study():
    points = [Point("cheap", "uniform", 0.6, 1.0), Point("cheap", "uniform", 0.7, 2.0),
              Point("big", "one-shot", 0.9, 10.0), Point("big", "one-shot", 0.8, 5.0)]
    assert reference_point(points) == (pytest.approx(11.0), 0.0)
    hv = hypervolume_by_method(points)
    assert set(hv) == {"cheap", "big"}
    assert hv["cheap"] == pytest.approx(hypervolume(points[:2], 11.0)) == pytest.approx(1 * 0.6 + 9 * 0.7)
    assert hv["big"] == pytest.approx(5 * 0.8 + 1 * 0.9)
    # the most expensive point of the study still contributes (10 % margin)
    assert hypervolume([points[2]], *reference_point(points)) == pytest.approx(1.0 * 0.9)
    assert [p.cost for p in fronts_by_method(points)["big"]] == [5.0, 10.0]
    report = study_report(points)
    assert set(report["big"]) == REPORT_KEYS and report["big"]["front"][0]["gbops"] == 5.0
    assert report["big"]["accuracy_at_budget"] == [] and report["big"]["windowed_hypervolume"] is None  # no targets
    with pytest.raises(ValueError):
        reference_point([])


STUDY = [  # method, family, accuracy, gbops, target fraction, seed, label (uniform format)
    ("fliqs", "one-shot", 0.93, 20.0, 0.3, 0, ""), ("fliqs", "one-shot", 0.95, 40.0, 0.6, 0, ""),
    ("fliqs", "one-shot", 0.92, 45.0, 0.6, 1, ""),  # dominated
    ("random", "multi-trial", 0.90, 25.0, 0.3, 0, ""), ("random", "multi-trial", 0.94, 60.0, 0.6, 0, ""),  # 60 > 50
    ("uniform", "uniform", 0.96, 130.0, None, 0, "int8"),
]
TARGETS = {0.3: 30.0, 0.6: 50.0}  # GBOPs of each target fraction: the study's budgets
# The study at its budgets by hand (methods by name):
# 30 GBOPs: fliqs seed 0 0.93 (20 GBOPs), seed 1 none (45): 0.93 from 1 of 2 seeds; random 0.90 (25); uniform none
# 50 GBOPs: fliqs seed 0 max(0.93, 0.95), seed 1 0.92: mean 0.935, std 0.015 sqrt(2) = 0.021; random 0.90 (60 is over)
AT_30 = ["0.930 +- 0.000 (1/2)", "0.900 +- 0.000 (1/1)", "none within budget"]
AT_50 = ["0.935 +- 0.021 (2/2)", "0.900 +- 0.000 (1/1)", "none within budget"]
# window [30, 50]: fliqs (10 x 0.93 + 10 x 0.95) / 20 = 0.94 (seed 0 the same, seed 1 5 x 0.92 / 20 = 0.23); random
# 0.90 throughout; uniform 0 (nothing under 130 GBOPs)
WINDOWED = {"fliqs": 0.94, "random": 0.90, "uniform": 0.0}


def _study_points() -> list[Point]:
    return [Point(m, f, a, c, run_id=f"r{i}", target_fraction=t, seed=s, label=label, target=TARGETS.get(t))
            for i, (m, f, a, c, t, s, label) in enumerate(STUDY)]


def test_files_csv_png(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []  # the budget lines and their labels, as plot_fronts draws them
    axvline, text = Axes.axvline, Axes.text
    monkeypatch.setattr(Axes, "axvline",
                        lambda ax, x, **kw: drawn.append(("line", x, kw["ls"])) or axvline(ax, x, **kw))
    monkeypatch.setattr(Axes, "text",
                        lambda ax, x, y, s, **kw: drawn.append(("text", x, s)) or text(ax, x, y, s, **kw))
    points = [*_study_points(), Point("tiny", "uniform", 0.5, 0.5)]  # costs span > 10x: log axis
    png = plot_fronts(points, tmp_path / "p.png", title="t")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    # each budget a dotted vertical line labelled with its fraction
    assert drawn == [("line", 30.0, ":"), ("text", 30.0, "0.3x int8"), ("line", 50.0, ":"), ("text", 50.0, "0.6x int8")]
    rows = list(csv.DictReader(write_csv(points, tmp_path / "s.csv").open()))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == len(points)
    on_front = {(r["method"], float(r["gbops"])): r["on_front"] for r in rows}
    assert on_front[("fliqs", 45.0)] == "False" and on_front[("fliqs", 40.0)] == "True"
    uniform = next(r for r in rows if r["method"] == "uniform" and r["label"] == "int8")
    assert uniform["target_fraction"] == "" and uniform["target"] == "" and uniform["seed"] == "0"
    assert {float(r["target"]) for r in rows if r["method"] == "fliqs"} == {30.0, 50.0}
    assert sum(r["on_front"] for r in summary_rows(points)) == 6
    # linear axis and degenerate inputs still give files
    assert plot_fronts(points[:2], tmp_path / "lin.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_fronts([], tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


# --- a real MLflow SQLite store ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An experiment 'study' with a parent run, the STUDY children, and runs collect_points must skip."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("pareto")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("study", artifact_location=(tmp / "mlartifacts").as_uri())
    client.create_experiment("other", artifact_location=(tmp / "other").as_uri())
    parent = client.create_run(exp, run_name="study").info.run_id
    other_parent = client.create_run(exp, run_name="older-study").info.run_id
    children = {}

    def child(parent_id, tags, metrics, params=()):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent_id, **tags}).info.run_id
        client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)) for k, v in params])
        client.set_terminated(run)
        return run

    for i, (m, f, a, c, t, s, label) in enumerate(STUDY):  # tagged as the run schema says (trainables/search.py)
        tags = {schema.ROLE: schema.TRIAL, schema.METHOD: m, schema.FAMILY: f, schema.SEED: str(s),
                **({schema.TARGET_FRACTION: repr(t), schema.COST_TARGET: f"{TARGETS[t]:.6g} GBOPs"} if t is not None
                   else {schema.UNIFORM_FORMAT: label})}
        # a uniform run logs a target too (the int8 cost it was planned against): not a target of its own
        metrics = {"test_accuracy": a, "gbops": c, "target": TARGETS[t] if t is not None else 1.5 * c,
                   "size_mb": 1.0, "wall_s": 3.0, "worker_s": 6.0, "epochs": 2}
        children[i] = child(parent, tags, metrics, [("seed", s + 100), ("reward.target_fraction", 0.5)])
    trial = {schema.ROLE: schema.TRIAL, schema.FAMILY: "multi-trial", schema.SEED: "0"}
    child(parent, {**trial, schema.METHOD: "tpe"}, {"test_accuracy": 0.9})  # no gbops: unfinished
    child(parent, {schema.METHOD: "tpe", schema.FAMILY: "multi-trial"}, {"test_accuracy": 0.9, "gbops": 1.0})  # no role
    # a multi-trial candidate (a child of its trial run): part of the trial, never a point of its own
    candidate = child(children[3], {schema.METHOD: "random", schema.ROLE: schema.CANDIDATE},
                      {"test_accuracy": 0.99, "gbops": 1.0})
    # a plain search run: role search, seed 7, target fraction 0.4, a size target (MB: not a budget in GBOPs)
    child(other_parent, {schema.ROLE: schema.SEARCH, schema.METHOD: "mnasnet", schema.FAMILY: "multi-trial",
                         schema.SEED: "7", schema.TARGET_FRACTION: "0.4", schema.COST_TARGET: "0.5 MB"},
          {"test_accuracy": 0.99, "gbops": 1.0, "target": 0.5})
    # MLflow's telemetry waits seconds at exit for a network that tests do not have
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cli = [sys.executable, "-m", "fliqs.cli", "pareto"]
    jobs = {"table": [*cli, "--experiment", "study", "--tracking-uri", uri, "--parent", parent],
            "json": [*cli, "--experiment", "study", "--parent", parent, "--json"],  # URI from the environment
            "unknown": [*cli, "--experiment", "nope", "--tracking-uri", uri],
            # the store named as evaluate and export name it
            "overrides": [*cli, f"tracking.uri={uri}", "tracking.experiment=study", "--parent", parent]}
    procs = {k: subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, cmd in jobs.items()}
    yield {"uri": uri, "client": client, "parent": parent, "children": children, "tmp": tmp, "procs": procs,
           "candidate": candidate}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _finished(store, key: str) -> subprocess.CompletedProcess:
    proc = store["procs"][key]
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_collect_points_reads_the_children_of_the_parent(store):
    points = collect_points(store["uri"], "study", store["parent"])
    assert sorted(p.run_id for p in points) == sorted(store["children"].values())
    by_run = {p.run_id: p for p in points}
    for i, (m, f, a, c, t, s, label) in enumerate(STUDY):
        p = by_run[store["children"][i]]
        assert (p.method, p.family, p.accuracy, p.cost, p.target_fraction, p.seed, p.label) == (m, f, a, c, t, s, label)
        assert p.target == (TARGETS[t] if t is not None else None)  # uniform: None, whatever its target metric
        assert json.loads(json.dumps(p.to_dict()))["target"] == p.target
    everything = collect_points(store["uri"], "study")  # no parent: the other study's child as well
    assert {p.method for p in everything} == {"fliqs", "random", "uniform", "mnasnet"}
    assert store["candidate"] not in {p.run_id for p in everything}
    rl = next(p for p in everything if p.method == "mnasnet")
    assert (rl.target_fraction, rl.seed, rl.target) == (0.4, 7, None)
    assert collect_points(store["uri"], "other") == []


@pytest.mark.parametrize("args, fragment", [
    (("nope",), "'nope'"),
    (("study", "0123456789abcdef"), "0123456789abcdef"),
    (("other", "PARENT"), "not in experiment 'other'"),
])
def test_collect_points_bad_input(store, args, fragment):
    from fliqs.errors import BadInput

    args = tuple(store["parent"] if a == "PARENT" else a for a in args)
    with pytest.raises(BadInput, match=fragment):
        collect_points(store["uri"], *args)


def test_collect_points_does_not_create_a_missing_store(tmp_path):
    from fliqs.errors import BadInput

    with pytest.raises(BadInput, match="no MLflow store"):
        collect_points(f"sqlite:///{tmp_path / 'missing.db'}", "study")
    assert not (tmp_path / "missing.db").exists()


def test_log_study_artifacts_on_the_parent_run(store, tmp_path):
    client, parent = store["client"], store["parent"]
    points = collect_points(store["uri"], "study", parent)
    hv = log_study_artifacts(store["uri"], parent, points, tmp_path / "out")
    ref = 1.1 * 130.0
    assert hv == pytest.approx(EXPECTED_HV)
    run = client.get_run(parent)
    for method, value in hv.items():
        assert run.data.metrics[f"hypervolume_{method}"] == pytest.approx(value)
    reference = run.data.tags[schema.HYPERVOLUME_REFERENCE]
    assert "143" in reference and "accuracy=0" in reference
    assert {a.path for a in client.list_artifacts(parent)} == set(schema.STUDY_FILES)
    assert all(a.file_size > 0 for a in client.list_artifacts(parent))
    local = Path(client.download_artifacts(parent, "fronts.json", str(tmp_path)))
    fronts = json.loads(local.read_text())
    assert fronts["reference"]["gbops"] == pytest.approx(ref)
    assert [p["gbops"] for p in fronts["methods"]["fliqs"]["front"]] == [20.0, 40.0]
    assert fronts["budgets"] == [{"gbops": 30.0, "fraction": 0.3, "label": "0.3x int8"},
                                 {"gbops": 50.0, "fraction": 0.6, "label": "0.6x int8"}]
    assert fronts["window"] == {"lo_gbops": 30.0, "hi_gbops": 50.0}
    assert fronts["methods"]["uniform"]["accuracy_at_budget"][0]["mean"] is None
    assert {m: fronts["methods"][m]["windowed_hypervolume"] for m in WINDOWED} == pytest.approx(WINDOWED)
    png = Path(client.download_artifacts(parent, "pareto.png", str(tmp_path)))
    assert png.read_bytes()[:8] == PNG_MAGIC
    note = run.data.tags[schema.NOTE]
    assert "**Accuracy at budget**" in note and "| at 0.3x int8 (30 GBOPs) | at 0.6x int8 (50 GBOPs) |" in note
    assert f"| fliqs | {AT_30[0]} | {AT_50[0]} | 0.667 +- 0.000, max 0.667, 0/1 over | " in note
    assert "| uniform | none within budget | none within budget | - | - | 0.0000 |" in note
    assert "| random | 0.900 +- 0.000 (1/1) | 0.900 +- 0.000 (1/1) | 0.833 +- 0.000, max 0.833, 0/1 over | " \
           "1.200 +- 0.000, max 1.200, 1/1 over | 0.9000 |" in note


def test_methods_csv_has_accuracy_at_budget_landed_and_windowed_columns(store, tmp_path):
    log_study_artifacts(store["uri"], store["parent"], collect_points(store["uri"], "study", store["parent"]),
                        tmp_path)
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / schema.METHODS_CSV).open())}
    for key in ("0.3x", "0.6x"):
        assert {f"acc_at_{key}_mean", f"acc_at_{key}_std", f"acc_at_{key}_seeds", f"landed_{key}_mean",
                f"landed_{key}_std", f"landed_{key}_max", f"landed_{key}_over"} <= set(rows["fliqs"])
    assert {"windowed_hypervolume", "windowed_hypervolume_mean", "windowed_hypervolume_std"} <= set(rows["fliqs"])
    # hand values: see AT_30 / AT_50 / WINDOWED; fliqs at 50: std 0.015 sqrt(2); landed at 0.6: 40/50 and 45/50
    fliqs = rows["fliqs"]
    assert (float(fliqs["acc_at_0.3x_mean"]), fliqs["acc_at_0.3x_seeds"]) == (0.93, "1/2")
    assert float(fliqs["acc_at_0.6x_std"]) == pytest.approx(0.015 * math.sqrt(2), rel=1e-5)
    assert float(fliqs["landed_0.6x_mean"]) == pytest.approx(0.85) and float(fliqs["landed_0.6x_max"]) == 0.9
    assert float(fliqs["windowed_hypervolume"]) == pytest.approx(0.94)
    # seeds 0 and 1: 0.94 and 5 x 0.92 / 20 = 0.23
    assert float(fliqs["windowed_hypervolume_mean"]) == pytest.approx((0.94 + 0.23) / 2)
    assert (rows["random"]["landed_0.6x_mean"], rows["random"]["landed_0.6x_over"]) == ("1.2", "1")  # 60 / 50
    uniform = rows["uniform"]
    assert uniform["acc_at_0.3x_mean"] == uniform["acc_at_0.6x_mean"] == "none within budget"
    assert uniform["acc_at_0.3x_seeds"] == "0/1" and uniform["landed_0.3x_mean"] == ""  # no target: no landing


def test_cli_pareto_table(store):
    proc = _finished(store, "table")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    same = _finished(store, "overrides")
    assert same.returncode == 0 and same.stdout == out, same.stderr
    for method in ("fliqs", "random", "uniform"):
        assert f"{method} (" in out
    assert "hypervolume" in out and store["children"][1] in out and store["children"][2] not in out
    assert "run_id" in out and "0.9500" in out and "reference: gbops=143" in out
    # after the fronts: the accuracy at budget, one row per method, hand values in AT_30 / AT_50
    assert out.index("accuracy at budget (best test accuracy with cost <= budget") > out.index(store["children"][1])
    table = out.split("accuracy at budget (")[1].split("landed cost")[0]
    cells = {row[0]: row[1:] for row in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines())
             if row[0] in METHODS}  # columns: method, at 30, at 50, windowed HV, per seed
    for method, at30, at50 in zip(METHODS, AT_30, AT_50, strict=True):
        assert cells[method][:3] == [at30, at50, f"{WINDOWED[method]:.4f}"]
    assert "landed cost / target" in out and "1.200 +- 0.000, max 1.200, 1/1 over" in out


def test_cli_pareto_json(store):
    proc = _finished(store, "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"fliqs", "random", "uniform"}
    assert all(set(v) == REPORT_KEYS for v in data.values())
    at = {m: [(e["label"], e["mean"], e["seeds_within"], e["seeds"]) for e in v["accuracy_at_budget"]]
          for m, v in data.items()}
    assert at["fliqs"] == [("0.3x int8", 0.93, 1, 2), ("0.6x int8", pytest.approx(0.935), 2, 2)]
    assert at["random"] == [("0.3x int8", 0.90, 1, 1), ("0.6x int8", 0.90, 1, 1)]
    assert at["uniform"] == [("0.3x int8", None, 0, 1), ("0.6x int8", None, 0, 1)]  # none within budget: null
    assert data["fliqs"]["accuracy_at_budget"][0]["by_seed"] == {"0": 0.93, "1": None}
    assert {m: v["windowed_hypervolume"] for m, v in data.items()} == pytest.approx(WINDOWED)
    assert [p["run_id"] for p in data["fliqs"]["front"]] == [store["children"][0], store["children"][1]]
    assert {m: v["hypervolume"] for m, v in data.items()} == pytest.approx(EXPECTED_HV)


def test_cli_pareto_unknown_experiment_exits_2(store):
    proc = _finished(store, "unknown")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "'nope'" in lines[0], proc.stderr


def test_cli_pareto_needs_a_tracking_uri(monkeypatch, capsys):
    from fliqs.cli import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run(["pareto", "--experiment", "study"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tracking-uri" in err[0]


def test_hypervolume_per_seed_and_the_paired_comparison_by_hand():
    pts = [Point("fliqs", "one-shot", 0.9, 1.0, seed=0), Point("fliqs", "one-shot", 0.8, 1.0, seed=1),
           Point("random", "multi-trial", 0.7, 1.0, seed=0), Point("random", "multi-trial", 0.85, 1.0, seed=1),
           Point("uniform", "uniform", 0.5, 2.0, seed=0)]
    ref = 1.1 * 2.0  # the shared reference, over every seed and method
    seeds = hypervolume_by_seed(pts)
    assert seeds["fliqs"] == pytest.approx({0: (ref - 1) * 0.9, 1: (ref - 1) * 0.8})
    assert seeds["uniform"] == pytest.approx({0: (ref - 2) * 0.5})
    report = study_report(pts)
    assert report["fliqs"]["hypervolume_mean"] == pytest.approx((ref - 1) * 0.85)
    assert report["fliqs"]["hypervolume_std"] == pytest.approx((ref - 1) * 0.1 / math.sqrt(2))
    assert report["fliqs"]["hypervolume"] == pytest.approx((ref - 1) * 0.9)  # all seeds' points in one front
    paired = paired_comparison(pts, "fliqs")
    assert paired["random"]["mean_difference"] == pytest.approx((ref - 1) * (0.2 - 0.05) / 2)
    assert (paired["random"]["reference_ahead"], paired["random"]["reference_behind"]) == (1, 1)
    assert paired["uniform"]["seeds"] == 1 and "fliqs" not in paired
    assert paired_comparison(pts, "dnas") == {}
