"""Differentiable searches (EdMIPS, DNAS) in the shared loop: relaxed formats, argmax at the end, then (their
papers' protocol) the argmax retrained from scratch (``relaxed.retrain_epochs``, default ``train.epochs``).

The architecture logits live outside the model (`fliqs.searchers.relaxed.RelaxedSearch`, the method's class named
by its registry entry): DDP all-reduces the weights, the step all-reduces the logits' gradients, so every replica
holds the same logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Subset

from fliqs import schema
from fliqs.searchers import methods
from fliqs.searchers.relaxed import relaxed_step
from fliqs.trainables.fit import RunContext, fit, fit_child, retrain, retrain_epochs
from fliqs.trainables.loop import Result, TrainMethod, WorkerContext


def run_relaxed(cfg, ctx: RunContext) -> dict:
    """The runner of EdMIPS and DNAS: the search (a nested phase run when retraining follows), then the retraining."""
    epochs = retrain_epochs(cfg, "relaxed")
    worker = methods.get(cfg.method).worker
    if not epochs:
        return fit(cfg, ctx, worker)
    return retrain(cfg, ctx, fit_child(cfg, ctx, "search", schema.PHASE, worker), epochs)


def _search_class(cfg):
    return methods.resolve(methods.get(cfg.method).searcher)


class Relaxed(TrainMethod):
    @classmethod
    def split_train(cls, cfg, data):
        """DNAS: the weights train on ``1 - relaxed.arch_fraction`` of the training split, the logits on the rest (a
        fixed split by ``data.seed``); EdMIPS: both on all of it."""
        if not getattr(_search_class(cfg), "splits_data", False):
            return data, None
        order = np.random.default_rng(cfg.data.seed).permutation(len(data))
        n_arch = max(1, int(round(cfg.relaxed.arch_fraction * len(data))))
        return Subset(data, sorted(order[n_arch:].tolist())), Subset(data, sorted(order[:n_arch].tolist()))

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        cfg, net = ctx.cfg, ctx.net
        search_class = _search_class(cfg)
        extra = dict(tau0=cfg.relaxed.tau0, tau_decay=cfg.relaxed.tau_decay, steps_per_epoch=ctx.steps_per_epoch,
                     beta=cfg.relaxed.dnas_beta, gamma=cfg.relaxed.dnas_gamma) if search_class.splits_data else {}
        self.search = search_class(net.space, net.layers, net.shapes, target=ctx.target, lam=cfg.relaxed.cost_weight,
                                   total_steps=ctx.total_steps, autocast=ctx.autocast, **extra)
        self.arch_batches = ctx.batches(ctx.method_data, 0, 3) if ctx.method_data is not None else None
        warmup = cfg.relaxed.arch_warmup_epochs
        warmup = min(10, cfg.train.epochs // 2) if warmup is None else warmup
        self.warmup_steps = warmup * ctx.steps_per_epoch if self.arch_batches else 0
        self.search.install(net.model)
        self.search.to(ctx.device)
        self.arch_optimizer = torch.optim.Adam(self.search.parameters(), lr=cfg.relaxed.arch_lr)
        self.generator: torch.Generator | None = None

    def step(self, model, optimizer, batch, step):
        if self.generator is None:  # after any restore: the stream is a function of (seed, rank, start step)
            self.generator = self.ctx.generator(step)
        return relaxed_step(model, self.search, optimizer, self.arch_optimizer, batch, step,
                            arch_batch=self.arch_batches.next() if self.arch_batches else None,
                            train_arch=step >= self.warmup_steps, generator=self.generator,
                            allreduce_mean=self.ctx.all_reduce_mean)

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
