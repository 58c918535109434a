"""Differentiable searches (EdMIPS, DNAS) in the shared loop: relaxed formats, argmax at the end.

The architecture logits live outside the model (`fliqs.searchers.relaxed.RelaxedSearch`, the method's class named
by its registry entry): DDP all-reduces the weights, the step all-reduces the logits' gradients, so every replica
holds the same logits.
"""

from __future__ import annotations

import torch

from fliqs.searchers import methods
from fliqs.searchers.relaxed import relaxed_step
from fliqs.trainables.loop import Result, TrainMethod, WorkerContext


class Relaxed(TrainMethod):
    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        cfg, net = ctx.cfg, ctx.net
        search_class = methods.resolve(methods.get(cfg.method).searcher)
        self.search = search_class(net.space, net.layers, net.shapes, target=ctx.target, lam=cfg.relaxed.cost_weight,
                                   total_steps=ctx.total_steps, autocast=ctx.autocast)
        self.search.install(net.model)
        self.search.to(ctx.device)
        self.arch_optimizer = torch.optim.Adam(self.search.parameters(), lr=cfg.relaxed.arch_lr)
        self.generator: torch.Generator | None = None

    def step(self, model, optimizer, batch, step):
        if self.generator is None:  # after any restore: the stream is a function of (seed, rank, start step)
            self.generator = self.ctx.generator(step)
        return relaxed_step(model, self.search, optimizer, self.arch_optimizer, batch, step,
                            generator=self.generator, allreduce_mean=self.ctx.all_reduce_mean)

    def progress(self, means, step):
        return {"train_loss": means["task_loss"], "cost_loss": means["cost_loss"],
                "expected_gbops": means["expected_gbops"], "arch_entropy": means["entropy"]}

    def state_dict(self) -> dict:
        return {"search": self.search.state_dict(), "arch_optimizer": self.arch_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.search.load_state_dict(state["search"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])

    def result(self) -> Result:
        decisions = self.search.decisions_report()
        self.search.apply_final()  # plain single-format layers at the argmax assignment
        net = self.ctx.net
        return Result(net.model, net.layers, net.shapes, decisions)
