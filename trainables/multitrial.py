"""The multi-trial runner: suggest, train each candidate briefly, observe; retrain the best within the budget.

Every candidate is its own training run (a nested MLflow run with role ``candidate``) of plain QAT for
``multi_trial.trial_epochs``; ``multi_trial.budget x train.epochs`` epochs are spent on candidates. With
``budget.proposals`` (default) only proposals within the cost target are trained: the searcher draws again, and
learns from each rejected proposal as from an untrained one (`fliqs.searchers.budget.propose_within_budget`).
Searchers learn from validation accuracy (through the reward), and the result is the most accurate candidate on
validation among those within the target, or the cheapest, with a warning, when none is
(`fliqs.searchers.budget.pick_within_budget`): the test split only reports. The protocol of these searches then trains
the chosen assignment from scratch to the full schedule (``multi_trial.retrain_epochs``, default ``train.epochs``; 0
reports the candidate itself); the accounting counts candidates and retraining.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fliqs import schema
from fliqs.console import progress
from fliqs.searchers import methods
from fliqs.searchers.budget import pick_within_budget, propose_within_budget
from fliqs.searchers.rewards import get_reward
from fliqs.searchers.space import assignment_cost
from fliqs.tracking import RunLogger
from fliqs.trainables.fit import RunContext, add_accounting, fit_child, retrain, retrain_epochs
from fliqs.trainables.plan import plan_run


def candidate_count(cfg: DictConfig) -> int:
    return max(1, int(cfg.multi_trial.budget * cfg.train.epochs // cfg.multi_trial.trial_epochs))


def run_multi_trial(cfg: DictConfig, ctx: RunContext) -> dict:
    net = plan_run(cfg).network
    space = net.space
    n = candidate_count(cfg)
    reward_fn = get_reward(cfg.reward.kind)
    cost_key = schema.GBOPS if cfg.reward.cost == "bops" else schema.SIZE_MB
    reward = lambda q, c: reward_fn(q, c, ctx.target, cfg.reward.beta)  # noqa: E731
    searcher = methods.resolve(methods.get(cfg.method).searcher)(space, reward, seed=cfg.seed, trials=n)
    candidate_cfg = OmegaConf.merge(cfg, {"train": {"epochs": cfg.multi_trial.trial_epochs, "finetune_epochs": 0}})

    def cost_of(choices: list[int]) -> float:  # what the candidate's run will report, known before it trains
        return assignment_cost(net.shapes, space.assignment(choices), net.total_params, cfg.reward.cost)

    candidates, fits, totals = [], [], {}
    for i in range(n):
        if cfg.budget.proposals:
            choices, rejected = propose_within_budget(searcher, cost_of, ctx.target)
        else:
            choices, rejected = searcher.suggest(), 0
        m = fit_child(candidate_cfg, ctx, f"candidate-{i}", schema.CANDIDATE, methods.FIXED_QAT, choices=choices)
        accuracy, cost = m[schema.VALIDATION_ACCURACY], m[cost_key]
        searcher.observe(choices, accuracy, cost)
        candidates.append({"choices": choices, schema.VALIDATION_ACCURACY: accuracy,
                           schema.TEST_ACCURACY: m[schema.TEST_ACCURACY], schema.GBOPS: m[schema.GBOPS],
                           schema.SIZE_MB: m[schema.SIZE_MB], "reward": reward(accuracy, cost),
                           "within_budget": cost <= ctx.target, "rejected_before": rejected, "run_id": m["run_id"]})
        fits.append(m)
        add_accounting(totals, m)
    pick, within = pick_within_budget([c[schema.VALIDATION_ACCURACY] for c in candidates],
                                      [f[cost_key] for f in fits], ctx.target)
    candidates[pick]["picked"] = True
    if not within:
        progress(f"{cfg.method}: none of the {n} candidates is within the target {ctx.target:.4g}; the cheapest "
                 f"({fits[pick][cost_key]:.4g}, {fits[pick][cost_key] / ctx.target:.2f} x the target) is the result")
    RunLogger(ctx.uri, ctx.run_id).json_artifact(schema.CANDIDATES_FILE, candidates)
    found = {**fits[pick], **totals}
    epochs = retrain_epochs(cfg, "multi_trial")
    return {**(retrain(cfg, ctx, found, epochs) if epochs else found), "candidates": len(candidates)}
