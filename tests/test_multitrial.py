"""Multi-trial searchers on a synthetic problem whose best assignment is known (no training involved)."""

from __future__ import annotations

import pytest

from fliqs.searchers.multitrial import SEARCHERS, make_searcher
from fliqs.searchers.rewards import absolute
from fliqs.searchers.space import build_space

CANDIDATES = ["int2", "int4", "int8", "fp8_e4m3"]
# accuracy of a layer in each format; the cost of a format is its bits
ACC = {"int2": 0.5, "int4": 0.9, "int8": 0.95, "fp8_e4m3": 0.96}
BITS = {"int2": 2, "int4": 4, "int8": 8, "fp8_e4m3": 8}


def problem(n_layers=3):
    space = build_space([f"l{i}" for i in range(n_layers)], CANDIDATES)

    def evaluate(choices):
        fmts = [CANDIDATES[c] for c in choices]
        acc = sum(ACC[f] for f in fmts) / len(fmts)
        cost = sum(BITS[f] for f in fmts)
        return acc, cost

    return space, evaluate


def best_reward(space, evaluate, reward):
    import itertools

    return max(reward(*evaluate(c)) for c in itertools.product(*(range(n) for n in space.sizes)))


@pytest.mark.parametrize("name", sorted(SEARCHERS))
def test_suggestions_are_valid_and_reproducible(name):
    space, evaluate = problem()
    reward = lambda q, c: absolute(q, c, 12, -0.5)  # noqa: E731
    runs = []
    for _ in range(2):
        s = make_searcher(name, space, reward, seed=3, trials=12)
        seen = []
        for _ in range(12):
            choices = s.suggest()
            assert len(choices) == 3 and all(0 <= c < 4 for c in choices)
            s.observe(choices, *evaluate(choices))
            seen.append(choices)
        runs.append(seen)
    assert runs[0] == runs[1], "same seed, same suggestions"


@pytest.mark.parametrize("name", ["tpe", "rl"])
def test_learning_searchers_beat_random_on_average(name):
    space, evaluate = problem()
    target = 12  # 4 bits per layer: int4 everywhere is the best trade-off
    reward = lambda q, c: absolute(q, c, target, -0.5)  # noqa: E731
    optimum = best_reward(space, evaluate, reward)

    def mean_best(searcher_name, seeds=range(6), trials=40):
        total = 0.0
        for seed in seeds:
            s = make_searcher(searcher_name, space, reward, seed=seed, trials=trials)
            best = -1e9
            for _ in range(trials):
                c = s.suggest()
                acc, cost = evaluate(c)
                s.observe(c, acc, cost)
                best = max(best, reward(acc, cost))
            total += best
        return total / len(seeds)

    learned, random = mean_best(name), mean_best("random")
    assert learned >= random - 1e-9
    assert optimum - learned < 0.05


def test_unknown_searcher():
    space, _ = problem()
    with pytest.raises(ValueError, match="valid: random"):
        make_searcher("grid", space, lambda q, c: q)
