"""`fliqs search`: one run of a method at one cost target — validate, create the MLflow run, run the method's
runner, write ``result.json``.

Everything that can be wrong with the input is checked before Ray starts a worker (`fliqs.trainables.plan.plan_run`
and the environment: the tracking server, the workers the cluster can hold).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from fliqs import schema
from fliqs.config import load_config, to_flat_dict
from fliqs.console import progress, table
from fliqs.errors import BadInput
from fliqs.review import review_lines, search_note
from fliqs.searchers import methods
from fliqs.tracking import RunLogger, check_server, client, end_status, open_experiment, start_run, tracking_uri
from fliqs.trainables.fit import RunContext, check_workers, init_ray
from fliqs.trainables.oneshot import ARGMAX
from fliqs.trainables.plan import Plan, plan_run
from fliqs.watch import watch_run


def run_tags(cfg: DictConfig, plan: Plan, role: str) -> dict[str, str]:
    """The schema tags of a run that is a point of a Pareto analysis (a search, or a study's trial)."""
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


def result_metrics(m: dict, target: float) -> dict[str, float]:
    """What a method run reports on its own MLflow run (a search, or a study's trial): the result (a multi-trial or
    differentiable search's retrained model; its search result apart), the cost, and the whole accounting."""
    final = {schema.TEST_ACCURACY: m[schema.TEST_ACCURACY], schema.VALIDATION_ACCURACY: m[schema.VALIDATION_ACCURACY],
             schema.GBOPS: m[schema.GBOPS], schema.SIZE_MB: m[schema.SIZE_MB], schema.TARGET: target,
             **{k: m[k] for k in schema.ACCOUNTING}}
    for key in (schema.TEST_ACCURACY_FINETUNED, schema.TEST_ACCURACY_BEFORE_RETRAINING):
        if m.get(key) is not None:
            final[key] = m[key]
    return final


def run_search(cfg: DictConfig) -> dict:
    """Run one search end to end and return the result dict (also written to result.json)."""
    spec = methods.get(cfg.method)
    plan = plan_run(cfg)
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
    run_id, resumed = start_run(uri, experiment_id, run_name, to_flat_dict(cfg), run_tags(cfg, plan, schema.SEARCH),
                                allow_changes=cfg.allow_resume_changes)
    space = plan.network.space
    arch = sum(d.kind != "format" for d in space.decisions)
    what = f"{len(space.decisions) - arch} format decisions over {list(space.format_candidates)}" + \
        (f" and {arch} architecture decisions" if arch else "")
    aim = f"uniform {cfg.quant.uniform_format}" if spec.per_format else \
        f"target {plan.target:.4g} {plan.unit} (uniform int8 {plan.reference:.4g})"
    progress(f"{cfg.method} search {run_name}: {what}, {aim}; MLflow run {run_id}{' (resumed)' if resumed else ''}")
    if ray_logs:
        progress(ray_logs)
    ctx = RunContext(uri, experiment_id, run_id, run_name, run_name, output_dir / "ray", plan.target)
    start = time.monotonic()
    try:
        with watch_run(uri, run_id, run_name):
            m = methods.resolve(spec.runner)(cfg, ctx)
    except BaseException as err:
        client(uri).set_terminated(run_id, end_status(err))
        if isinstance(err, KeyboardInterrupt):
            err.resume = (f"MLflow run {run_id} ({run_name}) marked KILLED; checkpoints kept under "
                          f"{ctx.storage}; rerun with name={run_name} (and the same overrides) to resume")
        raise
    wall = time.monotonic() - start
    summary = {
        "method": cfg.method, "family": spec.family, "accuracy": m[schema.TEST_ACCURACY],
        "accuracy_finetuned": m.get(schema.TEST_ACCURACY_FINETUNED),
        "accuracy_before_retraining": m.get(schema.TEST_ACCURACY_BEFORE_RETRAINING), "gbops": m[schema.GBOPS],
        "size_mb": m[schema.SIZE_MB], "gmacs": m[schema.GMACS], "target": plan.target, "target_unit": plan.unit,
        "assignment": json.loads(m["assignment"]), "decisions": json.loads(m["decisions"]),
        **{k: m[k] for k in ("final_entropy", "controller_divergence", "architecture", "candidates", schema.SOLVE_S,
                             schema.SHARED_EPOCHS, schema.SHARED_WORKER_S, schema.SCORING_REUSED,
                             schema.ARGMAX_COST_RATIO, schema.EXTRACTED_WITHIN_BUDGET, schema.EXTRACTION_CANDIDATES,
                             *(schema.alternative_metric("argmax", k) for k in (schema.TEST_ACCURACY, schema.GBOPS,
                                                                               schema.SIZE_MB))) if k in m},
        **{k: m[k] for k in schema.ACCOUNTING}, "steps": m["steps"], "num_workers": cfg.train.num_workers,
        "mlflow_run_id": run_id, "mlflow_experiment_id": experiment_id, "mlflow_tracking_uri": uri,
        "run_name": run_name, "wall_s": wall,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / schema.RESULT_FILE).write_text(json.dumps(summary, indent=2))
    logger = RunLogger(uri, run_id)
    # A result trained in a nested run (a retrained pick, a phase) is reported on this run too; one trained here
    # was logged by its worker.
    nested = m.get("run_id", run_id) != run_id
    logger.metrics({"search_wall_s": wall, **(result_metrics(m, plan.target) if nested else
                                              {k: m[k] for k in schema.ACCOUNTING})}, int(m["steps"]))
    logger.tags({schema.MODEL_RUN: m.get("run_id", run_id),  # a candidate or phase run holds a driver's model
                 schema.NOTE: search_note(summary)})  # the run page's description: result, format per layer
    logger.artifact(out / schema.RESULT_FILE)
    logger.finish()
    summary["result_path"] = str(out / schema.RESULT_FILE)
    return summary


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
    argmax = result.get(schema.alternative_metric(ARGMAX, schema.TEST_ACCURACY))
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
    print(f"\ntest accuracy {result['accuracy']:.4f} ({how})"
          + (f", {finetuned:.4f} after fine-tuning" if finetuned is not None else ""))
    print(f"cost {cost:.4g} {unit} against target {result['target']:.4g} {unit} "
          f"({result['gbops']:.4g} GBOPs, {result['size_mb']:.4g} MB)")
    for line in budget_lines(result):
        print(line)
    print(f"wall time {result['wall_s']:.1f} s, {result['epochs']:g} epochs; result: {result['result_path']}")
    print(f"MLflow run {result['mlflow_run_id']} in {result['mlflow_tracking_uri']}")
    print(f"Export: fliqs export {result['run_name']} output_dir={Path(result['result_path']).parent.parent} "
          f"--to DIR [--onnx]")
    print("\n".join(review_lines(result["mlflow_tracking_uri"], result["mlflow_experiment_id"],
                                 result["mlflow_run_id"], "search")))


def run_search_command(overrides: list[str]) -> int:
    result = run_search(load_config(overrides))
    print_summary(result)
    return 0
