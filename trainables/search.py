"""`fliqs search`: validate, create the MLflow run, fit the Ray Train job, write ``result.json``.

Everything that can be wrong with the input is checked here, before Ray starts a worker: config, model name,
data path, search space, the cost target against the cheapest and the most expensive assignment, the
tracking server, and the workers the cluster can hold.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fliqs.config import ConfigError, load_config, to_flat_dict
from fliqs.cost import ArchShapes, LayerShape
from fliqs.data import check_data
from fliqs.errors import BadInput
from fliqs.formats import get_format
from fliqs.models import check_model_name
from fliqs.searchers.space import SearchSpace, assignment_cost, on_architecture
from fliqs.tracking import RunLogger, check_server, client, open_experiment, start_run, tracking_uri
from fliqs.trainables.fliqnas import FliqnasRun
from fliqs.trainables.loop import TrainRun, build_model_and_space, run_in_process, run_loop
from fliqs.trainables.oneshot import OneShotRun

RESULT_FILE = "result.json"
SEARCH_RUNS: dict[str, type[TrainRun]] = {"fliqs": OneShotRun, "fliqnas": FliqnasRun}  # by `method`


@dataclass
class Plan:
    """What the driver knows before training: the space, the layer shapes and the resolved target.

    With an architecture search the extremes span architectures too (smallest blocks at the cheapest format,
    largest at the widest), and "uniform int8" is measured on the supernet's reference architecture (MobileNetV2's
    own unless ``model.kwargs.arch`` says otherwise), so targets mean the same for FLIQS and FLIQNAS.
    """

    space: SearchSpace
    shapes: list[LayerShape] | ArchShapes
    total_params: int
    target: float
    cheapest: float
    most_expensive: float
    uniform_int8: float


def plan_search(cfg: DictConfig) -> Plan:
    """Build the model once on the CPU to measure it and resolve the cost target. Raises BadInput."""
    check_model_name(cfg.model.name)
    check_data(cfg.data.name, cfg.data.path)
    if cfg.reward.cost == "size" and cfg.reward.target_gbops is not None:
        raise ConfigError("reward.target_gbops is a BOPs target; with reward.cost=size use reward.target_fraction")
    _, model, _, shapes, space = build_model_and_space(cfg)
    total_params = sum(p.numel() for p in model.parameters())

    def cost(fmt: str, arch=None) -> float:  # on the reference architecture unless told
        return assignment_cost(*on_architecture(shapes, space.uniform(fmt), arch), total_params, cfg.reward.cost)

    by_bits = sorted(space.format_candidates or [cfg.quant.default_format], key=lambda f: get_format(f).bits)
    small, large = (shapes.smallest(), shapes.largest()) if isinstance(shapes, ArchShapes) else (None, None)
    cheapest, most_expensive = cost(by_bits[0], small), cost(by_bits[-1], large)
    uniform_int8 = cost("int8")
    target = cfg.reward.target_gbops if cfg.reward.target_gbops is not None \
        else cfg.reward.target_fraction * uniform_int8
    unit = "GBOPs" if cfg.reward.cost == "bops" else "MB"
    if not cheapest <= target <= most_expensive:
        raise BadInput(f"cost target {target:.4g} {unit} is outside what the space can reach: "
                       f"[{cheapest:.4g}, {most_expensive:.4g}] {unit} (uniform int8: {uniform_int8:.4g})")
    return Plan(space, shapes, total_params, target, cheapest, most_expensive, uniform_int8)


def check_workers(cfg: DictConfig) -> None:
    """BadInput unless the Ray cluster can hold ``train.num_workers`` workers (CPUs, GPUs when asked)."""
    import ray

    resources = ray.cluster_resources()
    need = {"CPU": cfg.train.num_workers, **({"GPU": cfg.train.num_workers} if cfg.train.use_gpu else {})}
    for key, n in need.items():
        if resources.get(key, 0) < n:
            raise BadInput(f"train.num_workers={cfg.train.num_workers} needs {n} {key}s; the Ray cluster has "
                           f"{resources.get(key, 0):g}")


def init_ray(cfg: DictConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address)
    else:
        ray.init(address="local")


def fit_run(run_class: type[TrainRun], cfg: DictConfig, name: str, run_id: str, uri: str, target: float,
            storage: Path, **extra) -> dict:
    """Fit one training run of ``run_class`` logging into MLflow run ``run_id``; returns its final metrics.

    A Ray Train ``TorchTrainer`` with ``train.num_workers`` workers; reusing ``(storage, name)`` resumes from the
    latest checkpoint. ``num_workers=0`` runs the same loop in this process, with the same checkpoint folders
    under ``storage / name`` (Ray Train's own local mode keeps no checkpoints, and its API is unavailable inside
    a Ray Tune trial).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config = {"cfg": container, "run_id": run_id, "tracking_uri": uri, "target": target, **extra}
    if cfg.train.num_workers == 0:
        return run_in_process(run_class, config, storage / name)
    trainer = TorchTrainer(
        run_loop(run_class),
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit().metrics


def _non_finite_loss(err: BaseException) -> str | None:
    """The NonFiniteLoss message inside a (Ray-wrapped) training failure, if that is what stopped it."""
    found = re.search(r"non-finite training loss at step \d+", str(err))
    return found.group(0) + "; the last good checkpoint is kept" if found else None


def run_search(cfg: DictConfig) -> dict:
    """Run one FLIQS search end to end and return the result dict (also written to result.json)."""
    plan = plan_search(cfg)
    output_dir = Path(cfg.output_dir).resolve()
    uri = tracking_uri(cfg.tracking.uri, str(output_dir))
    check_server(uri)
    run_name = cfg.name or f"{cfg.method}-{cfg.model.name}-{cfg.space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = output_dir / run_name
    if (out / RESULT_FILE).exists():
        raise BadInput(f"run {run_name!r} already finished ({out / RESULT_FILE}); choose another name")
    if cfg.train.num_workers > 0:  # in-process runs (num_workers=0) need no Ray
        init_ray(cfg)
        check_workers(cfg)

    experiment_id = open_experiment(uri, cfg.tracking, output_dir)
    unit = "GBOPs" if cfg.reward.cost == "bops" else "MB"
    tags = {"method": cfg.method, "family": "one-shot", "search_space": cfg.space.name, "model": cfg.model.name,
            "dataset": cfg.data.name, "cost_target": f"{plan.target:.6g} {unit}"}
    run_id, resumed = start_run(uri, experiment_id, run_name, to_flat_dict(cfg), tags)
    logger = RunLogger(uri, run_id)
    arch = sum(d.kind != "format" for d in plan.space.decisions)
    arch_text = f" and {arch} architecture decisions" if arch else ""
    print(f"[fliqs] {cfg.method} search {run_name}: {len(plan.space.decisions) - arch} format decisions over "
          f"{list(plan.space.format_candidates)}{arch_text}, target {plan.target:.4g} {unit} "
          f"(uniform int8 {plan.uniform_int8:.4g}); MLflow run {run_id}{' (resumed)' if resumed else ''}",
          flush=True)
    start = time.monotonic()
    try:
        m = fit_run(SEARCH_RUNS[cfg.method], cfg, run_name, run_id, uri, plan.target, output_dir / "ray")
    except BaseException as err:
        client(uri).set_terminated(run_id, "FAILED")
        if isinstance(err, BadInput):
            raise
        diverged = _non_finite_loss(err)
        if diverged:  # a bad configuration (learning rate, formats), not a crash: say so in one line
            kept = sorted((output_dir / "ray" / run_name).glob("checkpoint_*"))
            raise BadInput(f"{diverged}: {kept[-1] if kept else 'no checkpoint was written yet'}") from None
        bad_checkpoint = re.search(r"checkpoint \S+ (is corrupt or not a fliqs checkpoint|is not a fliqs-run"
                                   r"|belongs to MLflow run)[^\n]*", str(err))
        if bad_checkpoint:  # raised inside a Ray worker: the same one line as in-process
            raise BadInput(bad_checkpoint.group(0)) from None
        raise
    wall = time.monotonic() - start
    summary = {
        "accuracy": m["test_accuracy"], "accuracy_finetuned": m.get("test_accuracy_finetuned"),
        "gbops": m["gbops"], "size_mb": m["size_mb"], "gmacs": m["gmacs"], "target": plan.target,
        "target_unit": unit, "assignment": json.loads(m["assignment"]), "decisions": json.loads(m["decisions"]),
        "final_entropy": m["final_entropy"], "controller_divergence": m["controller_divergence"],
        "mlflow_run_id": run_id, "mlflow_tracking_uri": uri, "run_name": run_name, "wall_s": wall,
        "num_workers": cfg.train.num_workers, "steps": m["steps"], "method": cfg.method,
    }
    if "architecture" in m:
        summary["architecture"] = m["architecture"]
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(summary, indent=2))
    logger.metrics({"search_wall_s": wall}, int(m["steps"]))
    logger.artifact(out / RESULT_FILE)
    logger.finish()
    summary["result_path"] = str(out / RESULT_FILE)
    return summary


def print_summary(result: dict) -> None:
    rows = [(d["decision"], d["choice"], f"{d['probability']:.3f}") for d in result["decisions"]]
    width = max(len("decision"), *(len(r[0]) for r in rows))
    print(f"\n{'decision'.ljust(width)}  format     p")
    for name, fmt, p in rows:
        print(f"{name.ljust(width)}  {fmt.ljust(9)}  {p}")
    unit = result["target_unit"]
    cost = result["gbops"] if unit == "GBOPs" else result["size_mb"]
    if result.get("architecture"):
        print(f"\narchitecture {result['architecture']} (standalone network extracted from the supernet)")
    print(f"\ntest accuracy {result['accuracy']:.4f} (shared weights, no retraining)"
          + (f", {result['accuracy_finetuned']:.4f} after fine-tuning" if result.get("accuracy_finetuned") else ""))
    print(f"cost {cost:.4g} {unit} against target {result['target']:.4g} {unit} "
          f"({result['gbops']:.4g} GBOPs, {result['size_mb']:.4g} MB)")
    print(f"wall time {result['wall_s']:.1f} s; result: {result['result_path']}")
    print(f"MLflow run {result['mlflow_run_id']} in {result['mlflow_tracking_uri']}")


def run_search_command(overrides: list[str]) -> int:
    cfg = load_config(overrides)
    result = run_search(cfg)
    print_summary(result)
    return 0
