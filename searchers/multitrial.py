"""Multi-trial searches: propose one full assignment per trial, learn from its trained result.

Every searcher has the same three calls: ``suggest() -> choices`` (one index per decision of a `SearchSpace`),
``observe(choices, accuracy, cost)`` and ``reject(choices, cost)``, and is built as ``Searcher(space, reward, seed=,
trials=)``. The driver (`fliqs.trainables.multitrial`) trains each suggestion briefly and feeds the result back. A
suggestion over the cost target is not trained when ``budget.proposals`` is on: it is rejected, and a learning
searcher is told so as if it had been trained to accuracy 0 (a death penalty, the usual constraint handling of
black-box searches), so that it learns where the budget ends; random search simply draws again (uniform over the
assignments within the budget). The reward is the FLIQS reward (`fliqs.searchers.rewards`), so every method
optimises the same objective.

* `RandomSearcher`: uniform over the space.
* `TPESearcher` / `NSGA2Searcher`: Optuna's samplers through its ask/tell interface (single objective: the reward;
  NSGA-II: validation accuracy up, cost down).
* `MnasNetSearcher`: MnasNet's RL over whole assignments (REINFORCE per trial; HAQ's DDPG is not implemented):
  the FLIQS controller proposes a full assignment per trial and takes one step on its reward (no warm-up, its rate
  and entropy schedule spanning the trials).

Optuna's samplers start with random trials (TPE: 10, NSGA-II: a population of 50): with fewer candidates than that
they *are* random search. Both start here with a third of the candidates (at least 2) and model the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fliqs.searchers.controller import Controller
from fliqs.searchers.space import SearchSpace

Reward = Callable[[float, float], float]


class RandomSearcher:
    def __init__(self, space: SearchSpace, reward: Reward, seed: int = 0, trials: int = 10):
        self.space, self.reward = space, reward
        self.rng = np.random.default_rng(seed)

    def suggest(self) -> list[int]:
        return [int(self.rng.integers(n)) for n in self.space.sizes]

    def observe(self, choices: list[int], accuracy: float, cost: float) -> None:
        pass

    def reject(self, choices: list[int], cost: float) -> None:
        pass


def startup(trials: int) -> int:
    """Random trials before a model-based sampler takes over: a third of the budget, at least 2."""
    return max(2, trials // 3)


class _OptunaSearcher:
    """One Optuna study, driven by ask/tell: ``suggest`` asks for a trial, ``observe`` tells its value(s)."""

    def __init__(self, space: SearchSpace, reward: Reward, sampler, directions: list[str]):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would flood the console
        self.space, self.reward = space, reward
        self.study = optuna.create_study(sampler=sampler, directions=directions)
        self.dists = {f"d{i}": optuna.distributions.CategoricalDistribution(list(range(n)))
                      for i, n in enumerate(space.sizes)}
        self._pending: dict[tuple[int, ...], list] = {}

    def suggest(self) -> list[int]:
        trial = self.study.ask(self.dists)
        choices = [int(trial.params[f"d{i}"]) for i in range(len(self.space.sizes))]
        self._pending.setdefault(tuple(choices), []).append(trial)
        return choices

    def values(self, accuracy: float, cost: float):
        raise NotImplementedError

    def observe(self, choices: list[int], accuracy: float, cost: float) -> None:
        self.study.tell(self._pending[tuple(choices)].pop(0), self.values(accuracy, cost))

    def reject(self, choices: list[int], cost: float) -> None:
        self.observe(choices, 0.0, cost)


class TPESearcher(_OptunaSearcher):
    """Tree-structured Parzen Estimator on the reward."""

    def __init__(self, space: SearchSpace, reward: Reward, seed: int = 0, trials: int = 10):
        import optuna

        super().__init__(space, reward, optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup(trials)),
                         ["maximize"])

    def values(self, accuracy: float, cost: float):
        return self.reward(accuracy, cost)


class NSGA2Searcher(_OptunaSearcher):
    """NSGA-II on two objectives: accuracy (maximised) and cost (minimised)."""

    def __init__(self, space: SearchSpace, reward: Reward, seed: int = 0, trials: int = 10):
        import optuna

        super().__init__(space, reward, optuna.samplers.NSGAIISampler(seed=seed, population_size=startup(trials)),
                         ["maximize", "minimize"])

    def values(self, accuracy: float, cost: float):
        return [accuracy, cost]


class MnasNetSearcher:
    """The FLIQS controller, one REINFORCE step per trained trial: its learning rate and entropy schedule span the
    trials; no warm-up, a faster baseline (few rewards)."""

    def __init__(self, space: SearchSpace, reward: Reward, seed: int = 0, trials: int = 10,
                 baseline_momentum: float = 0.8):
        import torch

        self.space, self.reward = space, reward
        self.controller = Controller(space.sizes, total_steps=trials, warmup_fraction=0.0,
                                     baseline_momentum=baseline_momentum)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def suggest(self) -> list[int]:
        return self.controller.sample(self.step, self.generator).tolist()

    def observe(self, choices: list[int], accuracy: float, cost: float) -> None:
        import torch

        self.controller.update(torch.tensor(choices), self.reward(accuracy, cost), self.step)
        self.step += 1

    def reject(self, choices: list[int], cost: float) -> None:
        """A REINFORCE step on the untrained proposal's reward at accuracy 0; the schedules (one step per trained
        trial) do not advance."""
        import torch

        self.controller.update(torch.tensor(choices), self.reward(0.0, cost), self.step)
