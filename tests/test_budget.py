"""Keeping to the budget (`fliqs.searchers.budget`): the dual multiplier, the extraction within the target against
brute force on real spaces (fliqs_cnn on digits, the FLIQNAS supernet), and the multi-trial proposals and pick."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fliqs.run.loading import load_config
from fliqs.searchers.budget import (
    Multiplier,
    dual_rate,
    extract_within_budget,
    nearest_within_budget,
    pick_within_budget,
    propose_within_budget,
    target_prior,
)
from fliqs.searchers.controller import Policy
from fliqs.searchers.multitrial import MnasNetSearcher, RandomSearcher, TPESearcher
from fliqs.searchers.program import program_cost, program_costs
from fliqs.searchers.rewards import absolute
from fliqs.searchers.space import ExpectedCost, SearchSpace, build_space, on_architecture, sample_cost
from fliqs.trainables.plan import make_plan

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the multiplier ------------------------------------------------------------------------------------------------
def test_the_multiplier_ascends_on_the_cost_error_by_hand():
    m = Multiplier(rate=dual_rate(2.0, 400))  # 2 / 400 = 0.005 per unit of error
    assert m.rate == pytest.approx(0.005)
    assert m.update(1.0) == pytest.approx(0.005)  # twice the target: lambda grows
    assert m.update(0.5) == pytest.approx(0.0075)
    assert m.update(-4.0) == pytest.approx(-0.0125)  # an equality target: lambda may turn negative
    one_sided = Multiplier(rate=0.01, nonnegative=True)
    assert one_sided.update(-3.0) == 0.0  # an inequality: never a bonus for cost
    restored = Multiplier(rate=0.005)
    restored.load_state_dict(m.state_dict())
    assert restored.value == m.value


# -- the extraction ------------------------------------------------------------------------------------------------
def _brute_force(space, log_probs, shapes, total_params, cost, budget, lower=-math.inf):
    """(log-probability, choices) of the most probable assignment within ``budget`` over every format choice (the
    architecture decisions at their argmax), costed with the program's coefficients (test_program.py checks them
    against the reported cost)."""
    argmax = [int(log_probs[d, :len(dec.candidates)].argmax()) for d, dec in enumerate(space.decisions)]
    formats = [d for d, dec in enumerate(space.decisions) if dec.kind == "format"]
    layer_shapes, _ = on_architecture(shapes, {}, space.architecture(argmax))
    sub = SearchSpace(tuple(space.decisions[d] for d in formats), space.fixed)
    const, linear, pairs = program_costs(sub, layer_shapes, total_params, cost)
    best = None
    for sub_choices in itertools.product(*(range(len(row)) for row in linear)):
        if lower <= program_cost(linear, sub_choices, const, pairs) <= budget:
            choices = list(argmax)
            for d, k in zip(formats, sub_choices, strict=True):
                choices[d] = k
            lp = math.fsum(float(log_probs[d, k]) for d, k in enumerate(choices))
            if best is None or lp > best[0]:
                best = (lp, choices)
    return best


@pytest.mark.parametrize("overrides", [["space.candidates=[int2,int4,int8,fp8_e4m3]"],
                                       ["space.candidates=[int2,int4,int8]", "space.shared_wa=false"],
                                       ["space.candidates=[int2,int4,int8]", "reward.cost=size"]])
def test_the_extraction_is_the_most_probable_assignment_within_the_budget(overrides):
    plan = make_plan(load_config(overrides))
    net = plan.network
    cost = "size" if "reward.cost=size" in overrides else "bops"
    generator = torch.Generator().manual_seed(0)
    for trial in range(4):
        logits = torch.randn(len(net.space.decisions), max(net.space.sizes), generator=generator) * 2
        log_probs = torch.log_softmax(logits, dim=-1)
        budget = plan.cheapest + (plan.most_expensive - plan.cheapest) * (0.05 + 0.2 * trial)
        e = extract_within_budget(net.space, log_probs, net.shapes, net.total_params, cost, budget)
        best_lp, _ = _brute_force(net.space, log_probs, net.shapes, net.total_params, cost, budget)
        assert e.within and e.cost <= budget
        assert e.cost == pytest.approx(sample_cost(net.shapes, net.space.assignment(e.choices), {}, net.total_params,
                                                   cost), rel=1e-12)
        lp = math.fsum(float(log_probs[d, k]) for d, k in enumerate(e.choices))
        assert lp == pytest.approx(best_lp, abs=1e-9), trial
        assert e.argmax == log_probs.argmax(-1).tolist()[:len(e.argmax)]


def test_the_extraction_floor_uses_the_budget():
    """An argmax below the floor is lifted to the most probable assignment costing in [floor x budget, budget], one
    over the budget brought down into it; the candidates after the first are the next most probable, in order."""
    plan = make_plan(load_config(["space.candidates=[int2,int4,int8,fp8_e4m3]"]))
    net = plan.network
    logits = torch.zeros(len(net.space.decisions), max(net.space.sizes))
    logits[:, 0] = 2.0  # the argmax: every layer int2, far below the budget
    log_probs = torch.log_softmax(logits, -1)
    budget = plan.target
    e = extract_within_budget(net.space, log_probs, net.shapes, net.total_params, "bops", budget, floor=0.9)
    best_lp, _ = _brute_force(net.space, log_probs, net.shapes, net.total_params, "bops", budget, lower=0.9 * budget)
    assert e.within and 0.9 * budget - 1e-12 <= e.cost <= budget and e.argmax_cost < 0.9 * budget
    assert math.fsum(float(log_probs[d, k]) for d, k in enumerate(e.choices)) == pytest.approx(best_lp, abs=1e-9)
    without = extract_within_budget(net.space, log_probs, net.shapes, net.total_params, "bops", budget)
    assert without.choices == without.argmax  # no floor: the argmax fits
    # An argmax over the budget comes down into the window too; the next most probable follow in order.
    logits[:, 0], logits[:, 2] = 0.0, 2.0  # every layer int8
    log_probs = torch.log_softmax(logits, -1)
    e = extract_within_budget(net.space, log_probs, net.shapes, net.total_params, "bops", budget, floor=0.9, count=3)
    best_lp, _ = _brute_force(net.space, log_probs, net.shapes, net.total_params, "bops", budget, lower=0.9 * budget)
    assert e.argmax_cost > budget and 0.9 * budget - 1e-12 <= e.cost <= budget
    assert len(e.candidates) == 3 and list(e.candidates[0]) == e.choices and len(set(e.candidates)) == 3
    lps = [math.fsum(float(log_probs[d, k]) for d, k in enumerate(c)) for c in e.candidates]
    assert lps == sorted(lps, reverse=True)
    assert math.fsum(float(log_probs[d, k]) for d, k in enumerate(e.choices)) == pytest.approx(best_lp, abs=1e-9)


def test_an_argmax_within_the_budget_is_kept():
    plan = make_plan(load_config([]))
    net = plan.network
    logits = torch.zeros(len(net.space.decisions), max(net.space.sizes))
    logits[:, net.space.decisions[0].candidates.index("int2")] = 5.0  # every layer int2: the cheapest assignment
    e = extract_within_budget(net.space, torch.log_softmax(logits, -1), net.shapes, net.total_params, "bops",
                              plan.target)
    assert e.choices == e.argmax and e.within and e.cost == e.argmax_cost <= plan.target


def test_fliqnas_keeps_the_argmax_architecture_and_solves_its_formats():
    groups = "{'stem.*': a, 'blocks.0.*': a, 'blocks.[12].*': b, 'blocks.[34].*': c, 'blocks.[56].*': d, 'head*': e, " \
        "'classifier': e}"  # 5 format decisions: a brute force of 2^5
    cfg = load_config(["method=fliqnas", "model=fliqnas_digits", "space.candidates=[int2,int8]",
                       f"space.groups={groups}"])
    plan = make_plan(cfg)
    net = plan.network
    space = net.space
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(len(space.decisions), max(space.sizes), generator=generator)
    arch = [d for d, dec in enumerate(space.decisions) if dec.kind != "format"]
    for d in arch:  # the largest blocks: the dearest architecture
        logits[d, len(space.decisions[d].candidates) - 1] = 10.0
    log_probs = torch.log_softmax(logits, -1)
    argmax = log_probs.argmax(-1).tolist()
    arch_cost_int2 = sample_cost(net.shapes, space.uniform("int2"), space.architecture(argmax), net.total_params)
    budget = arch_cost_int2 * 1.3
    e = extract_within_budget(space, log_probs, net.shapes, net.total_params, "bops", budget)
    assert e.within and e.cost <= budget
    assert [e.choices[d] for d in arch] == [argmax[d] for d in arch]  # the architecture is the argmax's
    best_lp, _ = _brute_force(space, log_probs, net.shapes, net.total_params, "bops", budget)
    assert math.fsum(float(log_probs[d, k]) for d, k in enumerate(e.choices)) == pytest.approx(best_lp, abs=1e-9)
    # Below what any formats cost on that architecture: the argmax, said to be outside the budget.
    e = extract_within_budget(space, log_probs, net.shapes, net.total_params, "bops", arch_cost_int2 * 0.99)
    assert not e.within and e.choices == e.argmax


# -- multi-trial: proposals and the pick ---------------------------------------------------------------------------
def _toy_space():
    return build_space([f"l{i}" for i in range(4)], ["int2", "int4", "int8"])


def _bits_cost(choices):
    return sum((2, 4, 8)[c] for c in choices)


@pytest.mark.parametrize("searcher_class", [RandomSearcher, TPESearcher, MnasNetSearcher])
def test_proposals_are_within_the_budget_and_rejections_are_told(searcher_class):
    space = _toy_space()
    reward = lambda q, c: absolute(q, c, 12, -0.5)  # noqa: E731
    searcher = searcher_class(space, reward, seed=0, trials=8)
    told = []
    searcher.reject = lambda choices, cost, inner=searcher.reject: (told.append(cost), inner(choices, cost))
    rejected_total = 0
    for _ in range(8):
        choices, proposed, rejected = propose_within_budget(searcher, _bits_cost, 12)
        assert _bits_cost(choices) <= 12 and proposed == choices
        rejected_total += rejected
        searcher.observe(proposed, 0.9, _bits_cost(choices))
    assert rejected_total == len(told) > 0 and all(c > 12 for c in told)


def test_after_the_cap_the_last_proposal_is_repaired_or_trained_as_it_is():
    searcher = RandomSearcher(_toy_space(), lambda q, c: q, seed=0)
    choices, proposed, rejected = propose_within_budget(searcher, _bits_cost, budget=7, max_proposals=5)  # none fits
    assert rejected == 4 and choices == proposed and _bits_cost(choices) > 7  # no repair given: as it is
    repair = lambda c: [0] * len(c)  # noqa: E731
    for _ in range(20):  # a proposal that does not fit is repaired (one that fits is trained as it is)
        choices, proposed, _ = propose_within_budget(searcher, _bits_cost, budget=8, repair=repair, max_proposals=1)
        assert choices == ([0, 0, 0, 0] if _bits_cost(proposed) > 8 else proposed)


def test_a_repair_changes_the_fewest_decisions_and_keeps_the_most_bits():
    """Against brute force on fliqs_cnn's space (int2/int4/int8/fp8 on 4 layers): the nearest assignment within the
    budget by the number of decisions changed, the bits kept breaking ties."""
    plan = make_plan(load_config(["space.candidates=[int2,int4,int8,fp8_e4m3]"]))
    net = plan.network
    space, candidates = net.space, net.space.decisions[0].candidates
    bits = {"int2": 2, "int4": 4, "int8": 8, "fp8_e4m3": 8}
    cost = lambda c: sample_cost(net.shapes, space.assignment(c), {}, net.total_params, "bops")  # noqa: E731
    for proposal, fraction in (([2, 2, 2, 2], 0.2), ([3, 2, 1, 3], 0.1), ([0, 2, 2, 0], 0.3), ([1, 1, 1, 1], 0.9)):
        budget = plan.target_for(fraction)
        repaired = nearest_within_budget(proposal, space, net.shapes, net.total_params, "bops", budget)
        best = min((c for c in itertools.product(range(4), repeat=4) if cost(c) <= budget),
                   key=lambda c: (sum(a != b for a, b in zip(c, proposal, strict=True)),
                                  -sum(bits[candidates[k]] for k, p in zip(c, proposal, strict=True) if k != p)))
        changed = sum(a != b for a, b in zip(repaired, proposal, strict=True))
        assert cost(repaired) <= budget and changed == sum(a != b for a, b in zip(best, proposal, strict=True))
        if cost(proposal) <= budget:
            assert repaired == proposal


def test_the_pick_is_the_most_accurate_within_the_budget_or_the_cheapest():
    accuracies, costs = [0.99, 0.95, 0.97, 0.97, 0.50], [30.0, 10.0, 12.0, 11.0, 5.0]
    assert pick_within_budget(accuracies, costs, 12.0) == (3, True)  # 0.97 at 11 and at 12: the cheaper
    assert pick_within_budget(accuracies, costs, 12.0 - 1e-9) == (3, True)
    assert pick_within_budget(accuracies, costs, 100.0) == (0, True)
    assert pick_within_budget(accuracies, costs, 4.0) == (4, False)  # none fits: the cheapest, flagged


# -- the prior -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [[], ["space.shared_wa=false"], ["reward.cost=size"],
                                       ["method=fliqnas", "model=fliqnas_digits", "space.candidates=[int2,int4,int8]"]])
def test_the_prior_expects_the_target_and_is_the_maximum_entropy_form(overrides):
    """E[C] under the prior is the target; with a cost linear in the probabilities the logits are -mu * dE[C]/dp
    for one mu (the maximum-entropy solution of one linear constraint), so a fully uniform prior results at the
    uniform policy's own expected cost."""
    cost = "size" if "reward.cost=size" in overrides else "bops"
    for fraction in (0.3, 0.5, 0.7):
        plan = make_plan(load_config([*overrides, f"reward.target_fraction={fraction}"]))
        net = plan.network
        logits = target_prior(net.space, net.shapes, net.total_params, cost, plan.target)
        layer_shapes, _ = on_architecture(net.shapes, {})
        expected = ExpectedCost(net.space, layer_shapes, net.total_params, cost)
        policy = Policy(net.space.sizes)
        with torch.no_grad():
            policy.logits.copy_(logits)
        probs = policy.probs().detach()
        assert float(expected(probs)) == pytest.approx(plan.target, rel=1e-6)
        if "space.shared_wa=false" in overrides:  # bilinear: repeated linearised tilts, no single one
            continue
        uniform = (policy.mask.double() / torch.tensor(net.space.sizes)[:, None]).requires_grad_(True)
        expected(uniform).backward()
        g = uniform.grad.masked_fill(~policy.mask, 0.0)
        ratio = logits[g.abs() > 1e-12 * g.abs().max()] / g[g.abs() > 1e-12 * g.abs().max()].float()
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)  # one mu for every decision
        arch = [d for d, dec in enumerate(net.space.decisions) if dec.kind != "format"]
        assert all((logits[d] == 0).all() for d in arch)  # architecture choices cost nothing: uniform
    at_uniform = float(ExpectedCost(net.space, layer_shapes, net.total_params, cost)(
        policy.mask.double() / torch.tensor(net.space.sizes)[:, None]))
    logits = target_prior(net.space, net.shapes, net.total_params, cost, at_uniform)
    assert logits.abs().max() < 1e-4
