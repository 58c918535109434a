"""Every search method fliqs knows, in one table: name -> family, what it needs, how one run of it is driven.

`fliqs search method=NAME`, `fliqs study study.methods=[...]`, `fliqs methods`, `fliqs pareto`, the validation
pass and the README read this table; no other product module names a method. Adding a method is one module
(its searcher, its per-worker training method or its driver) plus one entry in `METHODS`.

Each entry points at code by ``"module:attribute"`` strings, imported only when the method runs: the table is plain
data and imports nothing heavy, so configuration errors are found without torch.

* ``runner``: ``(cfg, RunContext) -> metrics``, drives one run of the method at one cost target
  (`fliqs.trainables.fit.train_once` for methods trained once; multi-trial and sequential have their own).
* ``worker``: the per-worker training method of `fliqs.trainables.loop` (trained-once methods).
* ``searcher``: the suggest/observe searcher of a multi-trial method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fliqs.errors import BadInput

ONE_SHOT, MULTI_TRIAL, DIFFERENTIABLE, SENSITIVITY, UNIFORM = (
    "one-shot", "multi-trial", "differentiable", "sensitivity", "uniform")
FAMILIES = (ONE_SHOT, MULTI_TRIAL, DIFFERENTIABLE, SENSITIVITY, UNIFORM)

TRAIN_ONCE = "fliqs.trainables.fit:train_once"
MULTI_TRIAL_RUNNER = "fliqs.trainables.multitrial:run_multi_trial"
RELAXED = "fliqs.trainables.differentiable:Relaxed"
RELAXED_RUNNER = "fliqs.trainables.differentiable:run_relaxed"  # search, then retrain the argmax
FIXED_QAT = "fliqs.trainables.fixed:FixedQAT"  # plain QAT of one assignment: uniform runs and multi-trial candidates


ONE_SHOT_HINT = "budget.extraction=within returns the most probable assignment within the target"
MULTI_TRIAL_HINT = "budget.proposals=true trains only candidates within the target"


def _bops_only(why: str) -> Callable[[Any], str | None]:
    def check(cfg) -> str | None:
        return None if cfg.reward.cost == "bops" else f"method={cfg.method} {why} (reward.cost=bops)"
    return check


def _arch_warmup_fits(cfg) -> str | None:
    warm, epochs = cfg.relaxed.arch_warmup_epochs, cfg.train.epochs  # resolved at load
    if 0 <= warm < epochs:
        return None
    return f"method=dnas: relaxed.arch_warmup_epochs={warm} leaves no epoch of architecture search in " \
           f"train.epochs={epochs}"


def _needs_uniform_format(cfg) -> str | None:
    return None if cfg.quant.uniform_format else "method=uniform trains one format on every searched layer: give " \
                                          "quant.uniform_format=<format> (fliqs study sets it per trial)"


def _linear_cost(cfg) -> str | None:
    """The integer program needs a cost linear in the decisions: BOPs of separate weight and activation decisions
    are bilinear (weight bits x activation bits)."""
    if cfg.reward.cost == "bops" and not cfg.space.shared_wa and not cfg.space.weight_only:
        return (f"method={cfg.method} solves a linear integer program, and BOPs of separate weight and activation "
                f"decisions (space.shared_wa=false) are bilinear: use space.shared_wa=true, space.weight_only=true "
                f"or reward.cost=size")
    return None


def _epochs_left(cfg) -> str | None:
    pretrain, qat = cfg.sensitivity.pretrain_epochs, cfg.sensitivity.qat_epochs  # resolved at load
    if qat < 1:
        return (f"method={cfg.method} pre-trains for {pretrain} of train.epochs={cfg.train.epochs} epochs: none "
                f"is left for the QAT of the solution (raise train.epochs or set sensitivity.qat_epochs)")
    return None


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    summary: str
    runner: str = TRAIN_ONCE
    worker: str | None = None
    searcher: str | None = None
    supernet: bool = False  # the model must be a supernet (fliqnas_digits, fliqnas_mbv2)
    searches_architecture: bool = False  # its worker samples the supernet's blocks (else: a fixed architecture)
    per_format: bool = False  # no cost target: a study runs it once per format of study.uniform_formats
    phases: tuple[str, ...] = ()  # a pipeline of other methods' runs (sequential: architecture, then formats)
    checks: tuple[Callable[[Any], str | None], ...] = ()  # plain config checks: a message, or None when fine
    budget_hint: str = ""  # what to change when a result lands over its cost target (the console says it)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fliqs", ONE_SHOT, "FLIQS: one shared network, a REINFORCE controller samples a format per layer per step",
           worker="fliqs.trainables.oneshot:OneShot", budget_hint=ONE_SHOT_HINT),
    Method("fliqnas", ONE_SHOT, "FLIQNAS: FLIQS on a supernet, architecture and formats sampled jointly",
           worker="fliqs.trainables.oneshot:Fliqnas", supernet=True, searches_architecture=True,
           checks=(_bops_only("models BOPs per sampled architecture only"),),
           budget_hint=ONE_SHOT_HINT + "; an architecture too dear for any formats needs budget.tracking=dual or a "
                                       "larger budget.dual_scale"),
    Method("sequential", ONE_SHOT, "architecture search at full precision first, then FLIQS on the architecture found",
           runner="fliqs.trainables.sequential:run_sequential", supernet=True, phases=("fliqnas", "fliqs"),
           checks=(_bops_only("aims its architecture phase at MACs"),), budget_hint=ONE_SHOT_HINT),
    Method("uniform", UNIFORM, "plain QAT with every searched layer in one format (quant.uniform_format)",
           worker=FIXED_QAT, per_format=True, checks=(_needs_uniform_format,)),
    Method("random", MULTI_TRIAL, "random assignments, each trained briefly; the best by validation reward kept",
           runner=MULTI_TRIAL_RUNNER, searcher="fliqs.searchers.multitrial:RandomSearcher",
           budget_hint=MULTI_TRIAL_HINT),
    Method("tpe", MULTI_TRIAL, "Optuna's TPE over assignments on the reward of briefly trained candidates",
           runner=MULTI_TRIAL_RUNNER, searcher="fliqs.searchers.multitrial:TPESearcher",
           budget_hint=MULTI_TRIAL_HINT),
    Method("nsga2", MULTI_TRIAL, "Optuna's NSGA-II on (validation accuracy, cost) of briefly trained candidates",
           runner=MULTI_TRIAL_RUNNER, searcher="fliqs.searchers.multitrial:NSGA2Searcher",
           budget_hint=MULTI_TRIAL_HINT),
    Method("mnasnet", MULTI_TRIAL, "MnasNet's RL over whole assignments: REINFORCE, one update per trained candidate "
           "(not HAQ's DDPG)", runner=MULTI_TRIAL_RUNNER, searcher="fliqs.searchers.multitrial:MnasNetSearcher",
           budget_hint=MULTI_TRIAL_HINT),
    Method("edmips", DIFFERENTIABLE, "EdMIPS: softmax-mixed weights and activations, one conv per layer",
           runner=RELAXED_RUNNER, worker=RELAXED, searcher="fliqs.searchers.edmips:EdMIPSSearch",
           checks=(_bops_only("has a cost loss in GBOPs"),),
           budget_hint="its cost loss is soft: raise relaxed.cost_weight"),
    Method("dnas", DIFFERENTIABLE, "DNAS: one Gumbel-weighted quantized path per candidate format",
           runner=RELAXED_RUNNER, worker=RELAXED, searcher="fliqs.searchers.dnas:DNASSearch",
           checks=(_bops_only("has a cost loss in GBOPs"), _arch_warmup_fits),
           budget_hint="its cost loss is soft: raise relaxed.dnas_beta"),
    Method("hawq", SENSITIVITY, "sensitivity + integer program (HAWQ-V3 / AutoQuantize): pre-train, score every "
           "layer x format (Hessian trace, gradient or KL), solve a MILP under the budget, QAT the solution",
           runner="fliqs.trainables.sensitivity:run_sensitivity",
           worker="fliqs.trainables.sensitivity:ScoringQAT", checks=(_linear_cost, _epochs_left)),
)}
assert all(m.family in FAMILIES and set(m.phases) <= set(METHODS) for m in METHODS.values())
DEFAULT = "fliqs"  # what `fliqs search` runs unless told
STUDY_DEFAULT = ("uniform", "random", DEFAULT, "edmips")  # what `fliqs study` compares unless told


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise BadInput(f"unknown method {name!r}; valid: {', '.join(METHODS)}") from None


def resolve(ref: str) -> Any:
    """The object named by ``"package.module:attribute"``."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
