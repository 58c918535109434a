"""The FLIQS controller: an independent categorical distribution per decision, trained with REINFORCE.

* Logits start at zero (uniform) unless given, temperature 1, Adam with beta1 = 0 (TuNAS).
* Reward baseline: exponential moving average (momentum 0.95 by default), started at the first reward.
* Warm-up: for the first ``warmup_steps`` the controller samples from its initial policy and does not learn (the
  baseline still tracks the reward), so every format gets trained before the policy starts preferring some. The
  initial policy is uniform unless ``initial_logits`` are given (`fliqs.searchers.budget.target_prior`: the
  maximum-entropy policy at the cost target).
* Loss: ``-A * sum_d log p(sampled_d) + beta_H(t) * sum_d H_d`` over the *active* decisions, with
  ``A = r - baseline`` and the cosine ramp of `fliqs.searchers.rewards.entropy_weight`. The entropy is summed like
  the log-probability (a mean would make it D times weaker than the policy term); a decision that did not shape
  the sample (the kernel of a skipped block, the formats of its layers) takes no part, as in TuNAS. With a budget
  ``constraint``, plus ``lambda * (E[C] / T - 1)`` with a `fliqs.searchers.budget.Multiplier` (dual ascent after
  each RL step), or, with ``project``, the policy tilted back onto E[C] = T after each RL step
  (`fliqs.searchers.budget.tilt_to_target`).
* Learning rate, scaled to the run: Adam moves each logit by about its learning rate per step whatever the
  reward's scale, so a fixed rate makes a long search converge long before its entropy schedule says and a short
  one never. The rate rises linearly ``lr_rise`` times over the RL phase (TuNAS raises its rate over the search)
  from ``lr``, by default ``lr_scale / RL steps / ((1 + lr_rise) / 2)``: the logits can travel about ``lr_scale``
  over any run length. Defaults from `benchmarks/controller_convergence.py` (RESULTS.md).

Data parallel: every replica samples its own assignment; ``allreduce_mean`` (identity in one process) averages
the policy gradient and the reward fed to the baseline, so the controller stays identical on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fliqs.searchers.budget import Multiplier, tilt_to_target
from fliqs.searchers.rewards import entropy_weight

AllReduce = Callable[[torch.Tensor], torch.Tensor]
Constraint = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]  # (probs, argmax choices) -> E[C] / T - 1


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class Policy(torch.nn.Module):
    """Logits for D decisions with up to K candidates each, padded with -inf where a decision has fewer."""

    def __init__(self, sizes: Sequence[int]):
        super().__init__()
        sizes = list(sizes)
        width = max(sizes)
        mask = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
        self.sizes = sizes
        self.logits = torch.nn.Parameter(torch.zeros(len(sizes), width))
        self.register_buffer("mask", mask, persistent=False)

    def masked_logits(self) -> torch.Tensor:
        return self.logits.masked_fill(~self.mask, float("-inf"))

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.masked_logits(), dim=-1)

    def log_prob(self, choices: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over the (active) decisions of log p(choice)."""
        logp = torch.log_softmax(self.masked_logits(), dim=-1).gather(1, choices[:, None]).squeeze(1)
        return logp.sum() if active is None else logp[active].sum()

    def entropies(self) -> torch.Tensor:
        """The entropy of each decision (nats)."""
        logp = torch.log_softmax(self.masked_logits(), dim=-1)
        return -(logp.exp() * logp.masked_fill(~self.mask, 0.0)).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Mean entropy per decision (nats): what is logged."""
        return self.entropies().mean()

    def entropy_sum(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the (active) decisions' entropies: what is penalised."""
        h = self.entropies()
        return h.sum() if active is None else h[active].sum()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.multinomial(self.probs().detach(), 1, generator=generator).squeeze(1)

    def argmax(self) -> torch.Tensor:
        return self.masked_logits().argmax(-1)


class Controller:
    def __init__(self, sizes: Sequence[int], *, total_steps: int, lr: float | None = None, lr_scale: float = 15.0,
                 lr_rise: float = 10.0, baseline_momentum: float = 0.95, warmup_fraction: float = 0.25,
                 entropy_max: float = 0.2, initial_logits: torch.Tensor | None = None,
                 constraint: Constraint | None = None, multiplier: Multiplier | None = None,
                 project: bool = False, inequality: bool = False):
        if constraint is None and (multiplier is not None or project):
            raise ValueError("a multiplier or a projection needs the budget constraint")
        self.constraint, self.multiplier, self.project, self.inequality = constraint, multiplier, project, inequality
        self.policy = Policy(sizes)
        if initial_logits is not None:
            with torch.no_grad():
                self.policy.logits.copy_(initial_logits)
        self.baseline_momentum = baseline_momentum
        self.total_steps = total_steps
        self.warmup_steps = int(round(warmup_fraction * total_steps))
        self.rl_steps = max(1, total_steps - self.warmup_steps)
        self.lr_rise = lr_rise
        self.lr = lr if lr is not None else lr_scale / self.rl_steps / ((1 + lr_rise) / 2)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr, betas=(0.0, 0.999))
        self.entropy_max = entropy_max
        self.baseline: float | None = None

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    def sample(self, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One choice per decision from the policy (in the warm-up: the initial policy, which does not learn yet)."""
        return self.policy.sample(generator)

    def entropy_weight(self, step: int) -> float:
        return entropy_weight(step, self.warmup_steps, self.total_steps, self.entropy_max)

    def learning_rate(self, step: int) -> float:
        """Adam's rate at ``step``: ``lr`` at the start of the RL phase, ``lr_rise`` times that at its end."""
        progress = min(1.0, max(0, step - self.warmup_steps) / self.rl_steps)
        return self.lr * (1 + (self.lr_rise - 1) * progress)

    def update(self, choices: torch.Tensor, reward: float, step: int, allreduce_mean: AllReduce = _identity,
               active: torch.Tensor | None = None) -> dict[str, float]:
        """One REINFORCE step on this replica's sample; ``active`` (bool per decision, default all) names the
        decisions that shaped it. Returns what is worth logging."""
        mean_reward = float(allreduce_mean(torch.tensor([reward], dtype=torch.float64))[0])
        if self.baseline is None:
            self.baseline = mean_reward
        advantage = reward - self.baseline
        beta_h = self.entropy_weight(step)
        entropy = self.policy.entropy()
        budget = {}
        if not self.in_warmup(step):
            loss = -advantage * self.policy.log_prob(choices, active) + beta_h * self.policy.entropy_sum(active)
            if self.multiplier is not None:  # identical on every rank: the policies are
                violation = self.constraint(self.policy.probs(), self.policy.argmax().tolist())
                loss = loss + self.multiplier.value * violation
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            self.policy.logits.grad.copy_(allreduce_mean(self.policy.logits.grad))
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(step)
            self.optimizer.step()
            if self.multiplier is not None:
                budget["cost_multiplier"] = self.multiplier.update(float(violation.detach()))
            if self.project:
                with torch.no_grad():
                    self.policy.logits.copy_(tilt_to_target(self.policy.logits, self.policy.mask, self.constraint,
                                                            self.policy.argmax().tolist(), self.inequality))
        elif self.multiplier is not None:
            budget["cost_multiplier"] = self.multiplier.value
        m = self.baseline_momentum
        self.baseline = m * self.baseline + (1 - m) * mean_reward
        return {"reward": reward, "baseline": self.baseline, "advantage": advantage,
                "entropy": float(entropy.detach()), "entropy_weight": beta_h, **budget}

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline,
                **({"multiplier": self.multiplier.state_dict()} if self.multiplier is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        if self.multiplier is not None:
            self.multiplier.load_state_dict(state["multiplier"])
