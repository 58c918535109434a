"""The multi-trial runner: suggest, train each candidate briefly, observe; retrain the best by validation reward.

Every candidate is its own training run (a nested MLflow run with role ``candidate``) of plain QAT for
``multi_trial.trial_epochs``; ``multi_trial.budget x train.epochs`` epochs are spent on candidates. Searchers learn
from, and the best is chosen on, validation accuracy: the test split only reports. The protocol of these searches
then trains the chosen assignment from scratch to the full schedule (``multi_trial.retrain_epochs``, default
``train.epochs``; 0 reports the candidate itself); the accounting counts candidates and retraining.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fliqs import schema
from fliqs.searchers import methods
from fliqs.searchers.rewards import get_reward
from fliqs.tracking import RunLogger
from fliqs.trainables.fit import RunContext, add_accounting, fit_child, retrain, retrain_epochs
from fliqs.trainables.plan import plan_run


def candidate_count(cfg: DictConfig) -> int:
    return max(1, int(cfg.multi_trial.budget * cfg.train.epochs // cfg.multi_trial.trial_epochs))


def run_multi_trial(cfg: DictConfig, ctx: RunContext) -> dict:
    space = plan_run(cfg).network.space
    n = candidate_count(cfg)
    reward_fn = get_reward(cfg.reward.kind)
    cost_key = schema.GBOPS if cfg.reward.cost == "bops" else schema.SIZE_MB
    reward = lambda q, c: reward_fn(q, c, ctx.target, cfg.reward.beta)  # noqa: E731
    searcher = methods.resolve(methods.get(cfg.method).searcher)(space, reward, seed=cfg.seed, trials=n)
    candidate_cfg = OmegaConf.merge(cfg, {"train": {"epochs": cfg.multi_trial.trial_epochs, "finetune_epochs": 0}})
    candidates, best, totals = [], None, {}
    for i in range(n):
        choices = searcher.suggest()
        m = fit_child(candidate_cfg, ctx, f"candidate-{i}", schema.CANDIDATE, methods.FIXED_QAT, choices=choices)
        accuracy, cost = m[schema.VALIDATION_ACCURACY], m[cost_key]
        searcher.observe(choices, accuracy, cost)
        r = reward(accuracy, cost)
        candidates.append({"choices": choices, schema.VALIDATION_ACCURACY: accuracy,
                           schema.TEST_ACCURACY: m[schema.TEST_ACCURACY], schema.GBOPS: m[schema.GBOPS],
                           schema.SIZE_MB: m[schema.SIZE_MB], "reward": r, "run_id": m["run_id"]})
        add_accounting(totals, m)
        if best is None or r > best[0]:
            best = (r, m)
    RunLogger(ctx.uri, ctx.run_id).json_artifact(schema.CANDIDATES_FILE, candidates)
    found = {**best[1], **totals}
    epochs = retrain_epochs(cfg, "multi_trial")
    return {**(retrain(cfg, ctx, found, epochs) if epochs else found), "candidates": len(candidates)}
