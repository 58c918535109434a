"""Multi-trial searches: propose one full assignment per trial, learn from its trained result.

Every searcher has the same two calls: ``suggest() -> choices`` (one index per decision of a `SearchSpace`) and
``observe(choices, accuracy, cost)``. The study runner trains each suggestion with a short QAT run and feeds
the result back. The reward is the FLIQS reward (`fliqs.searchers.rewards`), so every method optimises the
same objective.

* ``random``: uniform over the space.
* ``tpe``: Tree-structured Parzen Estimator through Ray Tune's ``OptunaSearch`` (driven directly: the study
  trial owns the loop); ``nsga2`` is the multi-objective option (accuracy up, cost down).
* ``rl``: MnasNet/HAQ style: the FLIQS controller proposes a full assignment per trial and takes one REINFORCE
  step on its reward (no warm-up, entropy schedule over the trials).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fliqs.searchers.controller import Controller
from fliqs.searchers.space import SearchSpace

Reward = Callable[[float, float], float]


class RandomSearcher:
    def __init__(self, space: SearchSpace, reward: Reward, seed: int = 0, **_):
        self.space, self.reward = space, reward
        self.rng = np.random.default_rng(seed)

    def suggest(self) -> list[int]:
        return [int(self.rng.integers(n)) for n in self.space.sizes]

    def observe(self, choices: list[int], accuracy: float, cost: float) -> None:
        pass


class OptunaSearcher:
    """TPE (single objective: the reward) or NSGA-II (two objectives) via ``ray.tune.search.optuna.OptunaSearch``."""

    def __init__(self, space: SearchSpace, reward: Reward, seed: int = 0, multi_objective: bool = False, **_):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        self.space, self.reward, self.multi_objective = space, reward, multi_objective
        dists = {f"d{i}": optuna.distributions.CategoricalDistribution(list(range(n)))
                 for i, n in enumerate(space.sizes)}
        if multi_objective:
            self.search = OptunaSearch(dists, metric=["accuracy", "cost"], mode=["max", "min"],
                                       sampler=optuna.samplers.NSGAIISampler(seed=seed))
        else:
            self.search = OptunaSearch(dists, metric="reward", mode="max",
                                       sampler=optuna.samplers.TPESampler(seed=seed))
        self._pending: dict[tuple[int, ...], str] = {}
        self._count = 0

    def suggest(self) -> list[int]:
        trial_id = f"t{self._count}"
        self._count += 1
        config = self.search.suggest(trial_id)
        choices = [int(config[f"d{i}"]) for i in range(len(self.space.sizes))]
        self._pending[tuple(choices)] = trial_id
        return choices

    def observe(self, choices: list[int], accuracy: float, cost: float) -> None:
        trial_id = self._pending.pop(tuple(choices))
        result = {"accuracy": accuracy, "cost": cost} if self.multi_objective else \
            {"reward": self.reward(accuracy, cost)}
        self.search.on_trial_complete(trial_id, result)


class RLSearcher:
    """The FLIQS controller, one REINFORCE step per trained trial."""

    def __init__(self, space: SearchSpace, reward: Reward, seed: int = 0, trials: int = 10, lr: float = 0.1,
                 entropy_max: float = 0.5, baseline_momentum: float = 0.8, **_):
        import torch

        self.space, self.reward = space, reward
        self.controller = Controller(space.sizes, total_steps=trials, lr=lr, warmup_fraction=0.0,
                                     entropy_max=entropy_max, baseline_momentum=baseline_momentum)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def suggest(self) -> list[int]:
        return self.controller.sample(self.step, self.generator).tolist()

    def observe(self, choices: list[int], accuracy: float, cost: float) -> None:
        import torch

        self.controller.update(torch.tensor(choices), self.reward(accuracy, cost), self.step)
        self.step += 1


SEARCHERS = {"random": RandomSearcher, "tpe": OptunaSearcher, "rl": RLSearcher,
             "nsga2": lambda *a, **k: OptunaSearcher(*a, multi_objective=True, **k)}


def make_searcher(name: str, space: SearchSpace, reward: Reward, seed: int = 0, trials: int = 10):
    try:
        factory = SEARCHERS[name]
    except KeyError:
        raise ValueError(f"unknown multi-trial searcher {name!r}; valid: {', '.join(SEARCHERS)}") from None
    return factory(space, reward, seed=seed, trials=trials)
