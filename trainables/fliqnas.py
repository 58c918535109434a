"""FLIQNAS on Ray Train: the FLIQS loop on a supernet, with architecture decisions in the same controller.

Training is `OneShotRun`'s (the space holds kernel/expansion decisions next to the format decisions, and the
step sets both). At the end the converged architecture is extracted as a standalone network (no supernet left)
with the shared weights, calibrated ranges and the final formats, and evaluated without retraining; its cost is
measured on the standalone model itself. The architecture and the standalone weights are MLflow artifacts.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fliqs.cost import measure_layers
from fliqs.layers import quant_layers, set_assignment
from fliqs.searchers.space import on_architecture
from fliqs.supernet import extract, format_architecture, get_architecture, set_architecture
from fliqs.tracking import RunLogger
from fliqs.trainables.oneshot import OneShotRun

ARCHITECTURE_FILE = "architecture.json"
STANDALONE_FILE = "standalone_state.pt"


class FliqnasRun(OneShotRun):
    method = "fliqnas"

    def setup(self) -> None:
        super().setup()
        self.supernet = self.model

    def _state(self) -> dict:
        # Every checkpoint holds the supernet, the final one (written after extraction) too: a rerun rebuilds the
        # supernet, restores it and extracts again.
        return {**super()._state(), "model": self.supernet.state_dict()}

    def final_assignment(self) -> tuple[dict, list[dict]]:
        """The formats of the layers the final architecture keeps (a skipped block's layers are gone)."""
        choices = self.final_choices()
        _, assignment = on_architecture(self.shapes, self.space.assignment(choices), self.space.architecture(choices))
        return assignment, self.decisions(choices)

    def finalize(self, assignment: dict) -> None:
        """Set the final architecture and formats, then replace the supernet by the standalone network."""
        set_architecture(self.model, self.space.architecture(self.final_choices()))
        set_assignment(self.layers, assignment)
        self.architecture = format_architecture(get_architecture(self.model))
        self.model = extract(self.model)
        self.layers = quant_layers(self.model)
        self.shapes = measure_layers(self.model, self.splits.input_size, self.splits.in_chans)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        if self.rank == 0:  # statistics and calibrated ranges are per replica: every rank takes rank 0's (saved)
            self.recalibrate_batchnorm(self.cfg.train.bn_recalibration_batches)
        if self.world > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        self.train_model = self._distributed(self.model)  # for the optional fine-tune

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: int) -> None:
        """Re-estimate BatchNorm statistics of the standalone network on training batches (no weight changes),
        as a cumulative average (``momentum=None``)."""
        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if batches <= 0 or not norms:
            return
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        self.model.train()
        for i, (x, _) in enumerate(self.loader):
            if i >= batches:
                break
            with self.autocast or nullcontext():
                self.model(x.to(self.device, non_blocking=True))
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum

    def final_metrics(self):
        return {**super().final_metrics(), "architecture": self.architecture}

    def final_artifacts(self, logger: RunLogger) -> None:
        super().final_artifacts(logger)
        model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
        logger.json_artifact(ARCHITECTURE_FILE, {
            "architecture": self.architecture, "model": model_cfg["name"], "model_kwargs": model_cfg["kwargs"],
            "input_size": self.splits.input_size, "in_chans": self.splits.in_chans,
            "num_classes": self.splits.num_classes, "quant": OmegaConf.to_container(self.cfg.quant, resolve=True,
                                                                                    enum_to_str=True),
            "layers": [s.name for s in self.shapes],
            "gmacs": sum(s.macs for s in self.shapes) / 1e9})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / STANDALONE_FILE
            torch.save(self.model.state_dict(), path)
            logger.artifact(path)


def load_standalone(architecture_json: str | Path, state_path: str | Path | None = None):
    """Rebuild the extracted network from its `architecture.json` (and weights from ``standalone_state.pt``).

    Returns ``(model, layers)``: the standalone model with quantized layers at the formats of the search result;
    formats come from the run's ``assignment.json`` next to the architecture file when it is there.
    """
    from fliqs.layers import quantize_model
    from fliqs.models import create_model

    info = json.loads(Path(architecture_json).read_text())
    supernet = create_model(info["model"], num_classes=info["num_classes"], in_chans=info["in_chans"],
                            **{**info["model_kwargs"], "arch": info["architecture"]})
    model = extract(supernet)
    quant = info["quant"]
    layers = quantize_model(model, default=quant["default_format"], pinned=quant["pinned"],
                            range_mode=quant["act_range"], exclude=quant["exclude"])
    assignment_file = Path(architecture_json).with_name("assignment.json")
    if assignment_file.is_file():
        set_assignment(layers, json.loads(assignment_file.read_text())["assignment"])
    if state_path is not None:
        model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return model, layers
