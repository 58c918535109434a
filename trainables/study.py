"""`fliqs study`: FLIQS against uniform, multi-trial and differentiable searches at equal budget, on Ray Tune.

One Tune trial per (method, cost target, seed) — uniform formats have no target and run once per seed. A trial
builds and fits its own TorchTrainer(s) (the Train V2 pattern), so every method runs data-parallel with
``train.num_workers`` workers. Each trial is an MLflow child run of the study's parent run (``parent_run_id``
across processes), tagged ``method`` and ``family``; the parent gets the Pareto fronts, hypervolumes, a summary
CSV and plots. Rerunning the same study resumes it (``Tuner.restore``) without redoing finished trials.

Equal-budget accounting per trial: wall seconds, worker-seconds, training epochs consumed and peak memory.
One-shot and differentiable methods get ``train.epochs``; a multi-trial method gets
``study.multi_trial_budget x train.epochs`` epochs in candidates of ``study.trial_epochs`` each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fliqs.config import ConfigError, load_config, to_flat_dict
from fliqs.errors import BadInput
from fliqs.formats import get_format
from fliqs.models import create_model
from fliqs.searchers.multitrial import SEARCHERS, make_searcher
from fliqs.searchers.rewards import get_reward
from fliqs.supernet import is_supernet
from fliqs.tracking import RunLogger, check_server, client, open_experiment, start_run, tracking_uri
from fliqs.trainables.search import check_workers, fit_run, init_ray, plan_search


@dataclass(frozen=True)
class Method:
    family: str
    run: Callable[[DictConfig, dict, TrialContext], dict]  # -> final metrics + accounting


@dataclass
class TrialContext:
    uri: str
    run_id: str
    name: str
    target: float
    storage: Path
    experiment_id: str


def _run_fliqs(cfg: DictConfig, trial: dict, ctx: TrialContext) -> dict:
    from fliqs.trainables.oneshot import OneShotRun

    return fit_run(OneShotRun, cfg, ctx.name, ctx.run_id, ctx.uri, ctx.target, ctx.storage)


def _run_uniform(cfg: DictConfig, trial: dict, ctx: TrialContext) -> dict:
    from fliqs.trainables.fixed import FixedRun

    return fit_run(FixedRun, cfg, ctx.name, ctx.run_id, ctx.uri, ctx.target, ctx.storage,
                   uniform=trial["format"])


def _run_differentiable(cfg: DictConfig, trial: dict, ctx: TrialContext) -> dict:
    from fliqs.trainables.differentiable import DifferentiableRun

    return fit_run(DifferentiableRun, cfg, ctx.name, ctx.run_id, ctx.uri, ctx.target, ctx.storage,
                   method=trial["method"])


def _run_fliqnas(cfg: DictConfig, trial: dict, ctx: TrialContext) -> dict:
    from fliqs.trainables.fliqnas import FliqnasRun

    return fit_run(FliqnasRun, OmegaConf.merge(cfg, {"method": "fliqnas"}), ctx.name, ctx.run_id, ctx.uri,
                   ctx.target, ctx.storage)


def _fit_child(ctx: TrialContext, label: str, tags: dict, run_class, cfg: DictConfig, target: float,
               params: dict | None = None, **extra) -> dict:
    """One training run of a trial as a nested MLflow run ``<trial>/<label>`` (a candidate, a phase)."""
    run_id, _ = start_run(ctx.uri, ctx.experiment_id, f"{ctx.name}/{label}", params or {}, tags,
                          parent_run_id=ctx.run_id)
    m = fit_run(run_class, cfg, f"{ctx.name}-{label}", run_id, ctx.uri, target, ctx.storage, **extra)
    client(ctx.uri).set_terminated(run_id)
    return {**m, "run_id": run_id}


def _add_accounting(totals: dict, m: dict) -> None:
    for k in ACCOUNTING:
        totals[k] = max(totals.get(k, 0.0), m[k]) if k == "peak_memory_mb" else totals.get(k, 0.0) + m[k]


def _run_sequential(cfg: DictConfig, trial: dict, ctx: TrialContext) -> dict:
    """Architecture first, formats second, in ``train.epochs`` in all (the FLIQNAS paper's sequential baseline).

    Phase 1 (half the epochs): the FLIQNAS search with every layer at full precision, aiming at the MACs of the
    supernet's reference architecture (MobileNetV2's own). Phase 2 (the rest): FLIQS from scratch on the
    architecture found, at the trial's target. Each phase is a nested MLflow run.
    """
    from fliqs.trainables.fliqnas import FliqnasRun
    from fliqs.trainables.oneshot import OneShotRun

    arch_epochs = max(1, cfg.train.epochs // 2)
    arch_cfg = OmegaConf.merge(cfg, {
        "method": "fliqnas", "quant": {"pinned": {"*": "fp32"}},
        "train": {"epochs": arch_epochs, "finetune_epochs": 0},
        "reward": {"target_gbops": None, "target_fraction": 1.0}})  # fp32 cost of the reference architecture
    tags = {"method": "sequential", "role": "phase"}
    found = _fit_child(ctx, "architecture", tags, FliqnasRun, arch_cfg, plan_search(arch_cfg).target,
                       to_flat_dict(arch_cfg))
    quant_cfg = OmegaConf.merge(cfg, {"method": "fliqs", "model": {"kwargs": {"arch": found["architecture"]}},
                                      "train": {"epochs": max(1, cfg.train.epochs - arch_epochs)}})
    m = _fit_child(ctx, "formats", tags, OneShotRun, quant_cfg, ctx.target, to_flat_dict(quant_cfg))
    totals: dict = {}
    for phase in (found, m):
        _add_accounting(totals, phase)
    return {**m, **totals, "architecture": found["architecture"]}


def _run_multi_trial(cfg: DictConfig, trial: dict, ctx: TrialContext) -> dict:
    """Suggest, train each candidate briefly (its own nested MLflow run), observe its validation accuracy; report
    the best by reward on validation accuracy (with its test accuracy, as every method reports)."""
    from fliqs.trainables.fixed import FixedRun
    from fliqs.trainables.loop import build_model_and_space

    space = build_model_and_space(cfg)[4]
    budget = cfg.study.multi_trial_budget * cfg.train.epochs
    n_trials = max(1, int(budget // cfg.study.trial_epochs))
    reward_fn = get_reward(cfg.reward.kind)
    reward = lambda q, c: reward_fn(q, c, ctx.target, cfg.reward.beta)  # noqa: E731
    searcher = make_searcher(trial["method"], space, reward, seed=trial["seed"], trials=n_trials)
    candidate_cfg = OmegaConf.merge(cfg, {"train": {"epochs": cfg.study.trial_epochs, "finetune_epochs": 0}})
    candidates, best = [], None
    totals: dict = {}
    for i in range(n_trials):
        choices = searcher.suggest()
        m = _fit_child(ctx, f"candidate-{i}", {"method": trial["method"], "role": "candidate"}, FixedRun,
                       candidate_cfg, ctx.target, choices=choices)
        # Searchers learn from, and the best is chosen on, validation accuracy: the test split only reports.
        searcher.observe(choices, m["validation_accuracy"], m["gbops"])
        r = reward(m["validation_accuracy"], m["gbops"])
        candidates.append({"choices": choices, "validation_accuracy": m["validation_accuracy"],
                           "test_accuracy": m["test_accuracy"], "gbops": m["gbops"], "reward": r,
                           "run_id": m["run_id"]})
        _add_accounting(totals, m)
        if best is None or r > best[0]:
            best = (r, m)
    RunLogger(ctx.uri, ctx.run_id).json_artifact("candidates.json", candidates)
    return {**best[1], **totals, "candidates": len(candidates)}


METHODS: dict[str, Method] = {
    "fliqs": Method("one-shot", _run_fliqs),
    "uniform": Method("uniform", _run_uniform),
    **{name: Method("multi-trial", _run_multi_trial) for name in SEARCHERS},
    "edmips": Method("differentiable", _run_differentiable),
    "dnas": Method("differentiable", _run_differentiable),
    "fliqnas": Method("one-shot", _run_fliqnas),  # architecture and formats jointly (a supernet model)
    "sequential": Method("one-shot", _run_sequential),  # architecture first, then formats (a supernet model)
}
ARCHITECTURE_METHODS = ("fliqnas", "sequential")

ACCOUNTING = ("epochs", "train_wall_s", "worker_s", "peak_memory_mb")


def trial_grid(cfg: DictConfig) -> list[dict]:
    """The study's trials: uniform formats once per seed, every other method per (target, seed)."""
    trials = []
    for seed in cfg.study.seeds:
        for method in cfg.study.methods:
            if method == "uniform":
                formats = list(cfg.study.uniform_formats) or [*cfg.space.candidates, "bf16"]
                trials += [{"method": "uniform", "format": f, "target_fraction": None, "seed": seed}
                           for f in dict.fromkeys(formats)]
            else:
                trials += [{"method": method, "format": None, "target_fraction": t, "seed": seed}
                           for t in cfg.study.target_fractions]
    return trials


def trial_key(trial: dict) -> str:
    what = f"uniform_{trial['format']}" if trial["method"] == "uniform" else \
        f"{trial['method']}_t{trial['target_fraction']:g}"
    return f"{what}_s{trial['seed']}"


def study_trial(config: dict) -> None:
    """Ray Tune function trainable: one (method, target, seed)."""
    import ray.tune

    trial = config["trial"]
    # Every method runs on the fixed network unless it searches the architecture itself (`_run_fliqnas`).
    cfg = OmegaConf.merge(OmegaConf.create(config["cfg"]), {"seed": trial["seed"], "method": "fliqs"})
    if trial["target_fraction"] is not None:
        cfg.reward.target_fraction, cfg.reward.target_gbops = trial["target_fraction"], None
    target = trial["target"]  # resolved by the driver (`_validate`)
    method = METHODS[trial["method"]]
    key = trial_key(trial)
    label = f"uniform_{trial['format']}" if trial["method"] == "uniform" else trial["method"]
    tags = {"method": label, "family": method.family, "seed": str(trial["seed"]), "study": cfg.study.name,
            "target_fraction": str(trial["target_fraction"]), "model": cfg.model.name, "dataset": cfg.data.name}
    uri = config["tracking_uri"]
    run_id, resumed = start_run(uri, config["experiment_id"], f"{config['study_name']}/{key}", to_flat_dict(cfg),
                                tags, parent_run_id=config["parent_run_id"])
    done = client(uri).get_run(run_id) if resumed else None
    if done is not None and done.info.status == "FINISHED" and "worker_s" in done.data.metrics:
        # Finished before the driver died, but after Tune last saved its state: report it, do not retrain.
        ray.tune.report({**done.data.metrics, "method": done.data.tags["method"], "family": method.family,
                         "mlflow_run_id": run_id})
        return
    # Training runs are named from the Tune trial id: a restored trial finds its own checkpoints again.
    trial_id = ray.tune.get_context().get_trial_id()
    ctx = TrialContext(uri, run_id, f"{config['study_name']}-{trial_id}", target, Path(config["storage"]),
                       config["experiment_id"])
    start = time.monotonic()
    metrics = method.run(cfg, trial, ctx)
    wall = time.monotonic() - start
    final = {"test_accuracy": metrics["test_accuracy"], "gbops": metrics["gbops"], "size_mb": metrics["size_mb"],
             "target": target, "wall_s": wall, **{k: metrics[k] for k in ACCOUNTING}}
    if "test_accuracy_finetuned" in metrics:  # train.finetune_epochs > 0: the retrained result, reported apart
        final["test_accuracy_finetuned"] = metrics["test_accuracy_finetuned"]
    logger = RunLogger(uri, run_id)
    logger.metrics(final, 0)
    logger.tags({"assignment": metrics["assignment"][:5000],
                 **({"architecture": metrics["architecture"]} if "architecture" in metrics else {})})
    logger.finish()
    ray.tune.report({**final, "method": label, "family": method.family, "mlflow_run_id": run_id})


def _validate(cfg: DictConfig) -> list[dict]:
    unknown = [m for m in cfg.study.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"study.methods: unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    for fmt in cfg.study.uniform_formats:
        get_format(fmt)
    if cfg.reward.cost != "bops":
        raise ConfigError("fliqs study compares methods in BOPs (reward.cost=bops): the multi-trial rewards and the "
                          "differentiable cost losses are in GBOPs")
    if cfg.study.trial_epochs <= 0 or cfg.study.multi_trial_budget <= 0:
        raise ConfigError("study.trial_epochs and study.multi_trial_budget must be positive")
    searching_arch = [m for m in cfg.study.methods if m in ARCHITECTURE_METHODS]
    if searching_arch and not is_supernet(create_model(cfg.model.name, **cfg.model.kwargs)):
        raise ConfigError(f"study.methods {searching_arch} search a supernet's architecture; model "
                          f"{cfg.model.name!r} is not one (use model=fliqnas_digits or model=fliqnas_mbv2)")
    plan = plan_search(OmegaConf.merge(cfg, {"method": "fliqs"}))  # measured once: every trial's target
    trials = trial_grid(cfg)
    for trial in trials:  # every target must be reachable, checked before any work
        fraction = trial["target_fraction"]
        trial["target"] = plan.target if fraction is None else fraction * plan.uniform_int8
        if not plan.cheapest <= trial["target"] <= plan.most_expensive:
            raise BadInput(f"study.target_fractions: {fraction} x uniform int8 = {trial['target']:.4g} is outside "
                           f"what the space can reach: [{plan.cheapest:.4g}, {plan.most_expensive:.4g}]")
    return trials


def run_study(cfg: DictConfig) -> dict:
    """Run (or resume) a study; returns {"trials": [...], "hypervolume": {...}, "parent_run_id": ...}."""
    from ray import tune

    from fliqs.pareto import collect_points, log_study_artifacts

    trials = _validate(cfg)
    output_dir = Path(cfg.output_dir).resolve()
    uri = tracking_uri(cfg.tracking.uri, str(output_dir))
    check_server(uri)
    init_ray(cfg)
    check_workers(cfg)
    study_name = cfg.name or cfg.study.name
    experiment_id = open_experiment(uri, cfg.tracking, output_dir)
    parent_id, resumed = start_run(uri, experiment_id, f"study-{study_name}", to_flat_dict(cfg),
                                   {"study": study_name, "role": "study"})
    storage = output_dir / "ray"
    print(f"[fliqs] study {study_name}: {len(trials)} trials ({', '.join(cfg.study.methods)}); MLflow parent run "
          f"{parent_id}{' (resumed)' if resumed else ''}", flush=True)
    trainable = tune.with_resources(study_trial, {"cpu": cfg.study.cpus_per_trial})
    path = storage / f"study-{study_name}"
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space = {"trial": tune.grid_search(trials), "cfg": OmegaConf.to_container(cfg, resolve=True,
                                                                                          enum_to_str=True),
                       "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_id,
                       "study_name": study_name, "storage": str(storage / "train")}
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=tune.TuneConfig(max_concurrent_trials=cfg.study.max_concurrent_trials,
                                                       trial_dirname_creator=lambda trial: trial.trial_id),
                           run_config=tune.RunConfig(name=f"study-{study_name}", storage_path=str(storage),
                                                     verbose=1))
    results = tuner.fit()
    errors = [str(r.error).splitlines()[0] for r in results if r.error]
    points = collect_points(uri, cfg.tracking.experiment, parent_id)
    study_dir = output_dir / f"study-{study_name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    hypervolumes = log_study_artifacts(uri, parent_id, points, study_dir) if points else {}
    rows = [{k: r.metrics.get(k) for k in ("method", "family", "test_accuracy", "gbops", "target", *ACCOUNTING,
                                           "mlflow_run_id")} | {"trial": trial_key(r.config["trial"])}
            for r in results if not r.error]
    summary = {"study": study_name, "parent_run_id": parent_id, "tracking_uri": uri, "trials": rows,
               "hypervolume": hypervolumes, "errors": errors}
    (study_dir / "study.json").write_text(json.dumps(summary, indent=2))
    client(uri).set_terminated(parent_id, "FAILED" if errors else "FINISHED")
    return summary


def print_study(summary: dict) -> None:
    print(f"\n{'trial':28} {'family':13} {'accuracy':>8} {'GBOPs':>9} {'epochs':>6} {'worker-s':>9} {'peak MB':>8}")
    for r in sorted(summary["trials"], key=lambda r: (r["family"], r["trial"])):
        print(f"{r['trial']:28} {r['family']:13} {r['test_accuracy']:8.4f} {r['gbops']:9.4g} {r['epochs']:6.0f} "
              f"{r['worker_s']:9.1f} {r['peak_memory_mb']:8.0f}")
    print("\nhypervolume per method (shared reference point):")
    for method, hv in sorted(summary["hypervolume"].items(), key=lambda kv: -kv[1]):
        print(f"  {method:20} {hv:.6g}")
    if summary["errors"]:
        print(f"\n{len(summary['errors'])} trial(s) failed: " + "; ".join(summary["errors"]))
    print(f"\nMLflow parent run {summary['parent_run_id']} in {summary['tracking_uri']}")


def run_study_command(overrides: list[str]) -> int:
    cfg = load_config(overrides)
    summary = run_study(cfg)
    print_study(summary)
    return 1 if summary["errors"] else 0

