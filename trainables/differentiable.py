"""Differentiable searches (EdMIPS, DNAS) on Ray Train: one run, relaxed formats, argmax at the end.

The architecture logits live outside the model (`fliqs.searchers.relaxed.RelaxedSearch`): DDP all-reduces the
weights, the step all-reduces the logits' gradients, so every replica holds the same logits.
"""

from __future__ import annotations

import torch

from fliqs.searchers.relaxed import make_relaxed, relaxed_step
from fliqs.trainables.loop import TrainRun


class DifferentiableRun(TrainRun):
    """``config["method"]``: ``"edmips"`` or ``"dnas"``."""

    def __init__(self, config: dict, session):
        self.method = config["method"]
        super().__init__(config, session)

    def setup(self) -> None:
        cfg = self.cfg
        self.search = make_relaxed(self.method, self.space, self.layers, self.shapes, target=self.target,
                                   lam=cfg.study.cost_weight, total_steps=self.total_steps, autocast=self.autocast)
        self.search.install(self.model)
        self.search.to(self.device)
        self.arch_optimizer = torch.optim.Adam(self.search.parameters(), lr=cfg.study.arch_lr)
        self.generator = torch.Generator().manual_seed(hash((cfg.seed, self.rank)) % (2**63))

    def method_state(self) -> dict:
        return {"search": self.search.state_dict(), "arch_optimizer": self.arch_optimizer.state_dict()}

    def load_method_state(self, state: dict) -> None:
        self.search.load_state_dict(state["search"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])

    def train_step(self, batch):
        return relaxed_step(self.train_model, self.search, self.optimizer, self.arch_optimizer, batch, self.step,
                            generator=self.generator, allreduce_mean=self.reduce)

    def progress_metrics(self, mean):
        return {"train_loss": mean["task_loss"], "cost_loss": mean["cost_loss"],
                "expected_gbops": mean["expected_gbops"], "arch_entropy": mean["entropy"]}

    def final_choices(self) -> list[int]:
        return self.search.final_choices()

    def final_assignment(self):
        decisions = self.search.decisions_report()
        if self.search.installed:
            self.search.remove()  # back to plain single-format layers for the argmax assignment
        choices = self.search.final_choices()
        return self.space.assignment(choices), decisions

