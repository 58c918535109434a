"""The multi-trial runner: suggest, train each candidate briefly, observe; retrain the best within the budget.

Every candidate is its own training run (a nested MLflow run with role ``candidate``) of plain QAT for
``multi_trial.trial_epochs``; ``multi_trial.budget x train.epochs`` epochs are spent on candidates. With
``budget.proposals`` (default) only candidates within the cost target are trained: the searcher draws again, and
learns from each rejected proposal as from an untrained one; after too many, the last proposal is repaired to the
nearest assignment within the target (`fliqs.searchers.budget.propose_within_budget`).
Searchers learn from validation accuracy (through the reward), and the result is the most accurate candidate on
validation among those within the target, or the cheapest, with a warning, when none is
(`fliqs.searchers.budget.pick_within_budget`): the test split only reports. The protocol of these searches then trains
the chosen assignment from scratch to the full schedule (``multi_trial.retrain_epochs``, default ``train.epochs``; 0
reports the candidate itself); the accounting counts candidates and retraining.
"""

from __future__ import annotations

from fliqs.run import schema
from fliqs.run.config import FliqsConfig, derive
from fliqs.run.console import progress
from fliqs.run.tracking import RunLogger
from fliqs.searchers import methods
from fliqs.searchers.budget import nearest_within_budget, pick_within_budget, propose_within_budget
from fliqs.searchers.rewards import CostKind, get_reward
from fliqs.searchers.space import assignment_cost
from fliqs.trainables.fit import RunContext, fit_child, retrain
from fliqs.trainables.result import RunResult, total_accounting


def candidate_count(cfg: FliqsConfig) -> int:
    return max(1, int(cfg.multi_trial.budget * cfg.train.epochs // cfg.multi_trial.trial_epochs))


def run_multi_trial(run: RunContext) -> RunResult:
    cfg, net = run.cfg, run.plan.network
    space = net.space
    n = candidate_count(cfg)
    reward_fn = get_reward(cfg.reward.kind)
    reward = lambda q, c: reward_fn(q, c, run.target, cfg.reward.beta)  # noqa: E731
    searcher = methods.resolve(methods.get(cfg.method).searcher)(space, reward, seed=cfg.seed, trials=n)
    candidate_cfg = derive(cfg, {"train.epochs": cfg.multi_trial.trial_epochs, "train.finetune_epochs": 0})

    def cost_of(choices: list[int]) -> float:  # what the candidate's run will report, known before it trains
        return assignment_cost(net.shapes, space.assignment(choices), net.total_params, cfg.reward.cost)

    def cost(r: RunResult) -> float:
        return r.gbops if cfg.reward.cost == CostKind.bops else r.size_mb

    def repair(choices: list[int]) -> list[int]:
        return nearest_within_budget(choices, space, net.shapes, net.total_params, cfg.reward.cost, run.target)

    candidates, fits = [], []
    for i in range(n):
        if cfg.budget.proposals:
            choices, proposed, rejected = propose_within_budget(searcher, cost_of, run.target, repair)
        else:
            choices = proposed = searcher.suggest()
            rejected = 0
        r = fit_child(run, f"candidate-{i}", schema.CANDIDATE, methods.FIXED_QAT, candidate_cfg, choices=choices)
        searcher.observe(proposed, r.validation_accuracy, cost(r))
        candidates.append({"choices": choices, **({"proposed": proposed} if proposed != choices else {}),
                           schema.VALIDATION_ACCURACY: r.validation_accuracy,
                           schema.TEST_ACCURACY: r.test_accuracy, schema.GBOPS: r.gbops, schema.SIZE_MB: r.size_mb,
                           "reward": reward(r.validation_accuracy, cost(r)), "within_budget": cost(r) <= run.target,
                           "rejected_before": rejected, "run_id": r.model_run_id})
        fits.append(r)
    pick, within = pick_within_budget([r.validation_accuracy for r in fits], [cost(r) for r in fits], run.target)
    candidates[pick]["picked"] = True
    if not within:
        progress(f"{cfg.method}: none of the {n} candidates is within the target {run.target:.4g}; the cheapest "
                 f"({cost(fits[pick]):.4g}, {cost(fits[pick]) / run.target:.2f} x the target) is the result")
    RunLogger(run.uri, run.run_id).json_artifact(schema.CANDIDATES_FILE, candidates)
    found = fits[pick].with_accounting(total_accounting(*fits))
    epochs = cfg.multi_trial.retrain_epochs  # resolved at load: train.epochs unless set
    return (retrain(run, found, epochs) if epochs else found).with_extras(candidates=float(len(candidates)))
