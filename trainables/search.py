"""`fliqs search`: one run of a method at one cost target — validate, plan, create the MLflow run, run the method's
runner, write ``result.json``.

Everything that can be wrong with the input is checked before Ray starts a worker (`fliqs.trainables.plan`: the one
validation pass and the plan, and the environment: the tracking server, the workers the cluster can hold).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fliqs.analysis.review import command_lines, review_lines, search_note
from fliqs.analysis.store import log_search_plot
from fliqs.errors import BadInput
from fliqs.run import schema
from fliqs.run.config import FliqsConfig, to_flat_dict
from fliqs.run.console import progress, table
from fliqs.run.tracking import RunLogger, check_server, client, end_status, open_experiment, start_run, tracking_uri
from fliqs.run.watch import watch_run
from fliqs.searchers import methods
from fliqs.trainables.cluster import check_workers, init_ray
from fliqs.trainables.fit import RunContext
from fliqs.trainables.plan import Plan, make_plan
from fliqs.trainables.result import RunResult


def run_tags(plan: Plan, role: str) -> dict[str, str]:
    """The schema tags of a run that is a point of a Pareto analysis (a search, or a study's trial)."""
    cfg = plan.cfg
    spec = methods.get(cfg.method)
    tags = {schema.ROLE: role, schema.METHOD: cfg.method, schema.FAMILY: spec.family, schema.SEED: str(cfg.seed),
            schema.SEARCH_SPACE: cfg.space.name, schema.MODEL: cfg.model.name, schema.DATASET: cfg.data.name}
    if spec.per_format:
        tags[schema.UNIFORM_FORMAT] = cfg.quant.uniform_format
    else:
        tags[schema.COST_TARGET] = f"{plan.target:.6g} {plan.unit}"
        if cfg.reward.target_gbops is None:
            tags[schema.TARGET_FRACTION] = repr(float(cfg.reward.target_fraction))
    return tags


def run_method(run: RunContext) -> RunResult:
    """The method's runner (its registry entry) on ``run``."""
    return methods.resolve(methods.get(run.cfg.method).runner)(run)


def run_search(cfg: FliqsConfig) -> dict:
    """Run one search end to end and return the result dict (also written to result.json)."""
    spec = methods.get(cfg.method)
    plan = make_plan(cfg)
    output_dir = Path(cfg.output_dir).resolve()
    uri = tracking_uri(cfg.tracking.uri, str(output_dir))
    check_server(uri)
    run_name = cfg.name or f"{cfg.method}-{cfg.model.name}-{cfg.space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = output_dir / run_name
    if (out / schema.RESULT_FILE).exists():
        raise BadInput(f"run {run_name!r} already finished ({out / schema.RESULT_FILE}); choose another name")
    ray_logs = None
    if cfg.train.num_workers > 0:  # in-process runs (num_workers=0) need no Ray
        ray_logs = init_ray(cfg)
        check_workers(cfg)

    experiment_id = open_experiment(uri, cfg.tracking, output_dir)
    run_id, resumed = start_run(uri, experiment_id, run_name, to_flat_dict(cfg), run_tags(plan, schema.SEARCH),
                                allow_changes=cfg.allow_resume_changes)
    progress(f"{cfg.method} search {run_name}: {describe_space(plan)}; MLflow run {run_id}"
             f"{' (resumed)' if resumed else ''}")
    if ray_logs:
        progress(ray_logs)
    run = RunContext(uri, experiment_id, run_id, run_name, run_name, output_dir / "ray", plan)
    start = time.monotonic()
    try:
        with watch_run(uri, run_id, run_name):
            result = run_method(run)
    except BaseException as err:
        client(uri).set_terminated(run_id, end_status(err))
        if isinstance(err, KeyboardInterrupt):
            err.resume = (f"MLflow run {run_id} ({run_name}) marked KILLED; checkpoints kept under "
                          f"{run.storage}; rerun with name={run_name} (and the same overrides) to resume")
        raise
    wall = time.monotonic() - start
    summary = {"method": cfg.method, "family": spec.family, **result.summary(), "target": plan.target,
               "target_unit": plan.unit, "num_workers": cfg.train.num_workers,
               "model": {"name": cfg.model.name, "input_size": plan.info.input_size, "kwargs": dict(cfg.model.kwargs),
                         "num_classes": cfg.model.num_classes or plan.info.num_classes},
               "data": cfg.data.name, "mlflow_run_id": run_id, "mlflow_experiment_id": experiment_id,
               "mlflow_tracking_uri": uri, "experiment": cfg.tracking.experiment, "output_dir": str(output_dir),
               "run_name": run_name, "wall_s": wall}
    out.mkdir(parents=True, exist_ok=True)
    (out / schema.RESULT_FILE).write_text(json.dumps(summary, indent=2))
    log_search_plot(uri, experiment_id, run_id, summary, cfg.model.name, cfg.data.name, out)
    logger = RunLogger(uri, run_id)
    # A result trained in a nested run (a retrained pick, a phase) is reported on this run too; one trained here
    # was logged by its worker.
    nested = result.model_run_id not in (None, run_id)
    logger.metrics({"search_wall_s": wall, **(result.metrics() if nested else result.accounting)}, result.steps)
    logger.tags({schema.MODEL_RUN: result.model_run_id or run_id,  # a candidate or phase run holds a driver's model
                 schema.NOTE: search_note(summary)})  # the run page's description: result, format per layer
    logger.artifact(out / schema.RESULT_FILE)
    logger.finish()
    summary["result_path"] = str(out / schema.RESULT_FILE)
    return summary


def describe_space(plan: Plan) -> str:
    """What is searched and at which cost: "4 format decisions over [...], target ..."."""
    space, cfg = plan.network.space, plan.cfg
    arch = sum(d.kind != "format" for d in space.decisions)
    what = f"{len(space.decisions) - arch} format decisions over {list(space.format_candidates)}" + \
        (f" and {arch} architecture decisions" if arch else "")
    aim = f"uniform {cfg.quant.uniform_format}" if methods.get(cfg.method).per_format else \
        f"target {plan.target:.4g} {plan.unit} (uniform int8 {plan.reference:.4g})"
    return f"{what}, {aim}"


def budget_lines(result: dict) -> list[str]:
    """What the console says of the result against its target: one line when it is over (how far, and which option
    to use), one for the policy's argmax when the result is another assignment (a one-shot extraction)."""
    unit, target = result["target_unit"], result["target"]
    cost = result["gbops"] if unit == "GBOPs" else result["size_mb"]
    lines = []
    if methods.get(result["method"]).per_format:
        return lines
    if cost > target:
        lines.append(f"over its target by {cost / target - 1:.1%} ({cost:.4g} against {target:.4g} {unit}): "
                     f"{methods.get(result['method']).budget_hint or 'see the method in the README'}")
    argmax = result.get(schema.alternative_metric(schema.ARGMAX, schema.TEST_ACCURACY))
    if argmax is not None:
        ratio, n = result[schema.ARGMAX_COST_RATIO], int(result.get(schema.EXTRACTION_CANDIDATES, 0))
        how = f"the most accurate on validation of the {n} most probable assignments within the target" if n > 1 \
            else "the most probable assignment within the target"
        lines.append(f"the policy's argmax: {ratio * target:.4g} {unit} ({ratio:.2f} x the target), test accuracy "
                     f"{argmax:.4f}; the result is {how} (budget.extraction=argmax returns the argmax)")
    return lines


def print_summary(result: dict) -> None:
    rows = [(d["decision"], d["choice"], f"{d['probability']:.3f}") for d in result["decisions"]]
    print("\n" + table(rows, ["decision", "format", "p"], right=["p"]))
    unit = result["target_unit"]
    cost = result["gbops"] if unit == "GBOPs" else result["size_mb"]
    if result.get("architecture"):
        print(f"\narchitecture {result['architecture']} (standalone network extracted from the supernet)")
    finetuned, searched = result.get("accuracy_finetuned"), result.get("accuracy_before_retraining")
    how = f"after retraining; {searched:.4f} as searched" if searched is not None else "no retraining"
    dynamic = result.get(schema.TEST_ACCURACY_DYNAMIC_RANGES)
    print(f"\ntest accuracy {result['accuracy']:.4f} ({how}"
          + (f"; static activation ranges, as exported; {dynamic:.4f} with each batch's own" if dynamic is not None
             else "") + ")" + (f", {finetuned:.4f} after fine-tuning" if finetuned is not None else ""))
    print(f"cost {cost:.4g} {unit} against target {result['target']:.4g} {unit} "
          f"({result['gbops']:.4g} GBOPs, {result['size_mb']:.4g} MB)")
    for line in budget_lines(result):
        print(line)
    print(f"wall time {result['wall_s']:.1f} s, {result['epochs']:g} epochs; result: {result['result_path']}")
    print(f"MLflow run {result['mlflow_run_id']} in {result['mlflow_tracking_uri']}")
    print("\n".join(command_lines(result)))
    print("\n".join(review_lines(result["mlflow_tracking_uri"], result["mlflow_experiment_id"],
                                 result["mlflow_run_id"], "search")))
