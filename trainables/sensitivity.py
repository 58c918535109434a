"""The sensitivity + integer program method (HAWQ-V3, ModelOpt AutoQuantize style): one run at one cost target.

1. **Pre-train** (nested run ``<run>/pretrain``, role ``phase``): uniform QAT of ``sensitivity.pretrain_format``
   (fp32: plain training) for ``sensitivity.pretrain_epochs`` (resolved at load). At its end every worker
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

from fliqs.errors import BadInput
from fliqs.run import schema
from fliqs.run.config import SCORING_FREE_KEYS, FliqsConfig, derive, to_flat_dict
from fliqs.run.console import progress
from fliqs.run.options import under
from fliqs.run.tracking import RunLogger, client
from fliqs.searchers import methods
from fliqs.searchers.program import linear_costs, program_cost, program_score, solve
from fliqs.searchers.sensitivity import scores
from fliqs.searchers.space import assignment_cost
from fliqs.trainables.fit import RunContext, fit_child
from fliqs.trainables.fixed import FixedQAT
from fliqs.trainables.loop import RECALIBRATION_STREAM
from fliqs.trainables.result import RunResult, total_accounting
from fliqs.trainables.worker import Result
from fliqs.training.evaluation import sync_buffers

SCORES_METRIC = "sensitivity_scores"  # the phase's scores (JSON) among its final metrics
SCORING_S = "scoring_s"  # the phase's wall seconds of scoring (rank 0)
SCORING_STREAM = RECALIBRATION_STREAM + 1  # the scored batches' random stream (not a step)
CACHE = "sensitivity_cache"
PRETRAINED = "pretrained.pt"
RECORD = "scoring.json"  # written last: its presence marks a complete cache entry


class ScoringQAT(FixedQAT):
    """The pre-training phase on each worker: uniform QAT (the phase config's ``quant.uniform_format``), then, in its
    result, the scores of every decision x candidate on this worker's training batches, averaged over the workers."""

    def result(self) -> Result:
        result = super().result()
        worker, sc = self.worker, self.worker.cfg.sensitivity
        start = time.monotonic()
        sync_buffers(worker.net.model, worker.world)  # every replica scores the same network
        stream = worker.batches(worker.splits.train, SCORING_STREAM)
        data = [stream.next() for _ in range(sc.batches)]
        table = scores(sc.score, worker.net.model, worker.net.layers, worker.net.space, data, sc.hutchinson_samples,
                       worker.generator(SCORING_STREAM))
        if worker.all_reduce_mean is not None:
            width = max(len(row) for row in table)
            padded = torch.tensor([row + [0.0] * (width - len(row)) for row in table], dtype=torch.float64,
                                  device=worker.device)
            mean = worker.all_reduce_mean(padded).cpu().tolist()
            table = [mean[d][:len(row)] for d, row in enumerate(table)]
        space = worker.net.space
        result.metrics[SCORES_METRIC] = json.dumps({
            "kind": getattr(sc.score, "value", sc.score), "decisions": [d.name for d in space.decisions],
            "candidates": [list(d.candidates) for d in space.decisions], "scores": table,
            "samples_per_worker": sum(len(y) for _, y in data), "workers": worker.world})
        result.metrics[SCORING_S] = time.monotonic() - start
        if worker.rank == 0:
            progress(f"scored {len(table)} decisions x {len(space.format_candidates)} formats "
                     f"({sc.score}) in {result.metrics[SCORING_S]:.1f} s")
        return result

    def artifacts(self, logger: RunLogger, result: Result) -> None:
        logger.json_artifact(schema.SCORES_FILE, json.loads(result.metrics[SCORES_METRIC]))


# -- the shared scoring --------------------------------------------------------------------------------------------
def scoring_key(phase_cfg: FliqsConfig) -> str:
    """sha256 of the pre-training config without the keys it does not depend on (the fields marked
    ``scoring_free``: targets, names, where things are stored)."""
    data = {k: v for k, v in to_flat_dict(phase_cfg).items() if not under(k, SCORING_FREE_KEYS)}
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


def shared_scoring(phase_cfg: FliqsConfig, run: RunContext) -> tuple[dict, bool]:
    """The scoring of ``phase_cfg`` (computed by this run, or by an earlier one): (its record, reused)."""
    key = scoring_key(phase_cfg)
    folder = run.storage / CACHE / key
    with file_lock(run.storage / CACHE / f"{key}.lock"):
        if (folder / RECORD).is_file():
            record = json.loads((folder / RECORD).read_text())
            reused = record["owner_run_id"] != run.run_id  # else: this run computed it, and is resumed
            if reused:
                progress(f"reusing sensitivity scores {key} (phase run {record['run_id']})")
            return {**record, "model_path": str(folder / PRETRAINED)}, reused
        start = time.monotonic()
        r = fit_child(run, "pretrain", schema.PHASE, methods.get(phase_cfg.method).worker, phase_cfg, params=True)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            downloaded = client(run.uri).download_artifacts(r.model_run_id, schema.MODEL_FILE, tmp)
            _write_atomic(folder / PRETRAINED, lambda p: shutil.copyfile(downloaded, p))
        record = {**json.loads(r.extras[SCORES_METRIC]), "key": key, "run_id": r.model_run_id,
                  "owner_run_id": run.run_id, "accounting": r.accounting, schema.SCORING_WALL_S: r.extras[SCORING_S],
                  "phase_wall_s": time.monotonic() - start, "model": PRETRAINED}
        _write_atomic(folder / RECORD, lambda p: p.write_text(json.dumps(record, indent=1)))
        return {**record, "model_path": str(folder / PRETRAINED)}, False


# -- the runner ----------------------------------------------------------------------------------------------------
def solve_at_target(run: RunContext, scores, const: float, costs) -> tuple[list[int], float, float]:
    """The program at the run's target; the reported cost (`fliqs.quant.cost.summarize`) must stay within it too.
    Returns (choices, their cost, seconds)."""
    net, target = run.plan.network, run.target
    start = time.monotonic()
    budget = target
    for _ in range(4):
        choices = solve(scores, costs, budget, const)
        cost = assignment_cost(net.shapes, net.space.assignment(choices), net.total_params, run.cfg.reward.cost)
        if cost <= target:
            return choices, cost, time.monotonic() - start
        budget -= cost - target  # rounding between the linear costs and summarize's integer BOPs
    raise BadInput(f"no assignment within the target {target:.6g} {run.plan.unit} was found")


def run_sensitivity(run: RunContext) -> RunResult:
    cfg, plan = run.cfg, run.plan
    net = plan.network
    space = net.space
    if space.searches_architecture:
        raise BadInput(f"method={cfg.method} scores formats only; it cannot search a supernet's architecture")
    const, costs = linear_costs(space, net.shapes, net.total_params, cfg.reward.cost)
    s = cfg.sensitivity  # its epochs resolved at load
    phase_cfg = derive(cfg, {"quant.uniform_format": s.pretrain_format, "train.epochs": s.pretrain_epochs,
                             "train.finetune_epochs": 0})
    shared, reused = shared_scoring(phase_cfg, run)
    if shared["decisions"] != [d.name for d in space.decisions] or \
            shared["candidates"] != [list(d.candidates) for d in space.decisions]:
        raise BadInput(f"the cached scores {shared['key']} do not match this run's search space; remove "
                       f"{run.storage / CACHE / shared['key']}")
    choices, cost, solve_s = solve_at_target(run, shared["scores"], const, costs)
    progress(f"{cfg.method}: solution at {cost:.4g} {plan.unit} (target {run.target:.4g}) in {solve_s * 1e3:.1f} ms: "
             + ", ".join(f"{d.name}={d.candidates[c]}" for d, c in zip(space.decisions, choices, strict=True)))

    qat = fit_child(run, "qat", schema.PHASE, methods.FIXED_QAT, derive(cfg, {"train.epochs": s.qat_epochs}),
                    params=True, choices=choices, init=shared["model_path"])
    pre = shared["accounting"]
    extra = {schema.SOLVE_S: solve_s, schema.SHARED_EPOCHS: pre["epochs"], schema.SHARED_WORKER_S: pre["worker_s"],
             schema.SHARED_TRAIN_WALL_S: pre["train_wall_s"], schema.SCORING_WALL_S: shared[schema.SCORING_WALL_S],
             schema.SCORING_REUSED: float(reused)}
    logger = RunLogger(run.uri, run.run_id)
    logger.tags({schema.SCORING_RUN: shared["run_id"]})
    logger.json_artifact(schema.SENSITIVITY_FILE, {
        "kind": shared["kind"], "decisions": shared["decisions"], "candidates": shared["candidates"],
        "scores": shared["scores"], "costs": costs, "cost_const": const, "unit": plan.unit, "target": run.target,
        "choices": choices, "objective": program_score(shared["scores"], choices),
        "program_cost": program_cost(costs, choices, const), "cost": cost, "scoring_key": shared["key"],
        "scoring_run_id": shared["run_id"], **extra})
    return qat.with_accounting(total_accounting(pre, qat)).with_extras(**extra)
