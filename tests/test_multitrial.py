"""Multi-trial searchers on a synthetic problem whose best assignment is known (no training involved)."""

from __future__ import annotations

import pytest

from fliqs.errors import BadInput
from fliqs.searchers import methods
from fliqs.searchers.multitrial import MnasNetSearcher, NSGA2Searcher, RandomSearcher, TPESearcher
from fliqs.searchers.rewards import absolute
from fliqs.searchers.space import build_space

MULTI_TRIAL = sorted(name for name, m in methods.METHODS.items() if m.family == methods.MULTI_TRIAL)

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


def make_searcher(name, space, reward, seed=0, trials=10):
    """The multi-trial method ``name``'s searcher, found through the method registry."""
    return methods.resolve(methods.get(name).searcher)(space, reward, seed=seed, trials=trials)


def best_reward(space, evaluate, reward):
    import itertools

    return max(reward(*evaluate(c)) for c in itertools.product(*(range(n) for n in space.sizes)))


def test_the_registry_names_every_multi_trial_searcher():
    assert MULTI_TRIAL == ["mnasnet", "nsga2", "random", "tpe"]
    classes = {name: methods.resolve(methods.get(name).searcher) for name in MULTI_TRIAL}
    assert classes == {"random": RandomSearcher, "tpe": TPESearcher, "nsga2": NSGA2Searcher, "mnasnet": MnasNetSearcher}
    assert all(methods.get(name).runner == methods.MULTI_TRIAL_RUNNER for name in MULTI_TRIAL)


@pytest.mark.parametrize("name", MULTI_TRIAL)
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


@pytest.mark.parametrize("name", ["tpe", "mnasnet"])
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


@pytest.mark.parametrize(("name", "values"), [("tpe", lambda r, a, c: [r(a, c)]), ("nsga2", lambda r, a, c: [a, c])])
def test_optuna_searchers_tell_each_trial_its_own_result(name, values):
    """ask/tell: every suggestion is one Optuna trial, completed with the values of that suggestion, also when
    the same choices are suggested twice before being observed, and when results come back out of order."""
    space, evaluate = problem(n_layers=1)  # 4 assignments only: repeats are certain
    reward = lambda q, c: absolute(q, c, 4, -0.5)  # noqa: E731
    s = make_searcher(name, space, reward, seed=0, trials=12)
    pending = [s.suggest() for _ in range(6)]
    assert len({tuple(c) for c in pending}) < len(pending)  # some choices repeat
    for choices in reversed(pending):
        s.observe(choices, *evaluate(choices))
    trials = s.study.trials
    assert len(trials) == 6
    assert all(t.state.name == "COMPLETE" for t in trials)
    for trial in trials:
        choices = [trial.params["d0"]]
        assert trial.values == pytest.approx(values(reward, *evaluate(choices)))
    assert sorted(t.params["d0"] for t in trials) == sorted(c[0] for c in pending)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(BadInput, match="unknown method 'grid'; valid: fliqs, ") as info:
        methods.get("grid")
    assert all(name in str(info.value) for name in MULTI_TRIAL)


def test_optuna_samplers_start_random_for_a_third_of_the_budget():
    """With Optuna's defaults (10 random TPE trials, a population of 50) a budget of a few candidates would be random
    search under another name."""
    from fliqs.searchers.multitrial import startup

    space, _ = problem()
    reward = lambda q, c: q  # noqa: E731
    assert [startup(n) for n in (3, 6, 12, 30)] == [2, 2, 4, 10]
    assert TPESearcher(space, reward, trials=12).study.sampler._n_startup_trials == 4
    assert NSGA2Searcher(space, reward, trials=30).study.sampler._population_size == 10
