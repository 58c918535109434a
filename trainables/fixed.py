"""Quantization-aware training of one fixed assignment: the uniform baselines and every multi-trial candidate."""

from __future__ import annotations

from collections.abc import Sequence

from fliqs.layers import set_assignment
from fliqs.trainables.loop import Result, TrainMethod, WorkerContext, qat_step


class FixedQAT(TrainMethod):
    """Plain QAT of ``choices`` (one index per decision of the space: a multi-trial candidate) or, without them,
    of ``quant.uniform_format`` on every searched layer (also formats outside the space, e.g. bf16)."""

    def __init__(self, ctx: WorkerContext, choices: Sequence[int] | None = None):
        super().__init__(ctx)
        space, fmt = ctx.net.space, ctx.cfg.quant.uniform_format
        if choices is not None:
            choices = [int(c) for c in choices]
            self.assignment, self.decisions = space.assignment(choices), space.report(choices)
        else:
            self.assignment = space.uniform(fmt)
            self.decisions = [{"decision": "*", "choice": fmt, "probability": 1.0}]
        set_assignment(ctx.net.layers, self.assignment)

    def step(self, model, optimizer, batch, step):
        return {"loss": qat_step(model, optimizer, batch, self.ctx.autocast)}

    def result(self) -> Result:
        net = self.ctx.net
        return Result(net.model, net.layers, net.shapes, self.decisions)
