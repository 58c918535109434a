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

from fliqs.run import schema
from fliqs.searchers import methods
from fliqs.searchers.relaxed import relaxed_step
from fliqs.trainables.fit import RunContext, fit, fit_child, retrain
from fliqs.trainables.result import RunResult
from fliqs.trainables.worker import Result, TrainMethod, WorkerContext


def run_relaxed(run: RunContext) -> RunResult:
    """The runner of EdMIPS and DNAS: the search (a nested phase run when retraining follows), then the retraining."""
    epochs = run.cfg.relaxed.retrain_epochs  # resolved at load: train.epochs unless set
    method = methods.get(run.cfg.method).worker
    if not epochs:
        return fit(run, method)
    return retrain(run, fit_child(run, "search", schema.PHASE, method), epochs)


def _search_class(cfg):
    return methods.resolve(methods.get(cfg.method).searcher)


class Relaxed(TrainMethod):
    @classmethod
    def split_train(cls, cfg, data):
        """The weights train on all of the training split, or (a method with an ``arch_fraction``: DNAS) on the rest
        of it, the logits on that fraction (a fixed split by ``data.seed``)."""
        fraction = _search_class(cfg).arch_fraction(cfg)
        if fraction is None:
            return data, None
        order = np.random.default_rng(cfg.data.seed).permutation(len(data))
        n_arch = max(1, int(round(fraction * len(data))))
        return Subset(data, sorted(order[n_arch:].tolist())), Subset(data, sorted(order[:n_arch].tolist()))

    def __init__(self, worker: WorkerContext):
        super().__init__(worker)
        cfg, net = worker.cfg, worker.net
        search_class = _search_class(cfg)
        self.search = search_class(net.space, net.layers, net.shapes, target=worker.target,
                                   lam=cfg.relaxed.cost_weight, total_steps=worker.total_steps,
                                   autocast=worker.autocast, **search_class.options(cfg, worker.steps_per_epoch))
        self.arch_batches = worker.batches(worker.method_data, 0, 3) if worker.method_data is not None else None
        self.warmup_steps = search_class.arch_warmup_epochs(cfg) * worker.steps_per_epoch
        self.search.install(net.model)
        self.search.to(worker.device)
        self.arch_optimizer = torch.optim.Adam(self.search.parameters(), lr=cfg.relaxed.arch_lr)
        self.generator: torch.Generator | None = None

    def step(self, model, optimizer, batch, step):
        if self.generator is None:  # after any restore: the stream is a function of (seed, rank, start step)
            self.generator = self.worker.generator(step)
        return relaxed_step(model, self.search, optimizer, self.arch_optimizer, batch, step,
                            arch_batch=self.arch_batches.next() if self.arch_batches else None,
                            train_arch=step >= self.warmup_steps, generator=self.generator,
                            allreduce_mean=self.worker.all_reduce_mean)

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
        net = self.worker.net
        return Result(net.model, net.layers, net.shapes, decisions)
