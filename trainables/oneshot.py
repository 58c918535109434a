"""One-shot FLIQS and FLIQNAS in the shared loop: one shared network, a format (and for FLIQNAS an architecture)
sampled per replica at every step.

Each worker samples its own assignment per step (as TuNAS does per replica). Shared weights are all-reduced by
DDP; the policy gradient and the reward fed to the baseline are all-reduced by the controller, so the controller
stays identical on every rank (`OneShot.result` reports the largest difference, which must be 0).

FLIQNAS: the space holds kernel/expansion decisions next to the format decisions and the step sets both. At the
end the converged architecture is extracted as a standalone network (no supernet left) with the shared weights,
calibrated ranges and the final formats, and evaluated without retraining; its cost is measured on the standalone
model itself. ``architecture.json`` describes it; the loop saves it as ``model.pt`` (`fliqs.trainables.saved`
rebuilds it) while its checkpoints keep the supernet, so a rerun after the extraction resumes and extracts the same
network again.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fliqs import schema
from fliqs.cost import measure_layers
from fliqs.layers import quant_layers, set_assignment
from fliqs.plots import plot_policy_history
from fliqs.searchers.fliqs import expected_search_cost, fliqs_step, make_search
from fliqs.searchers.space import on_architecture
from fliqs.supernet import extract, format_architecture, get_architecture, set_architecture
from fliqs.tracking import RunLogger
from fliqs.trainables.loop import Result, TrainMethod, WorkerContext

VALIDATION_STREAM = 1  # the validation batches' random stream, apart from the sampling stream (0)


class OneShot(TrainMethod):
    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        cfg, net = ctx.cfg, ctx.net
        self.search = make_search(net.space, net.layers, net.shapes, net.total_params, total_steps=ctx.total_steps,
                                  target=ctx.target, cost_kind=cfg.reward.cost, reward_kind=cfg.reward.kind,
                                  beta=cfg.reward.beta, quality=cfg.reward.quality,
                                  controller_kwargs=dict(cfg.controller), autocast=ctx.autocast,
                                  set_architecture=partial(set_architecture, net.model))
        self.history: dict[str, list] = {"steps": [], "probs": []}  # the policy at every logged step
        self.generator: torch.Generator | None = None

    def step(self, model, optimizer, batch, step):
        if self.generator is None:  # after any restore: the streams are functions of (seed, rank, start step)
            self.generator = self.ctx.generator(step)
            self.val_batches = self.ctx.batches(self.ctx.splits.val, step, VALIDATION_STREAM)
        return fliqs_step(model, self.search, optimizer, batch, self.val_batches.next(), step, self.generator,
                          self.ctx.all_reduce_mean)

    def progress(self, means, step):
        cfg, net = self.ctx.cfg, self.ctx.net
        unit = "gbops" if cfg.reward.cost == "bops" else "mb"
        expected = expected_search_cost(self.search, net.shapes, net.total_params, cfg.reward.cost)
        probs = self.search.controller.policy.probs().detach()
        self.history["steps"].append(step)
        self.history["probs"].append([row[:n].tolist() for row, n in zip(probs, net.space.sizes, strict=True)])
        quality_key = "val_accuracy" if self.search.quality.value == "val_accuracy" else "quality"
        return {"train_loss": means["loss"], quality_key: means["quality"], "reward": means["reward"],
                "baseline": means["baseline"], "policy_entropy": means["entropy"],
                "entropy_weight": means["entropy_weight"], f"expected_{unit}": expected,
                f"sampled_{unit}": means["sampled_cost"]}

    def on_checkpoint(self, logger: RunLogger | None) -> None:
        if logger is not None:
            self._log_policy_history(logger)

    def state_dict(self) -> dict:
        return {"controller": self.search.controller.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.search.controller.load_state_dict(state["controller"])
        self.history = state["history"]

    def _decisions(self) -> tuple[list[int], list[dict]]:
        choices = self.search.final_choices()
        return choices, self.ctx.net.space.report(choices, self.search.controller.policy.probs().detach().tolist())

    def _controller_metrics(self) -> dict[str, float]:
        """Final policy entropy, and the largest difference between this rank's logits and any other rank's (0)."""
        logits = self.search.controller.policy.logits.detach().clone()
        divergence = 0.0
        if self.ctx.world > 1:
            gathered = [torch.empty_like(logits) for _ in range(self.ctx.world)]
            dist.all_gather(gathered, logits)
            divergence = max(float((g - logits).abs().max()) for g in gathered)
        return {"final_entropy": self.search.controller.policy.entropy().detach().item(),
                "controller_divergence": divergence}

    def result(self) -> Result:
        net = self.ctx.net
        choices, decisions = self._decisions()
        set_assignment(net.layers, net.space.assignment(choices))
        return Result(net.model, net.layers, net.shapes, decisions, self._controller_metrics())

    def _log_policy_history(self, logger: RunLogger) -> None:
        """The per-decision format probabilities so far, as a JSON artifact (rewritten at every checkpoint)."""
        space = self.ctx.net.space
        logger.json_artifact(schema.POLICY_HISTORY_FILE, {
            "decisions": [d.name for d in space.decisions], "candidates": [list(d.candidates) for d in space.decisions],
            **self.history})

    def artifacts(self, logger: RunLogger, result: Result) -> None:
        self._log_policy_history(logger)
        space = self.ctx.net.space
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_policy_history(self.history["steps"], self.history["probs"], [d.name for d in space.decisions],
                                      [list(d.candidates) for d in space.decisions],
                                      Path(tmp) / schema.POLICY_PLOT_FILE, self.search.controller.warmup_steps)
            logger.artifact(png)


class Fliqnas(OneShot):
    """FLIQS on a supernet; the result is the extracted standalone network."""

    def result(self) -> Result:
        ctx, net = self.ctx, self.ctx.net
        choices, decisions = self._decisions()
        architecture = net.space.architecture(choices)
        _, assignment = on_architecture(net.shapes, net.space.assignment(choices), architecture)
        set_architecture(net.model, architecture)
        set_assignment(net.layers, assignment)  # the formats of the layers the architecture keeps
        self.architecture = format_architecture(get_architecture(net.model))
        model = extract(net.model)  # its BatchNorm statistics mix every sampled architecture: the loop recalibrates
        shapes = measure_layers(model, ctx.splits.input_size, ctx.splits.in_chans)
        return Result(model, quant_layers(model), shapes, decisions,
                      {**self._controller_metrics(), "architecture": self.architecture})

    def artifacts(self, logger: RunLogger, result: Result) -> None:
        super().artifacts(logger, result)
        cfg, info = self.ctx.cfg, self.ctx.splits.info
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        logger.json_artifact(schema.ARCHITECTURE_FILE, {
            "architecture": self.architecture, "model": model_cfg["name"], "model_kwargs": model_cfg["kwargs"],
            "input_size": info.input_size, "in_chans": info.in_chans, "num_classes": info.num_classes,
            "quant": OmegaConf.to_container(cfg.quant, resolve=True, enum_to_str=True),
            "layers": [s.name for s in result.shapes], "gmacs": sum(s.macs for s in result.shapes) / 1e9})
