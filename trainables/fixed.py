"""Quantization-aware training of one fixed assignment: the uniform baselines, every multi-trial candidate and the
QAT of a sensitivity method's solution."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fliqs.errors import BadInput
from fliqs.quant.layers import set_assignment
from fliqs.trainables.checkpoints import MODEL_FORMAT
from fliqs.trainables.worker import Result, TrainMethod, WorkerContext
from fliqs.training.step import train_step


def load_saved_state(path: str | Path) -> dict:
    """The state dict of a saved model (a run's ``model.pt``, `fliqs.trainables.saved`), loaded ``weights_only``."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable: not a saved fliqs model
        raise BadInput(f"{path} is not a fliqs model: {(str(err).strip().splitlines() or [type(err).__name__])[0]}") \
            from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise BadInput(f"{path} is not a {MODEL_FORMAT} file")
    return saved["model"]


class FixedQAT(TrainMethod):
    """Plain QAT of ``choices`` (one index per decision of the space: a multi-trial candidate) or, without them,
    of ``quant.uniform_format`` on every searched layer (also formats outside the space, e.g. bf16).

    ``init``: a saved model (``model.pt``) of the same network whose weights, BatchNorm statistics and calibrated
    ranges the training starts from (a pre-trained network); a resumed run's checkpoint replaces them."""

    def __init__(self, worker: WorkerContext, choices: Sequence[int] | None = None, init: str | None = None):
        super().__init__(worker)
        space, fmt = worker.net.space, worker.cfg.quant.uniform_format
        if choices is not None:
            choices = [int(c) for c in choices]
            self.assignment, self.decisions = space.assignment(choices), space.report(choices)
        else:
            self.assignment = space.uniform(fmt)
            self.decisions = [{"decision": "*", "choice": fmt, "probability": 1.0}]
        set_assignment(worker.net.layers, self.assignment)
        if init is not None:
            try:
                worker.net.model.load_state_dict(load_saved_state(init))
            except RuntimeError as err:  # another network's state
                raise BadInput(f"{init} does not fit this network: {str(err).strip().splitlines()[0]}") from None

    def step(self, model, optimizer, batch, step):
        return {"loss": train_step(model, optimizer, batch, self.worker.autocast)}

    def result(self) -> Result:
        net = self.worker.net
        return Result(net.model, net.layers, net.shapes, self.decisions)
