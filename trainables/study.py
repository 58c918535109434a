"""`fliqs study`: every method of ``study.methods`` at every cost target and seed, on Ray Tune, at equal budget.

A study is a grid of runs that `fliqs search` could make one by one: each Tune trial is one (method, target, seed)
(a per-format method such as uniform: one per format and seed), a config override of the study's config, driven
by the method's own runner. A trial builds and fits its own TorchTrainer(s) (the Train V2 pattern), so every
method runs data-parallel with ``train.num_workers`` workers. Each trial is an MLflow child run (role ``trial``)
of the study's parent run (``parent_run_id`` across processes), tagged as the run schema says; the parent gets the
Pareto fronts, hypervolumes, a summary CSV and a plot. Rerunning the same study resumes it (``Tuner.restore``)
without redoing finished trials.

Equal-budget accounting per trial: wall seconds, worker-seconds, training epochs consumed and peak memory. One-shot
and differentiable methods get ``train.epochs``; a multi-trial method gets ``multi_trial.budget x train.epochs``
epochs in candidates of ``multi_trial.trial_epochs`` each.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fliqs.analysis.review import review_lines, store_args
from fliqs.models.registry import is_supernet_name
from fliqs.quant.formats import get_format
from fliqs.run import schema
from fliqs.run.config import ConfigError, FliqsConfig, derive, to_flat_dict
from fliqs.run.console import progress, table
from fliqs.run.loading import check_methods
from fliqs.run.tracking import (
    RunLogger,
    check_server,
    client,
    end_run_tree,
    end_status,
    open_experiment,
    start_run,
    tracking_uri,
)
from fliqs.run.watch import watch_study
from fliqs.searchers import methods
from fliqs.searchers.rewards import CostKind
from fliqs.trainables.cluster import check_workers, init_ray
from fliqs.trainables.fit import RunContext
from fliqs.trainables.plan import Plan, make_plan
from fliqs.trainables.search import run_method, run_tags


def trial_grid(cfg: FliqsConfig) -> list[dict]:
    """The study's trials as config overrides: per-format methods once per (format, seed), every other method per
    (target, seed)."""
    formats = list(dict.fromkeys(list(cfg.study.uniform_formats) or [*cfg.space.candidates, "bf16"]))
    trials = []
    for seed in cfg.study.seeds:
        for name in cfg.study.methods:
            if methods.get(name).per_format:
                trials += [{"method": name, "seed": seed, "quant": {"uniform_format": f}} for f in formats]
            else:
                trials += [{"method": name, "seed": seed, "reward": {"target_fraction": t, "target_gbops": None}}
                           for t in cfg.study.target_fractions]
    return trials


def trial_key(trial: dict) -> str:
    what = trial["quant"]["uniform_format"] if "quant" in trial else f"t{trial['reward']['target_fraction']:g}"
    return f"{trial['method']}_{what}_s{trial['seed']}"


def study_trial(config: dict) -> None:
    """Ray Tune function trainable: one (method, target, seed), on the plan the driver made, derived for it."""
    import ray.tune

    trial = config["trial"]
    plan = config["plan"].derive(derive(config["plan"].cfg, trial))  # the driver checked every trial the same way
    cfg, uri = plan.cfg, config["tracking_uri"]
    run_name = f"{config['study_name']}/{trial_key(trial)}"
    tags = {**run_tags(plan, schema.TRIAL), schema.STUDY: config["study_name"]}
    run_id, resumed = start_run(uri, config["experiment_id"], run_name, to_flat_dict(cfg), tags,
                                parent_run_id=config["parent_run_id"], allow_changes=cfg.allow_resume_changes)
    done = client(uri).get_run(run_id) if resumed else None
    if done is not None and done.info.status == "FINISHED" and "worker_s" in done.data.metrics:
        # Finished before the driver died, but after Tune last saved its state: report it, do not retrain.
        ray.tune.report({**done.data.metrics, "mlflow_run_id": run_id})
        return
    # Training runs are named from the Tune trial id: a restored trial finds its own checkpoints again.
    trial_id = ray.tune.get_context().get_trial_id()
    run = RunContext(uri, config["experiment_id"], run_id, run_name, f"{config['study_name']}-{trial_id}",
                     Path(config["storage"]), plan)
    start = time.monotonic()
    result = run_method(run)
    final = {**result.metrics(), "wall_s": time.monotonic() - start}
    logger = RunLogger(uri, run_id)
    logger.metrics(final, 0)
    logger.tags({schema.ASSIGNMENT_TAG: json.dumps(result.assignment)[:5000],
                 schema.MODEL_RUN: result.model_run_id or run_id,
                 **({schema.ARCHITECTURE_TAG: result.extras["architecture"]} if "architecture" in result.extras
                    else {})})
    logger.finish()
    ray.tune.report({**final, "mlflow_run_id": run_id})


def check_study(cfg: FliqsConfig) -> tuple[list[dict], Plan]:
    """Every trial of the study, validated before any work (methods, formats, supernet needs, reachable targets),
    and the plan every trial derives its own from (measured once)."""
    for name in cfg.study.methods:
        methods.get(name)
    for fmt in cfg.study.uniform_formats:
        get_format(fmt)
    if cfg.reward.cost != CostKind.bops:
        raise ConfigError("fliqs study compares methods in BOPs (reward.cost=bops): the multi-trial rewards and the "
                          "differentiable cost losses are in GBOPs")
    needing = [m for m in cfg.study.methods if methods.get(m).supernet]
    if needing and not is_supernet_name(cfg.model.name):
        raise ConfigError(f"study.methods {needing} search a supernet's architecture; model {cfg.model.name!r} is "
                          f"not one (use model=fliqnas_digits or model=fliqnas_mbv2)")
    plan = make_plan(derive(cfg, {"method": methods.DEFAULT}))
    trials = trial_grid(cfg)
    for trial in trials:
        check_methods(derive(cfg, trial))
        if "reward" in trial:
            fraction = trial["reward"]["target_fraction"]
            plan.check_reachable(plan.target_for(fraction), f"study.target_fractions: {fraction} x uniform int8 =")
    return trials, plan


def run_study(cfg: FliqsConfig) -> dict:
    """Run (or resume) a study; returns {"trials": [...], "hypervolume": {...}, "parent_run_id": ...,
    "accuracy_at_budget": `fliqs.analysis.budgets.budget_report`, ...}."""
    # Tune's new console output prints its configuration box and result paths whatever the verbosity; the classic
    # reporter at verbose=0 prints nothing (the bar below counts the trials).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    from fliqs.analysis.budgets import budget_report
    from fliqs.analysis.fronts import paired_comparison, study_report
    from fliqs.analysis.store import collect_points, log_study_artifacts

    trials, plan = check_study(cfg)
    output_dir = Path(cfg.output_dir).resolve()
    uri = tracking_uri(cfg.tracking.uri, str(output_dir))
    check_server(uri)
    ray_logs = init_ray(cfg)
    check_workers(cfg)
    study_name = cfg.name or cfg.study.name
    experiment_id = open_experiment(uri, cfg.tracking, output_dir)
    parent_id, resumed = start_run(uri, experiment_id, f"study-{study_name}", to_flat_dict(cfg),
                                   {schema.STUDY: study_name, schema.ROLE: schema.STUDY_ROLE},
                                   allow_changes=cfg.allow_resume_changes)
    storage = output_dir / "ray"
    progress(f"study {study_name}: {len(trials)} trials ({', '.join(cfg.study.methods)}); MLflow parent run "
             f"{parent_id}{' (resumed)' if resumed else ''}")
    if ray_logs:
        progress(ray_logs)
    trainable = tune.with_resources(study_trial, {"cpu": cfg.study.cpus_per_trial})
    path = storage / f"study-{study_name}"
    param_space = {"trial": tune.grid_search(trials), "plan": plan,
                   "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_id,
                   "study_name": study_name, "storage": str(storage / "train")}
    if tune.Tuner.can_restore(str(path)):
        # Tune keeps a large value of the param space (the plan) in Ray's object store and only a reference in its
        # saved state: a restore must give the param space again, or the trials not yet started get the reference.
        tuner = tune.Tuner.restore(str(path), trainable, param_space=param_space, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space,
                           # reuse_actors: a finished trial's process runs the next trial, so a trial does not pay a
                           # process start and the imports of torch, MLflow and the data (benchmarks/RESULTS.md,
                           # issue 11); every fit resets its peak-memory count (`fliqs.trainables.parallel`).
                           tune_config=tune.TuneConfig(max_concurrent_trials=cfg.study.max_concurrent_trials,
                                                       reuse_actors=True,
                                                       trial_dirname_creator=lambda trial: trial.trial_id),
                           # verbose=0: no trial tables on the terminal; the bar below counts the trials.
                           run_config=tune.RunConfig(name=f"study-{study_name}", storage_path=str(storage),
                                                     verbose=0))
    try:
        with watch_study(uri, experiment_id, parent_id, len(trials), f"study {study_name}"):
            results = tuner.fit()
    except BaseException as err:  # a stop signal, or Tune itself failing: no trial is left RUNNING in MLflow
        end_run_tree(uri, experiment_id, parent_id, end_status(err))
        if isinstance(err, KeyboardInterrupt):
            err.resume = (f"study {study_name}: MLflow run {parent_id} and its unfinished trials marked KILLED; "
                          f"finished trials and checkpoints kept under {storage}; rerun the same command to resume")
        raise
    errors = [str(r.error).splitlines()[0] for r in results if r.error]
    points = collect_points(uri, cfg.tracking.experiment, parent_id)
    study_dir = output_dir / f"study-{study_name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    hypervolumes = log_study_artifacts(uri, parent_id, points, study_dir) if points else {}
    by_run = {p.run_id: p for p in points}
    rows = [{"trial": trial_key(r.config["trial"]), "method": r.config["trial"]["method"],
             "family": methods.get(r.config["trial"]["method"]).family,
             **{k: r.metrics.get(k) for k in (schema.TEST_ACCURACY, schema.GBOPS, schema.TARGET, *schema.ACCOUNTING,
                                               "mlflow_run_id")}}
            for r in results if not r.error and r.metrics.get("mlflow_run_id") in by_run]
    report = study_report(points) if points else {}
    seeds = {m: {k: r[k] for k in ("hypervolume_mean", "hypervolume_std", "hypervolume_by_seed")}
             for m, r in report.items()}
    summary = {"study": study_name, "parent_run_id": parent_id, "experiment_id": experiment_id,
               "tracking_uri": uri, "output_dir": str(output_dir), "experiment": cfg.tracking.experiment,
               "trials": rows, "hypervolume": hypervolumes, "hypervolume_seeds": seeds,
               "paired": paired_comparison(points, methods.DEFAULT) if points else {},
               "accuracy_at_budget": budget_report(points) if points else {}, "errors": errors}
    (study_dir / "study.json").write_text(json.dumps(summary, indent=2))
    client(uri).set_terminated(parent_id, "FAILED" if errors else "FINISHED")
    return summary


def print_study(summary: dict) -> None:
    rows = [[r["trial"], r["family"], f"{r['test_accuracy']:.4f}", f"{r['gbops']:.4g}", f"{r['epochs']:.0f}",
             f"{r['worker_s']:.1f}", f"{r['peak_memory_mb']:.0f}"]
            for r in sorted(summary["trials"], key=lambda r: (r["family"], r["trial"]))]
    header = ["trial", "family", "accuracy", "GBOPs", "epochs", "worker-s", "peak MB"]
    print("\n" + table(rows, header, right=header[2:]))
    print("\nhypervolume per method (one reference point for every seed and method):")
    paired, seeds = summary["paired"], summary["hypervolume_seeds"]
    hv_rows = []
    for method, hv in sorted(summary["hypervolume"].items(), key=lambda kv: -kv[1]):
        s, c = seeds[method], paired.get(method)
        versus = f"{c['mean_difference']:+.4g} +- {c['std_difference']:.2g} ({c['reference_ahead']}/{c['seeds']})" \
            if c else ""
        hv_rows.append([method, f"{hv:.4g}", f"{s['hypervolume_mean']:.4g} +- {s['hypervolume_std']:.2g}",
                        str(len(s["hypervolume_by_seed"])), versus])
    header = ["method", "all seeds", "mean +- std", "seeds", f"{methods.DEFAULT} - method (ahead/seeds)"]
    print(table(hv_rows, header, right=header[1:4]))
    if summary.get("accuracy_at_budget"):
        from fliqs.analysis.budgets import budget_tables

        print("\n" + budget_tables(summary["accuracy_at_budget"]))
    if summary["errors"]:
        print(f"\n{len(summary['errors'])} trial(s) failed: " + "; ".join(summary["errors"]))
    print(f"\nMLflow parent run {summary['parent_run_id']} in {summary['tracking_uri']}")
    store = store_args(summary["tracking_uri"], summary["output_dir"], summary["experiment"])
    print(f"Fronts again: fliqs pareto {store} --parent {summary['parent_run_id']}")
    print("\n".join(review_lines(summary["tracking_uri"], summary["experiment_id"], summary["parent_run_id"],
                                 "study")))
