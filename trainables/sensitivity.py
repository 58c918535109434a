"""The sensitivity + integer program method (HAWQ-V3, ModelOpt AutoQuantize style): one run at one cost target.

1. **Pre-train** (nested run ``<run>/pretrain``, role ``phase``): uniform QAT of ``sensitivity.pretrain_format``
   (fp32: plain training) for the pre-training epochs (`fliqs.config.sensitivity_epochs`). At its end every worker
   scores ``sensitivity.batches`` of its own training batches (`fliqs.searchers.sensitivity`: ``hessian``,
   ``gradient`` or ``kl``); the scores are averaged over the workers and returned with the phase's metrics (artifact
   ``scores.json``).
2. **Solve** (the driver): the integer program at this run's target, in the run's cost (BOPs or size); ``solve_s``.
3. **QAT** (nested run ``<run>/qat``, role ``phase``): plain QAT of the solution for the remaining epochs, from the
   pre-trained network (its ``model.pt``). Its model is the run's result (tag ``fliqs.model_run``).

**One scoring serves every target.** Runs whose pre-training config is the same (the run's config without
``reward.target_*``, ``sensitivity.qat_epochs`` and the name-like keys) share one pre-training and scoring: it is
kept under ``<storage>/sensitivity_cache/<sha256 of that config>`` (scores and the pre-trained model) behind a file
lock (``fcntl.flock``), so concurrent trials of a study wait for the first instead of pre-training again; the first
run's phase run holds it, later ones name it in the tag ``fliqs.scoring_run``.

**Accounting.** A run that uses a scoring costs it, whether it computed it or reused it: its ``epochs``,
``train_wall_s``, ``worker_s`` (and the peak memory) are the shared pre-training + scoring plus its own QAT, so every
point of a study is charged its whole cost at equal budget (``train.epochs`` in all). The shared part is also
reported apart (``shared_epochs``, ``shared_worker_s``, ``shared_train_wall_s``, ``scoring_wall_s``: the scoring
itself), with ``scoring_reused`` (1: another run paid for it) and ``solve_s`` (the driver's MILP, not in
``worker_s``), so a study's real total is the sum of its runs minus the reused shared parts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fliqs import schema
from fliqs.config import sensitivity_epochs, to_flat_dict
from fliqs.console import progress
from fliqs.errors import BadInput
from fliqs.evaluation import sync_buffers
from fliqs.searchers import methods
from fliqs.searchers.program import linear_costs, program_cost, program_score, solve
from fliqs.searchers.sensitivity import scores
from fliqs.searchers.space import assignment_cost
from fliqs.tracking import RunLogger, client
from fliqs.trainables.fit import RunContext, add_accounting, fit_child
from fliqs.trainables.fixed import FixedQAT
from fliqs.trainables.loop import RECALIBRATION_STREAM, Result
from fliqs.trainables.plan import plan_run

SCORES_METRIC = "sensitivity_scores"  # the phase's scores (JSON) among its final metrics
SCORING_S = "scoring_s"  # the phase's wall seconds of scoring (rank 0)
SCORING_STREAM = RECALIBRATION_STREAM + 1  # the scored batches' random stream (not a step)
CACHE = "sensitivity_cache"
PRETRAINED = "pretrained.pt"
RECORD = "scoring.json"  # written last: its presence marks a complete cache entry
# Keys that do not change the pre-training and its scores (targets, names, where things are stored).
UNSHARED = ("name", "output_dir", "tracking", "ray_address", "study", "reward.target_gbops", "reward.target_fraction",
            "sensitivity.qat_epochs", "budget")


class ScoringQAT(FixedQAT):
    """The pre-training phase on each worker: uniform QAT (the phase config's ``quant.uniform_format``), then, in its
    result, the scores of every decision x candidate on this worker's training batches, averaged over the workers."""

    def result(self) -> Result:
        result = super().result()
        ctx, sc = self.ctx, self.ctx.cfg.sensitivity
        start = time.monotonic()
        sync_buffers(ctx.net.model, ctx.world)  # every replica scores the same network
        stream = ctx.batches(ctx.splits.train, SCORING_STREAM)
        data = [stream.next() for _ in range(sc.batches)]
        table = scores(sc.score, ctx.net.model, ctx.net.layers, ctx.net.space, data, sc.hutchinson_samples,
                       ctx.generator(SCORING_STREAM))
        if ctx.all_reduce_mean is not None:
            width = max(len(row) for row in table)
            padded = torch.tensor([row + [0.0] * (width - len(row)) for row in table], dtype=torch.float64,
                                  device=ctx.device)
            mean = ctx.all_reduce_mean(padded).cpu().tolist()
            table = [mean[d][:len(row)] for d, row in enumerate(table)]
        space = ctx.net.space
        result.metrics[SCORES_METRIC] = json.dumps({
            "kind": getattr(sc.score, "value", sc.score), "decisions": [d.name for d in space.decisions],
            "candidates": [list(d.candidates) for d in space.decisions], "scores": table,
            "samples_per_worker": sum(len(y) for _, y in data), "workers": ctx.world})
        result.metrics[SCORING_S] = time.monotonic() - start
        if ctx.rank == 0:
            progress(f"scored {len(table)} decisions x {len(space.format_candidates)} formats "
                     f"({sc.score}) in {result.metrics[SCORING_S]:.1f} s")
        return result

    def artifacts(self, logger: RunLogger, result: Result) -> None:
        logger.json_artifact(schema.SCORES_FILE, json.loads(result.metrics[SCORES_METRIC]))


# -- the shared scoring --------------------------------------------------------------------------------------------
def scoring_key(phase_cfg: DictConfig) -> str:
    """sha256 of the pre-training config without the keys that do not change it (`UNSHARED`)."""
    data = OmegaConf.to_container(phase_cfg, resolve=True, enum_to_str=True)
    for dotted in UNSHARED:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed): other processes, and other runs of this one, wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for the shared sensitivity scoring {path.stem} (another run computes it)")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def shared_scoring(phase_cfg: DictConfig, ctx: RunContext) -> tuple[dict, bool]:
    """The scoring of ``phase_cfg`` (computed by this run, or by an earlier one): (its record, reused)."""
    key = scoring_key(phase_cfg)
    folder = ctx.storage / CACHE / key
    with file_lock(ctx.storage / CACHE / f"{key}.lock"):
        if (folder / RECORD).is_file():
            record = json.loads((folder / RECORD).read_text())
            reused = record["owner_run_id"] != ctx.run_id  # else: this run computed it, and is resumed
            if reused:
                progress(f"reusing sensitivity scores {key} (phase run {record['run_id']})")
            return {**record, "model_path": str(folder / PRETRAINED)}, reused
        start = time.monotonic()
        worker = methods.get(phase_cfg.method).worker
        m = fit_child(phase_cfg, ctx, "pretrain", schema.PHASE, worker, to_flat_dict(phase_cfg))
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            downloaded = client(ctx.uri).download_artifacts(m["run_id"], schema.MODEL_FILE, tmp)
            _write_atomic(folder / PRETRAINED, lambda p: shutil.copyfile(downloaded, p))
        record = {**json.loads(m[SCORES_METRIC]), "key": key, "run_id": m["run_id"], "owner_run_id": ctx.run_id,
                  "accounting": {k: m[k] for k in schema.ACCOUNTING}, schema.SCORING_WALL_S: m[SCORING_S],
                  "phase_wall_s": time.monotonic() - start, "model": PRETRAINED}
        _write_atomic(folder / RECORD, lambda p: p.write_text(json.dumps(record, indent=1)))
        return {**record, "model_path": str(folder / PRETRAINED)}, False


# -- the runner ----------------------------------------------------------------------------------------------------
def run_sensitivity(cfg: DictConfig, ctx: RunContext) -> dict:
    plan = plan_run(cfg)
    net = plan.network
    space = net.space
    if space.searches_architecture:
        raise BadInput(f"method={cfg.method} scores formats only; it cannot search a supernet's architecture")
    const, costs = linear_costs(space, net.shapes, net.total_params, cfg.reward.cost)
    pretrain_epochs, qat_epochs = sensitivity_epochs(cfg)
    phase_cfg = OmegaConf.merge(cfg, {"quant": {"uniform_format": cfg.sensitivity.pretrain_format},
                                      "train": {"epochs": pretrain_epochs, "finetune_epochs": 0}})
    shared, reused = shared_scoring(phase_cfg, ctx)
    if shared["decisions"] != [d.name for d in space.decisions] or \
            shared["candidates"] != [list(d.candidates) for d in space.decisions]:
        raise BadInput(f"the cached scores {shared['key']} do not match this run's search space; remove "
                       f"{ctx.storage / CACHE / shared['key']}")

    # The program at this run's target; the reported cost (fliqs.cost.summarize) must stay within it too.
    start = time.monotonic()
    budget = ctx.target
    for _ in range(4):
        choices = solve(shared["scores"], costs, budget, const)
        cost = assignment_cost(net.shapes, space.assignment(choices), net.total_params, cfg.reward.cost)
        if cost <= ctx.target:
            break
        budget -= cost - ctx.target  # rounding between the linear costs and summarize's integer BOPs
    else:
        raise BadInput(f"no assignment within the target {ctx.target:.6g} {plan.unit} was found")
    solve_s = time.monotonic() - start
    progress(f"{cfg.method}: solution at {cost:.4g} {plan.unit} (target {ctx.target:.4g}) in {solve_s * 1e3:.1f} ms: "
             + ", ".join(f"{d.name}={d.candidates[c]}" for d, c in zip(space.decisions, choices, strict=True)))

    qat_cfg = OmegaConf.merge(cfg, {"train": {"epochs": qat_epochs}})
    m = fit_child(qat_cfg, ctx, "qat", schema.PHASE, methods.FIXED_QAT, to_flat_dict(qat_cfg), choices=choices,
                  init=shared["model_path"])
    pre = shared["accounting"]
    totals = add_accounting(add_accounting({}, pre), m)
    extra = {schema.SOLVE_S: solve_s, schema.SHARED_EPOCHS: pre["epochs"], schema.SHARED_WORKER_S: pre["worker_s"],
             schema.SHARED_TRAIN_WALL_S: pre["train_wall_s"], schema.SCORING_WALL_S: shared[schema.SCORING_WALL_S],
             schema.SCORING_REUSED: float(reused)}
    logger = RunLogger(ctx.uri, ctx.run_id)
    logger.metrics(extra, 0)
    logger.tags({schema.SCORING_RUN: shared["run_id"]})
    logger.json_artifact(schema.SENSITIVITY_FILE, {
        "kind": shared["kind"], "decisions": shared["decisions"], "candidates": shared["candidates"],
        "scores": shared["scores"], "costs": costs, "cost_const": const, "unit": plan.unit, "target": ctx.target,
        "choices": choices, "objective": program_score(shared["scores"], choices),
        "program_cost": program_cost(costs, choices, const), "cost": cost, "scoring_key": shared["key"],
        "scoring_run_id": shared["run_id"], **extra})
    return {**m, **totals, **extra, "run_id": m["run_id"]}
