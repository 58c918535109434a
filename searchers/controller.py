"""The FLIQS controller: an independent categorical distribution per decision, trained with REINFORCE.

* Logits start at zero (uniform), temperature 1, Adam with beta1 = 0 (TuNAS).
* Reward baseline: exponential moving average (momentum 0.95 by default), started at the first reward.
* Warm-up: for the first ``warmup_steps`` the controller samples uniformly and does not learn (the baseline
  still tracks the reward), so every format gets trained before the policy starts preferring some.
* Loss: ``-A * sum(log p(sampled)) + beta_H(t) * mean entropy`` with ``A = r - baseline`` and the cosine ramp
  of `fliqs.searchers.rewards.entropy_weight`: the policy converges by the last step.

Data parallel: every replica samples its own assignment; ``allreduce_mean`` (identity in one process) averages
the policy gradient and the reward fed to the baseline, so the controller stays identical on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fliqs.searchers.rewards import entropy_weight

AllReduce = Callable[[torch.Tensor], torch.Tensor]


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

    def log_prob(self, choices: torch.Tensor) -> torch.Tensor:
        """Sum over decisions of log p(choice)."""
        logp = torch.log_softmax(self.masked_logits(), dim=-1)
        return logp.gather(1, choices[:, None]).sum()

    def entropy(self) -> torch.Tensor:
        """Mean entropy per decision (nats)."""
        logp = torch.log_softmax(self.masked_logits(), dim=-1)
        return -(logp.exp() * logp.masked_fill(~self.mask, 0.0)).sum(-1).mean()

    def sample(self, generator: torch.Generator | None = None, uniform: bool = False) -> torch.Tensor:
        probs = self.mask.float() if uniform else self.probs().detach()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def argmax(self) -> torch.Tensor:
        return self.masked_logits().argmax(-1)


class Controller:
    def __init__(self, sizes: Sequence[int], *, total_steps: int, lr: float = 0.1,
                 baseline_momentum: float = 0.95, warmup_fraction: float = 0.25, entropy_max: float = 0.5):
        self.policy = Policy(sizes)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr, betas=(0.0, 0.999))
        self.baseline_momentum = baseline_momentum
        self.total_steps = total_steps
        self.warmup_steps = int(round(warmup_fraction * total_steps))
        self.entropy_max = entropy_max
        self.baseline: float | None = None

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    def sample(self, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.policy.sample(generator, uniform=self.in_warmup(step))

    def entropy_weight(self, step: int) -> float:
        return entropy_weight(step, self.warmup_steps, self.total_steps, self.entropy_max)

    def update(self, choices: torch.Tensor, reward: float, step: int,
               allreduce_mean: AllReduce = _identity) -> dict[str, float]:
        """One REINFORCE step on this replica's sample; returns what is worth logging."""
        mean_reward = float(allreduce_mean(torch.tensor([reward], dtype=torch.float64))[0])
        if self.baseline is None:
            self.baseline = mean_reward
        advantage = reward - self.baseline
        beta_h = self.entropy_weight(step)
        entropy = self.policy.entropy()
        if not self.in_warmup(step):
            loss = -advantage * self.policy.log_prob(choices) + beta_h * entropy
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            self.policy.logits.grad.copy_(allreduce_mean(self.policy.logits.grad))
            self.optimizer.step()
        m = self.baseline_momentum
        self.baseline = m * self.baseline + (1 - m) * mean_reward
        return {"reward": reward, "baseline": self.baseline, "advantage": advantage,
                "entropy": float(entropy.detach()), "entropy_weight": beta_h}

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
