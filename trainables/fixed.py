"""Quantization-aware training of one fixed assignment: the uniform baselines and every multi-trial candidate."""

from __future__ import annotations

from fliqs.layers import set_assignment
from fliqs.trainables.loop import TrainRun, qat_step


class FixedRun(TrainRun):
    """Trains one assignment with plain QAT: ``config["choices"]`` (one index per decision of the space) or
    ``config["uniform"]`` (one format for every searched layer, also formats outside the space, e.g. bf16)."""

    method = "fixed"

    def __init__(self, config: dict, session):
        self.choices = [int(c) for c in config["choices"]] if config.get("choices") is not None else None
        self.uniform = config.get("uniform")
        super().__init__(config, session)

    def setup(self) -> None:
        if self.choices is not None and len(self.choices) != len(self.space.decisions):
            raise ValueError(f"{len(self.choices)} choices for {len(self.space.decisions)} decisions")
        set_assignment(self.layers, self.final_assignment()[0])

    def train_step(self, batch):
        return {"loss": qat_step(self.train_model, self.optimizer, batch, self.autocast)}

    def final_assignment(self) -> tuple[dict, list[dict]]:
        if self.uniform is not None:
            return self.space.uniform(self.uniform), [{"decision": "*", "choice": self.uniform, "probability": 1.0}]
        return self.space.assignment(self.choices), self.decisions(self.choices)

