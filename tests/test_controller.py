"""The REINFORCE controller (fliqs.searchers.controller): policy, warm-up, baseline, convergence, replicas."""

from __future__ import annotations

import io
import math
import threading

import pytest
import torch

from fliqs.quant.cost import LayerShape
from fliqs.searchers.budget import tilt_to_target
from fliqs.searchers.controller import Controller, Policy
from fliqs.searchers.rewards import absolute
from fliqs.searchers.space import assignment_cost, build_space

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [4, 2, 3]


# ---------------------------------------------------------------- policy


def test_policy_starts_uniform_with_padding():
    policy = Policy(SIZES)
    probs = policy.probs()
    assert probs.shape == (3, 4)
    torch.testing.assert_close(probs[0], torch.full((4,), 0.25))
    torch.testing.assert_close(probs[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(probs[2], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    assert probs[1, 2:].eq(0).all() and probs[2, 3] == 0
    expected = (math.log(4) + math.log(2) + math.log(3)) / 3
    assert policy.entropy().item() == pytest.approx(expected, rel=1e-6)


def test_entropy_matches_manual_per_decision_mean():
    policy = Policy(SIZES)
    torch.manual_seed(0)
    with torch.no_grad():
        policy.logits.copy_(torch.randn(3, 4) * 2)
    manual = []
    for d, n in enumerate(SIZES):
        p = torch.softmax(policy.logits[d, :n].detach().double(), -1)
        manual.append(-(p * p.log()).sum().item())
    assert policy.entropy().item() == pytest.approx(sum(manual) / 3, rel=1e-5)
    assert torch.isfinite(policy.entropy())


def test_masked_candidates_never_sampled():
    policy = Policy(SIZES)
    with torch.no_grad():  # make padded slots as attractive as possible: they must stay masked
        policy.logits[1, 2:] = 50.0
        policy.logits[2, 3] = 50.0
    assert policy.probs()[1, 2:].eq(0).all() and policy.probs()[2, 3] == 0
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([policy.sample(gen) for _ in range(600)])
    for d, n in enumerate(SIZES):
        assert draws[:, d].max() < n
        assert set(draws[:, d].tolist()) == set(range(n))  # every valid candidate does occur
    assert policy.argmax().tolist()[1] < 2 and policy.argmax().tolist()[2] < 3


def test_sampling_frequencies_follow_the_policy():
    policy = Policy([4])
    gen = torch.Generator().manual_seed(1)
    uniform = torch.stack([policy.sample(gen) for _ in range(4000)])[:, 0]  # zero logits: uniform
    freq = torch.bincount(uniform, minlength=4).float() / 4000
    assert (freq - 0.25).abs().max() < 0.03
    with torch.no_grad():
        policy.logits[0] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    greedy = torch.stack([policy.sample(gen) for _ in range(1000)])[:, 0]
    assert (greedy == 0).float().mean() > 0.9


def test_log_prob_matches_manual_log_softmax():
    policy = Policy(SIZES)
    torch.manual_seed(1)
    with torch.no_grad():
        policy.logits.copy_(torch.randn(3, 4))
    for choices in ([0, 0, 0], [3, 1, 2], [2, 0, 1]):
        logits = policy.logits.detach().double()
        manual = sum(logits[d, c] - torch.logsumexp(logits[d, :n], -1) for d, (c, n) in
                     enumerate(zip(choices, SIZES, strict=True)))
        got = policy.log_prob(torch.tensor(choices))
        assert got.item() == pytest.approx(manual.item(), rel=1e-5)
    # Gradient of the summed log-probability: one-hot(choice) - p per decision, zero on padding.
    policy.zero_grad()
    policy.log_prob(torch.tensor([3, 1, 2])).backward()
    p = policy.probs().detach()
    onehot = torch.zeros(3, 4)
    onehot[0, 3] = onehot[1, 1] = onehot[2, 2] = 1
    torch.testing.assert_close(policy.logits.grad, onehot - p)


def test_adam_has_no_momentum():
    controller = Controller(SIZES, total_steps=100)
    assert controller.optimizer.param_groups[0]["betas"][0] == 0.0
    assert isinstance(controller.optimizer, torch.optim.Adam)


# ---------------------------------------------------------------- warm-up, baseline, advantage


def test_warmup_freezes_logits_while_baseline_tracks_reward():
    controller = Controller([3, 3], total_steps=40, warmup_fraction=0.25, baseline_momentum=0.9)
    assert controller.warmup_steps == 10
    rewards = [0.3, 0.9, 0.1, 0.7, 0.5, 0.2, 0.8, 0.4, 0.6, 1.0]
    gen = torch.Generator().manual_seed(0)
    baseline = None
    for step, reward in enumerate(rewards):
        assert controller.in_warmup(step)
        stats = controller.update(controller.sample(step, gen), reward, step)
        expected_adv = 0.0 if baseline is None else reward - baseline
        baseline = reward if baseline is None else 0.9 * baseline + 0.1 * reward
        assert stats["advantage"] == pytest.approx(expected_adv, abs=1e-12)
        assert stats["baseline"] == pytest.approx(baseline, rel=1e-12)
        assert controller.baseline == pytest.approx(baseline, rel=1e-12)
        assert stats["reward"] == reward
        assert stats["entropy_weight"] == 0.0
        assert torch.equal(controller.policy.logits.detach(), torch.zeros(2, 3))
    # First step after warm-up: a reward above the baseline moves the logits toward the sample.
    step = 10
    assert not controller.in_warmup(step)
    choices = torch.tensor([2, 0])
    stats = controller.update(choices, baseline + 0.5, step)
    assert stats["advantage"] == pytest.approx(0.5, rel=1e-9)
    probs = controller.policy.probs().detach()
    assert probs[0, 2] > 1 / 3 and probs[1, 0] > 1 / 3
    assert probs[0, 0] < 1 / 3 and probs[1, 2] < 1 / 3


def test_first_reward_initialises_baseline():
    controller = Controller([2], total_steps=10)
    stats = controller.update(torch.tensor([1]), 2.5, 0)
    assert stats["baseline"] == 2.5 and stats["advantage"] == 0.0


def test_negative_advantage_moves_away_from_sample():
    controller = Controller([3], total_steps=10, warmup_fraction=0.0)
    controller.update(torch.tensor([0]), 1.0, 0)  # baseline := 1.0, advantage 0
    controller.update(torch.tensor([1]), 0.0, 1)  # advantage -1
    probs = controller.policy.probs().detach()[0]
    assert probs[1] < probs[0] and probs[1] < probs[2]


def test_entropy_is_penalised_after_warmup():
    """With zero advantage only the entropy term acts: it must *sharpen* the policy (FLIQS sign, not TuNAS)."""
    controller = Controller([3], total_steps=20, warmup_fraction=0.0, entropy_max=1.0)
    with torch.no_grad():
        controller.policy.logits[0] = torch.tensor([0.5, 0.0, -0.2])
    before = controller.policy.entropy().item()
    for step in range(5, 10):
        stats = controller.update(torch.tensor([1]), 0.3, step)  # constant reward: advantage 0
        assert stats["advantage"] == 0.0 and stats["entropy_weight"] > 0
    assert controller.policy.entropy().item() < before - 0.05
    assert controller.policy.argmax().item() == 0


def test_the_warmup_samples_the_initial_policy_which_does_not_learn():
    initial = torch.tensor([[2.0, 0.0, 0.0, 0.0]])  # p(0) = e^2 / (e^2 + 3) = 0.711
    controller = Controller([4], total_steps=100, warmup_fraction=0.5, initial_logits=initial)
    gen = torch.Generator().manual_seed(3)
    for step in range(50):
        controller.update(controller.sample(step, gen), reward=float(step % 3), step=step)
    torch.testing.assert_close(controller.policy.logits.detach(), initial)  # frozen through the warm-up
    warm = torch.stack([controller.sample(10, gen) for _ in range(3000)])[:, 0]
    assert (warm == 0).float().mean() == pytest.approx(0.711, abs=0.03)
    uniform = Controller([4], total_steps=100, warmup_fraction=0.5)  # no initial logits: uniform
    draws = torch.stack([uniform.sample(10, gen) for _ in range(3000)])[:, 0]
    assert (torch.bincount(draws, minlength=4).float() / 3000 - 0.25).abs().max() < 0.03


# ---------------------------------------------------------------- convergence


def _run(controller, reward_fn, steps, seed, start=0):
    gen = torch.Generator().manual_seed(seed + start)
    for step in range(start, steps):
        choices = controller.sample(step, gen)
        controller.update(choices, reward_fn(choices, gen), step)


def test_bandit_converges_to_best_arm():
    values = torch.tensor([[0.1, 0.6, 0.3, 0.2],
                           [0.5, 0.2, 0.1, 0.8],
                           [0.9, 0.4, 0.7, 0.0]], dtype=torch.float64)
    best = values.argmax(-1)

    def reward(choices, gen):
        noise = 0.02 * torch.randn((), generator=gen, dtype=torch.float64)
        return float(values[torch.arange(3), choices].sum() + noise)

    torch.manual_seed(0)
    controller = Controller([4, 4, 4], total_steps=600, warmup_fraction=0.25)
    _run(controller, reward, 300, seed=0)
    # Half-way the policy still explores (the schedule converges it in its second half) ...
    assert controller.policy.entropy().item() > 0.5 * math.log(4)
    _run(controller, reward, 600, seed=0, start=300)
    # ... and by the end it has converged on the best arm of every decision.
    assert torch.equal(controller.policy.argmax(), best)
    assert controller.policy.entropy().item() < 0.1
    assert (controller.policy.probs().detach()[torch.arange(3), best] > 0.97).all()


FORMATS = ["int2", "int4", "int8"]
# Accuracy increases with bits.
ACCURACY = {"int2": 0.5, "int4": 0.8, "int8": 0.95}
SHAPES = [LayerShape("a", "conv", 20_000, 100), LayerShape("b", "conv", 30_000, 400),
          LayerShape("c", "linear", 25_000, 50)]


def _cost_pressure(beta):
    space = build_space([s.name for s in SHAPES], FORMATS)
    target = assignment_cost(SHAPES, space.uniform("int2"), None)  # as tight as it gets

    def reward(choices, gen):
        assignment = space.assignment(choices.tolist())
        quality = sum(ACCURACY[assignment[s.name]["w"]] for s in SHAPES) / len(SHAPES)
        return absolute(quality, assignment_cost(SHAPES, assignment, None), target, beta)

    controller = Controller(space.sizes, total_steps=600, warmup_fraction=0.25)
    _run(controller, reward, 600, seed=1)
    return [FORMATS[i] for i in controller.policy.argmax().tolist()], controller


def test_no_cost_pressure_picks_most_accurate():
    chosen, controller = _cost_pressure(beta=0.0)
    assert chosen == ["int8"] * 3
    assert controller.policy.entropy().item() < 0.1


def test_tight_cost_target_picks_cheapest():
    chosen, controller = _cost_pressure(beta=-1.0)
    assert chosen == ["int2"] * 3
    assert (controller.policy.probs().detach()[:, 0] > 0.9).all()


BUDGET_COSTS = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)  # per decision; 4 decisions, target 8


def _budget_constraint(probs, choices):
    return (probs.double() * BUDGET_COSTS).sum() / 8.0 - 1.0


def test_the_projection_holds_the_expected_cost_where_the_entropy_penalty_drops_it():
    """No quality signal (noise rewards) and a start at the target whose mode is the cheapest candidate: the cosine
    entropy penalty collapses each decision onto its mode and the cost with it (0.5-0.75 x the target); tilted back
    after every update, the policy keeps E[C] = T at every step and converges onto an assignment near the target."""
    mask = torch.ones(4, 3, dtype=torch.bool)
    start = tilt_to_target(torch.zeros(4, 3), mask, _budget_constraint, [0] * 4)
    assert float(_budget_constraint(torch.softmax(start, -1), None)) == pytest.approx(0.0, abs=1e-6)
    landed = {}
    for project in (False, True):
        for seed in range(3):
            controller = Controller([3] * 4, total_steps=800, initial_logits=start, project=project,
                                    constraint=_budget_constraint if project else None)
            gen = torch.Generator().manual_seed(seed)
            for step in range(800):
                choices = controller.sample(step, gen)
                controller.update(choices, float(0.05 * torch.randn((), generator=gen)), step)
                if project:
                    assert abs(float(_budget_constraint(controller.policy.probs().detach(), None))) < 1e-5
            landed[project, seed] = float(BUDGET_COSTS[controller.policy.argmax()].sum()) / 8.0
    assert all(landed[False, seed] <= 0.75 for seed in range(3)), landed
    assert all(1.0 <= landed[True, seed] <= 1.125 for seed in range(3)), landed


# ---------------------------------------------------------------- data parallel


class Rendezvous:
    """All-reduce (mean) between replicas running in threads: every replica contributes, all get the same mean."""

    def __init__(self, n: int):
        self.slots: list[torch.Tensor | None] = [None] * n
        self.barrier = threading.Barrier(n, timeout=30)
        self.calls = [0] * n

    def for_rank(self, rank: int):
        def allreduce_mean(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            out = sum(self.slots[1:], self.slots[0]) / len(self.slots)  # same order on every rank
            self.barrier.wait()
            return out
        return allreduce_mean


def test_allreduce_one_step_by_hand():
    """Two replicas, one step from uniform: the mean gradient is 0.25 * (e1 - e0); Adam (beta1 = 0) moves each
    logit by lr * sign(grad)."""
    rdv = Rendezvous(2)
    replicas = [Controller([3], total_steps=10, warmup_fraction=0.0, lr=0.1) for _ in range(2)]
    samples = [(torch.tensor([0]), 1.0), (torch.tensor([1]), 0.0)]
    stats = [None, None]

    def work(rank):
        stats[rank] = replicas[rank].update(*samples[rank], 0, allreduce_mean=rdv.for_rank(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rdv.calls == [2, 2]  # the reward and the gradient
    assert stats[0]["baseline"] == stats[1]["baseline"] == 0.5
    assert stats[0]["advantage"] == 0.5 and stats[1]["advantage"] == -0.5
    for controller in replicas:
        torch.testing.assert_close(controller.policy.logits.detach(), torch.tensor([[0.1, -0.1, 0.0]]))
    # One replica alone would have moved all three logits (gradient -(e0 - p) * A is nonzero everywhere).
    alone = Controller([3], total_steps=10, warmup_fraction=0.0, lr=0.1)
    alone.baseline = 0.5
    alone.update(torch.tensor([0]), 1.0, 0)
    torch.testing.assert_close(alone.policy.logits.detach(), torch.tensor([[0.1, -0.1, -0.1]]))


def test_replicas_stay_identical_over_many_steps():
    values = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.8]], dtype=torch.float64)
    steps, n = 60, 2
    rdv = Rendezvous(n)
    torch.manual_seed(0)
    replicas = [Controller([3, 3], total_steps=steps, warmup_fraction=0.25) for _ in range(n)]
    history: list[list[tuple[list[int], float]]] = [[] for _ in range(n)]
    errors = []

    def work(rank):
        try:
            gen = torch.Generator().manual_seed(100 + rank)  # each replica samples its own assignment
            for step in range(steps):
                choices = replicas[rank].sample(step, gen)
                reward = float(values[torch.arange(2), choices].sum())
                history[rank].append((choices.tolist(), reward))
                replicas[rank].update(choices, reward, step, allreduce_mean=rdv.for_rank(rank))
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            rdv.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert any(a[0] != b[0] for a, b in zip(*history, strict=True))  # the replicas did sample differently
    assert torch.equal(replicas[0].policy.logits, replicas[1].policy.logits)
    assert not torch.equal(replicas[0].policy.logits, torch.zeros(2, 3))
    assert replicas[0].baseline == replicas[1].baseline
    # The shared baseline is the EMA of the *mean* reward over replicas.
    baseline = None
    for (_, r0), (_, r1) in zip(*history, strict=True):
        mean = (r0 + r1) / 2
        baseline = mean if baseline is None else 0.95 * baseline + 0.05 * mean
    assert replicas[0].baseline == pytest.approx(baseline, rel=1e-12)


def test_allreduce_result_is_what_the_update_uses():
    """A fake all-reduce that returns fixed tensors: the baseline and the gradient step must come from it."""
    fixed_grad = torch.tensor([[0.0, 2.0, 0.0]])

    def fake(t: torch.Tensor) -> torch.Tensor:
        return torch.tensor([7.0], dtype=torch.float64) if t.dtype == torch.float64 else fixed_grad.clone()

    controller = Controller([3], total_steps=10, warmup_fraction=0.0, lr=0.1)
    stats = controller.update(torch.tensor([0]), 1.0, 0, allreduce_mean=fake)
    assert stats["baseline"] == 7.0 and stats["advantage"] == 1.0 - 7.0
    # Gradient only on candidate 1 (positive): only that logit moves, down by lr.
    torch.testing.assert_close(controller.policy.logits.detach(), torch.tensor([[0.0, -0.1, 0.0]]))


# ---------------------------------------------------------------- learning rate, entropy term, masking


@pytest.mark.parametrize("steps", [100, 1000, 10_000])
def test_learning_rate_is_scaled_to_the_run_and_rises(steps):
    """The logits' travel budget is the same for any run length: the mean rate over the RL phase x its steps."""
    c = Controller([3], total_steps=steps, warmup_fraction=0.25, lr_scale=12.0, lr_rise=10.0)
    rl = steps - c.warmup_steps
    rates = [c.learning_rate(t) for t in range(c.warmup_steps, steps)]
    assert sum(rates) == pytest.approx(12.0, rel=0.02)
    assert rates[0] == pytest.approx(c.lr) and rates[-1] == pytest.approx(c.lr * (1 + 9 * (rl - 1) / rl))
    assert c.learning_rate(0) == c.lr  # during warm-up it does not learn anyway
    assert Controller([3], total_steps=steps, lr=0.003).lr == 0.003  # an explicit rate is kept


def test_the_rate_of_the_step_is_what_adam_uses():
    c = Controller([3], total_steps=100, warmup_fraction=0.0, lr=0.01, lr_rise=5.0)
    c.baseline = 0.0
    c.update(torch.tensor([0]), 1.0, 99)  # last step: 0.01 x (1 + 4 x 99/100)
    assert c.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 + 4 * 0.99))
    torch.testing.assert_close(c.policy.logits.detach()[0, 0], torch.tensor(0.01 * (1 + 4 * 0.99)))


def test_entropy_term_is_summed_over_decisions_like_the_log_probability():
    """Each decision's entropy gradient has its full weight (a mean over D decisions would divide it by D)."""
    policy = Policy([3, 3, 3, 3])
    with torch.no_grad():
        policy.logits.copy_(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    policy.entropy_sum().backward()
    summed = policy.logits.grad.clone()
    single = Policy([3])
    with torch.no_grad():
        single.logits.copy_(policy.logits[:1])
    single.entropies().sum().backward()
    torch.testing.assert_close(summed[:1], single.logits.grad)  # not a quarter of it
    assert policy.entropy().item() == pytest.approx(policy.entropies().mean().item())


def test_inactive_decisions_get_no_gradient():
    """A skipped block's kernel decision and its layers' format decisions did not shape the sample: REINFORCE and
    the entropy penalty leave them alone (TuNAS sums over active paths only)."""
    c = Controller([3, 3, 3], total_steps=10, warmup_fraction=0.0, lr=0.1, entropy_max=1.0)
    with torch.no_grad():
        c.policy.logits.copy_(torch.tensor([[0.3, 0.0, -0.1], [0.2, 0.0, 0.1], [0.0, 0.5, 0.0]]))
    before = c.policy.logits.detach().clone()
    c.baseline = 0.0
    active = torch.tensor([True, False, True])
    c.update(torch.tensor([0, 1, 2]), 1.0, 9, active=active)
    after = c.policy.logits.detach()
    assert torch.equal(after[1], before[1])
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])
    assert c.policy.log_prob(torch.tensor([0, 1, 2]), active).item() == pytest.approx(
        (c.policy.log_prob(torch.tensor([0, 1, 2])) - torch.log_softmax(after[1], -1)[1]).item())


# ---------------------------------------------------------------- checkpointing


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_state_dict_roundtrip_restores_and_continues_identically():
    values = torch.tensor([[0.1, 0.6, 0.3, 0.2], [0.5, 0.2, 0.1, 0.8]], dtype=torch.float64)

    def reward(choices, gen):
        return float(values[torch.arange(2), choices].sum())

    original = Controller([4, 3], total_steps=100, warmup_fraction=0.1, lr=0.05)
    _run(original, reward, 30, seed=0)
    restored = Controller([4, 3], total_steps=100, warmup_fraction=0.1, lr=0.05)
    restored.load_state_dict(_roundtrip(original.state_dict()))

    assert torch.equal(restored.policy.logits, original.policy.logits)
    assert restored.baseline == original.baseline
    opt_a, opt_b = original.optimizer.state_dict(), restored.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, value in opt_a["state"][0].items():
        assert torch.equal(value, opt_b["state"][0][key]), key
    assert float(opt_b["state"][0]["step"]) == 30 - original.warmup_steps

    snapshot = original.policy.logits.detach().clone()
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    for step in range(30, 50):
        for controller, gen in zip((original, restored), gens, strict=True):
            choices = controller.sample(step, gen)
            controller.update(choices, reward(choices, gen), step)
        assert torch.equal(original.policy.logits, restored.policy.logits)
        assert original.baseline == restored.baseline
    assert not torch.equal(original.policy.logits.detach(), snapshot)


def test_fresh_controller_differs_from_restored():
    """Guard for the round-trip test: without loading, Adam state and baseline differ, and so do the updates."""
    values = torch.tensor([[0.1, 0.6, 0.3, 0.2]], dtype=torch.float64)

    def reward(choices, gen):
        return float(values[0, choices[0]])

    original = Controller([4], total_steps=100, warmup_fraction=0.1)
    _run(original, reward, 30, seed=0)
    fresh = Controller([4], total_steps=100, warmup_fraction=0.1)
    with torch.no_grad():
        fresh.policy.logits.copy_(original.policy.logits)  # logits alone are not enough
    choices = torch.tensor([2])
    original.update(choices, 0.9, 30)
    fresh.update(choices, 0.9, 30)
    assert not torch.equal(original.policy.logits, fresh.policy.logits)
