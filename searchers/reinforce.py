"""The one-shot FLIQS step: sample -> set formats -> train -> quality -> reward -> controller update.

`OneShotSearch` bundles what the step needs (space, controller, quantized layers, cost and reward functions);
data loading, logging, checkpoints and distribution live in `fliqs.trainables.oneshot`. How the controller keeps to
the budget (its initial policy, the constraint in its loss): `fliqs.searchers.budget`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fliqs.quant.cost import ArchShapes, LayerShape
from fliqs.quant.layers import QuantLayer, set_assignment
from fliqs.searchers.budget import CostConstraint, Multiplier, dual_rate
from fliqs.searchers.controller import AllReduce, Controller
from fliqs.searchers.rewards import ONE_SIDED, QualityKind, get_reward
from fliqs.searchers.space import ExpectedCost, SearchSpace, on_architecture, sample_cost
from fliqs.training.evaluation import accuracy
from fliqs.training.step import classification_loss, descend


@dataclass
class OneShotSearch:
    space: SearchSpace
    controller: Controller
    layers: Sequence[QuantLayer]
    cost: Callable[[Mapping, Mapping], float]  # (assignment, architecture) -> cost in GBOPs or MB
    reward: Callable[[float, float], float]  # (quality, cost) -> reward
    quality: QualityKind = QualityKind.val_accuracy
    autocast: torch.autocast | None = None
    set_architecture: Callable[[Mapping[str, str]], None] | None = None  # FLIQNAS: {block: label} -> supernet

    def apply(self, choices: Sequence[int]) -> tuple[dict, dict]:
        """Set the sampled formats (and architecture) on the model; return both."""
        assignment, architecture = self.space.assignment(choices), self.space.architecture(choices)
        set_assignment(self.layers, assignment)
        if architecture:
            self.set_architecture(architecture)
        return assignment, architecture

    def final_choices(self) -> list[int]:
        return self.controller.policy.argmax().tolist()


def make_search(space: SearchSpace, layers: Sequence[QuantLayer], shapes: Sequence[LayerShape] | ArchShapes,
                total_params: int, *, total_steps: int, target: float, cost_kind: str = "bops",
                reward_kind: str = "absolute", beta: float = -0.1,
                quality: QualityKind = QualityKind.val_accuracy, controller_kwargs: Mapping | None = None,
                tracking: str = "reward", dual_scale: float = 2.0, prior: torch.Tensor | None = None,
                autocast: torch.autocast | None = None,
                set_architecture: Callable[[Mapping[str, str]], None] | None = None) -> OneShotSearch:
    """``shapes``: the model's layer shapes, or a supernet's `ArchShapes` when ``space`` searches architecture.
    ``tracking``: how the controller keeps to the target besides its reward (`fliqs.run.config.BudgetTracking`:
    ``reward``, ``dual`` with ``dual_scale``, ``projection``; `fliqs.searchers.budget`). One-sided rewards
    (``one_sided``, ``mnas_hard``) give an inequality constraint, the others an equality. ``prior``: the policy's
    initial logits (`fliqs.searchers.budget.target_prior`); None: uniform."""
    if space.searches_architecture and (set_architecture is None or not isinstance(shapes, ArchShapes)):
        raise ValueError("an architecture search needs the supernet's ArchShapes and set_architecture")
    kwargs = dict(controller_kwargs or {})
    inequality = reward_kind in ONE_SIDED
    if tracking in ("dual", "projection"):
        kwargs.update(constraint=CostConstraint(space, shapes, total_params, cost_kind, target), inequality=inequality,
                      project=tracking == "projection")
    if tracking == "dual":
        rl_steps = Controller(space.sizes, total_steps=total_steps, **dict(controller_kwargs or {})).rl_steps
        kwargs["multiplier"] = Multiplier(dual_rate(dual_scale, rl_steps), nonnegative=inequality)
    controller = Controller(space.sizes, total_steps=total_steps, initial_logits=prior, **kwargs)
    reward_fn = get_reward(reward_kind)
    return OneShotSearch(
        space=space, controller=controller, layers=layers,
        cost=partial(sample_cost, shapes, total_params=total_params, cost=cost_kind),
        reward=lambda q, c: reward_fn(q, c, target, beta), quality=QualityKind(quality), autocast=autocast,
        set_architecture=set_architecture)


def expected_search_cost(search: OneShotSearch, shapes: Sequence[LayerShape] | ArchShapes, total_params: int,
                         cost_kind: str = "bops") -> float:
    """Cost expected under the policy's format probabilities, on its most likely architecture."""
    probs = search.controller.policy.probs().detach()
    layer_shapes, _ = on_architecture(shapes, {}, search.space.architecture(search.final_choices()))
    return float(ExpectedCost(search.space, layer_shapes, total_params, cost_kind)(probs))


def fliqs_step(model: nn.Module, search: OneShotSearch, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor], val_batch: tuple[torch.Tensor, torch.Tensor],
               step: int, generator: torch.Generator | None = None,
               allreduce_mean: AllReduce | None = None) -> dict[str, float]:
    """One training step of the shared weights under a sampled assignment, then one controller step."""
    choices = search.controller.sample(step, generator)
    assignment, architecture = search.apply(choices.tolist())

    model.train()
    loss = classification_loss(model, batch, search.autocast)
    descend(loss, optimizer)

    if search.quality is QualityKind.val_accuracy:
        # After the update, on the sampled network itself (TuNAS): BatchNorm with the batch's statistics, so the
        # quality does not depend on the assignments sampled at earlier steps (running statistics mix them).
        quality = accuracy(model, *val_batch, autocast=search.autocast, stateless_bn=True)
    else:
        quality = -loss.item()
    cost = search.cost(assignment, architecture)
    reward = search.reward(quality, cost)
    kwargs = {"allreduce_mean": allreduce_mean} if allreduce_mean is not None else {}
    if architecture:  # the decisions of a skipped block did not shape this sample: no gradient for them
        kwargs["active"] = torch.tensor(search.space.active(choices.tolist()))
    stats = search.controller.update(choices, reward, step, **kwargs)
    return {"loss": loss.item(), "quality": quality, "sampled_cost": cost, **stats}

