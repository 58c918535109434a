"""How a search keeps to the cost target its user set (measured in benchmarks/RESULTS.md, issue 22).

Why the paper's controller misses: its soft reward ``beta |C/T - 1|`` starts from a uniform policy that expects
1.8-4.5 x a typical digits target, the policy is still near uniform at half the run (its rate is scaled to converge in
the cosine phase), and the cosine entropy penalty, an exact gradient, then pulls every decision to its current mode
whatever that costs. The sampled rewards' cost signal is too noisy to hold the expected cost against it, and the
policy freezes wherever the penalty catches it: 1.1-1.8 x over the target, at any beta tried.

One-shot controllers (`budget.tracking`):

* `tilt_to_target` (``projection``, the default): after each controller update the policy is replaced by its
  information projection onto E[C] = T (``<= T`` for a one-sided reward): the KL-closest policy with that expected
  cost, ``p'_d(k) ~ p_d(k) exp(-mu g_dk)``, with ``g_dk`` the expected cost's derivative in ``p_d(k)`` (the
  candidate's cost when the cost is linear in the decisions, its linearisation at the policy otherwise) and one
  ``mu`` for every decision, found by bisection. E[C] = T holds at every RL step; the entropy penalty still converges
  the policy, now onto assignments around the target. Decisions that cost nothing (architecture choices, pinned
  layers) are left as they are.
* `CostConstraint` and `Multiplier` (``dual``): ``lambda * (E[C] / T - 1)`` in the controller's loss, with E[C] exact
  under the policy (`fliqs.searchers.space.ExpectedCost`, differentiable) and lambda by dual ascent,
  ``lambda += rate * (E[C] / T - 1)`` after each RL step (clipped at 0 for an inequality), ``rate = dual_scale / RL
  steps``. An integrator: it lags the entropy penalty's pull and lands 0.5-0.9 x the target (measured; kept as an
  option, not the default).
* `target_prior` (``budget.prior=target``): the controller's initial logits, the uniform policy tilted to the target
  (the maximum-entropy policy with E[C] = T). Its warm-up trains the shared weights mostly in the cheap formats the
  tilt favours, which cost accuracy on digits (measured; an option, not the default). With a supernet the prior's
  cost is taken on its reference architecture, the tilt's and the multiplier's on the policy's most likely one.

`extract_within_budget` (``budget.extraction=within``): the most probable assignments under the final policy whose
cost lies in ``[floor x T, T]`` (``budget.extraction_floor``; at most T where nothing lies there): the integer program
of `fliqs.searchers.program` with the scores ``-log p(candidate)`` (independent decisions: the log-probability of an
assignment is the sum of its decisions'), the next ones by no-good cuts; the argmax itself when it lies in the window.
The floor: a policy held at E[C] = T that has not fully converged has a mode that costs less or more than its mean,
and a result far below the target leaves budget unused. Far from its mode a converged policy's probabilities say
little (every other candidate has next to none: the most probable assignment within the budget can hold a format the
policy all but dropped, int2 in a first layer), so where the argmax has to be left the
``budget.extraction_candidates`` most probable assignments are the candidates, and the worker keeps the one most
accurate on the validation split with the shared weights (`fliqs.trainables.oneshot`), as one-shot NAS evaluates its
candidates. With an architecture search the architecture stays at its argmax and the formats are solved on it. The
argmax is reported beside the result.

Multi-trial searches: `propose_within_budget` asks a searcher until it proposes an assignment within the target (the
others are rejected untrained, `fliqs.searchers.multitrial`); when none of ``MAX_PROPOSALS`` fits (a tight target:
few random assignments of 16 layers cost less than 0.2 x int8), the last one is repaired to the nearest assignment
within the target (`nearest_within_budget`: the fewest decisions changed). `pick_within_budget` returns the most
accurate trained candidate within the target, or the cheapest when none is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fliqs.errors import BadInput
from fliqs.quant.formats import get_format
from fliqs.searchers.program import program_costs, solve
from fliqs.searchers.space import FORMAT, ExpectedCost, SearchSpace, on_architecture, sample_cost

RESOLVES = 4  # re-solves with a lowered budget when the reported cost rounds above the program's
ROOT_STEPS = 200  # of a tilt's root finding over [-MU_RANGE, MU_RANGE] (mu in units of 1 / the largest derivative)
MU_RANGE = 1e6
TILT_ROUNDS = 4  # linearised tilts: one for a cost linear in the probabilities, a few for a bilinear one
TILT_TOLERANCE = 1e-9  # |E[C] / T - 1| at which a tilt stops
MAX_PROPOSALS = 200  # a multi-trial searcher's proposals per trained candidate before the last one is repaired


def tilt_to_target(logits: torch.Tensor, mask: torch.Tensor, constraint: CostConstraint, choices: Sequence[int],
                   inequality: bool = False) -> torch.Tensor:
    """The information projection of the policy ``softmax(logits)`` onto E[C] = T (``<= T`` with ``inequality``):
    ``logits - mu * g`` with ``g`` the expected cost's derivative in the probabilities and one ``mu`` (module
    docstring). ``choices``: the architecture's decisions (the argmax's).

    The expected cost is linear in the probabilities when one decision sets both sides of a layer (the common case):
    ``V(q) = V(p) + sum (q - p) g`` exactly, so ``mu`` is found by bisection on that cheap expression (NumPy, float64)
    and one round lands on the target. Separate weight and activation decisions make it bilinear: the round is
    repeated from the tilted policy (a Newton iteration) until the true violation is within `TILT_TOLERANCE`."""
    z = logits.detach().double().masked_fill(~mask, float("-inf"))
    for _ in range(TILT_ROUNDS):
        with torch.enable_grad():  # callers may hold no_grad (a policy's update)
            probs = torch.softmax(z, dim=-1).requires_grad_(True)
            violation = constraint(probs, choices)
            v = float(violation.detach())
            if abs(v) <= TILT_TOLERANCE or (inequality and v <= 0):
                break
            (g,) = torch.autograd.grad(violation, probs)
        g = g.masked_fill(~mask, 0.0)
        direction = g / (g.abs().max() or 1.0)
        mu = _root(z.numpy(), probs.detach().numpy(), g.numpy(), direction.numpy(), v)
        z = z - mu * direction
    return z.masked_fill(~mask, 0.0).float()


def _root(z: np.ndarray, p: np.ndarray, g: np.ndarray, direction: np.ndarray, violation: float) -> float:
    """The ``mu`` at which the linearised violation ``violation + sum (softmax(z - mu direction) - p) g`` is 0: it
    falls as ``mu`` grows (its derivative is minus a sum of covariances), so Newton steps inside a shrinking bracket
    converge in a few evaluations, a bisection step standing in where Newton would leave the bracket."""
    base = violation - float((p * g).sum())
    lo, hi, mu = -MU_RANGE, MU_RANGE, 0.0
    for _ in range(ROOT_STEPS):
        shifted = z - mu * direction
        q = np.exp(shifted - shifted.max(axis=-1, keepdims=True))
        q /= q.sum(axis=-1, keepdims=True)
        value = base + float((q * g).sum())
        if abs(value) <= TILT_TOLERANCE * 1e-3:
            return mu
        lo, hi = (mu, hi) if value > 0 else (lo, mu)
        slope = -float(((q * g * direction).sum(-1) - (q * g).sum(-1) * (q * direction).sum(-1)).sum())
        step = mu - value / slope if slope < 0 else None
        mu = step if step is not None and lo < step < hi else (lo + hi) / 2
    return mu


def target_prior(space: SearchSpace, shapes, total_params: int | None, cost: str, target: float) -> torch.Tensor:
    """Logits [decisions, candidates] (padding 0) of the maximum-entropy policy expecting ``target``: the uniform
    policy tilted to the target (module docstring); a supernet's cost is taken on its reference architecture."""
    sizes = torch.tensor(space.sizes)
    mask = torch.arange(max(space.sizes))[None, :] < sizes[:, None]
    constraint = _OnReference(CostConstraint(space, shapes, total_params, cost, target))
    return tilt_to_target(torch.zeros(mask.shape), mask, constraint, [0] * len(space.decisions))


class _OnReference:
    """A `CostConstraint` on a supernet's reference architecture, whatever the choices."""

    def __init__(self, constraint: CostConstraint):
        self.constraint = constraint

    def __call__(self, probs: torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
        return self.constraint.expected_cost(probs, {}) / self.constraint.target - 1.0


class CostConstraint:
    """``E[C] / T - 1`` under a policy's probabilities, differentiable in them (module docstring)."""

    def __init__(self, space: SearchSpace, shapes, total_params: int | None, cost: str, target: float):
        self.space, self.shapes, self.total_params, self.cost, self.target = space, shapes, total_params, cost, target
        self._expected: dict[tuple, ExpectedCost] = {}  # one per architecture (one without a supernet)

    def expected_cost(self, probs: torch.Tensor, architecture: dict[str, str]) -> torch.Tensor:
        key = tuple(sorted(architecture.items()))
        if key not in self._expected:
            layer_shapes, _ = on_architecture(self.shapes, {}, architecture or None)
            self._expected[key] = ExpectedCost(self.space, layer_shapes, self.total_params, self.cost)
        return self._expected[key](probs)

    def __call__(self, probs: torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
        """The violation at ``probs`` ([decisions, candidates]) on the architecture of ``choices`` (the argmax)."""
        return self.expected_cost(probs, self.space.architecture(choices)) / self.target - 1.0


@dataclass
class Multiplier:
    """lambda of the cost constraint, updated by dual ascent (module docstring)."""

    rate: float
    nonnegative: bool = False  # an inequality E[C] <= T (one-sided rewards); otherwise E[C] = T
    value: float = 0.0

    def update(self, error: float) -> float:
        """One dual-ascent step on ``error`` (E[C] / T - 1); returns lambda."""
        self.value += self.rate * error
        if self.nonnegative:
            self.value = max(0.0, self.value)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def dual_rate(dual_scale: float, rl_steps: int) -> float:
    """The multiplier's step size: ``dual_scale`` spread over the RL steps (module docstring)."""
    return dual_scale / max(1, rl_steps)


@dataclass(frozen=True)
class Extraction:
    """The final choices and the argmax beside them, each with its cost; ``within``: the choices fit the budget.
    ``candidates``: the most probable assignments within the budget in order (the choices are the first), when the
    argmax had to be left; the argmax alone otherwise."""

    choices: list[int]
    cost: float
    argmax: list[int]
    argmax_cost: float
    within: bool
    candidates: tuple[tuple[int, ...], ...] = ()


def extract_within_budget(space: SearchSpace, log_probs: torch.Tensor, shapes, total_params: int | None,
                          cost: str, budget: float, floor: float = 0.0, count: int = 1) -> Extraction:
    """The ``count`` most probable assignments under independent per-decision ``log_probs`` ([decisions,
    candidates], padded rows allowed) of cost in ``[floor x budget, budget]`` (at most ``budget`` when nothing lies in
    that window), most probable first: the argmax alone when it lies in the window. When no assignment on the argmax
    architecture fits, the argmax itself with ``within=False`` (the caller says so)."""
    log_probs = log_probs.detach().double().cpu()
    argmax = [int(log_probs[d, :len(dec.candidates)].argmax()) for d, dec in enumerate(space.decisions)]
    architecture = space.architecture(argmax)

    def cost_of(choices: Sequence[int]) -> float:
        return sample_cost(shapes, space.assignment(choices), architecture, total_params, cost)

    argmax_cost = cost_of(argmax)
    alone = Extraction(argmax, argmax_cost, argmax, argmax_cost, argmax_cost <= budget, (tuple(argmax),))
    if floor * budget <= argmax_cost <= budget:
        return alone
    formats = [d for d, dec in enumerate(space.decisions) if dec.kind == FORMAT]
    if not formats:
        return alone
    sub = SearchSpace(tuple(space.decisions[d] for d in formats), space.fixed)
    layer_shapes, _ = on_architecture(shapes, {}, architecture)
    const, linear, pairs = program_costs(sub, layer_shapes, total_params, cost)
    scores = [[-float(v) for v in log_probs[d, :len(space.decisions[d].candidates)]] for d in formats]

    def full(solved: Sequence[int]) -> list[int]:
        choices = list(argmax)
        for d, k in zip(formats, solved, strict=True):
            choices[d] = int(k)
        return choices

    def next_best(lower: float | None, found: list[list[int]]) -> list[int] | None:
        """The most probable assignment in the window other than ``found`` (sub-space choices), or None."""
        limit = budget
        for _ in range(RESOLVES):
            try:
                solved = solve(scores, linear, limit, const, pairs, lower=lower, exclude=found)
            except BadInput:  # nothing (more) in the window on this architecture
                return None
            total = cost_of(full(solved))
            if total <= budget:
                return solved
            limit -= total - budget  # the reported cost's own rounding
        return None

    for lower in ([floor * budget, None] if floor > 0 else [None]):
        found: list[list[int]] = []
        while len(found) < count and (solved := next_best(lower, found)) is not None:
            found.append(solved)
        if found:
            first = full(found[0])
            return Extraction(first, cost_of(first), argmax, argmax_cost, True,
                              tuple(tuple(full(f)) for f in found))
    return alone


def propose_within_budget(searcher, cost_of: Callable[[list[int]], float], budget: float,
                          repair: Callable[[list[int]], list[int]] | None = None,
                          max_proposals: int = MAX_PROPOSALS) -> tuple[list[int], list[int], int]:
    """(what to train, the searcher's proposal, how many it made before it): its next proposal whose cost is at most
    ``budget`` (the ones before are rejected untrained through ``searcher.reject``). After ``max_proposals`` the
    last proposal is ``repair``-ed (`nearest_within_budget`), or trained as it is without a repair (the caller's
    pick then says that no candidate fit). Tell the searcher the result under its proposal: a repaired candidate's
    accuracy stands for the proposal (Baldwinian repair, the usual way for black-box searches)."""
    for rejected in range(max_proposals):
        choices = searcher.suggest()
        cost = cost_of(choices)
        if cost <= budget:
            return choices, choices, rejected
        if rejected == max_proposals - 1:
            return (repair(choices) if repair is not None else choices), choices, rejected
        searcher.reject(choices, cost)
    raise ValueError("max_proposals must be at least 1")


def nearest_within_budget(choices: Sequence[int], space: SearchSpace, shapes, total_params: int | None, cost: str,
                          budget: float) -> list[int]:
    """The assignment within ``budget`` that changes the fewest decisions of ``choices`` (format decisions) and,
    among those, keeps the most bits: the integer program with a score of 1 per changed decision, less a thousandth
    for each bit kept. ``choices`` itself when it fits."""
    if sample_cost(shapes, space.assignment(choices), {}, total_params, cost) <= budget:
        return list(choices)
    const, linear, pairs = program_costs(space, shapes, total_params, cost)
    widest = max(get_format(c).effective_bits for d in space.decisions for c in d.candidates)
    scores = [[0.0 if k == choices[d] else 1.0 + 1e-3 * (1 - get_format(c).effective_bits / widest)
               for k, c in enumerate(dec.candidates)] for d, dec in enumerate(space.decisions)]
    limit = budget
    for _ in range(RESOLVES):
        solved = solve(scores, linear, limit, const, pairs)
        total = sample_cost(shapes, space.assignment(solved), {}, total_params, cost)
        if total <= budget:
            return solved
        limit -= total - budget  # the reported cost's own rounding
    raise BadInput(f"no assignment within the target {budget:.6g} was found")


def pick_within_budget(accuracies: Sequence[float], costs: Sequence[float], budget: float) -> tuple[int, bool]:
    """(index, within): the most accurate candidate whose cost is at most ``budget`` (ties: the cheaper, then the
    earlier); when none is, the cheapest (ties: the more accurate), with ``within=False``."""
    if not accuracies or len(accuracies) != len(costs):
        raise ValueError("one cost per accuracy, at least one candidate")
    order = range(len(accuracies))
    fits = [i for i in order if costs[i] <= budget]
    if fits:
        return min(fits, key=lambda i: (-accuracies[i], costs[i], i)), True
    return min(order, key=lambda i: (costs[i], -accuracies[i], i)), False
