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

import dataclasses
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from fliqs.analysis.plots import plot_policy_history
from fliqs.models.supernet import extract, format_architecture, get_architecture, set_architecture
from fliqs.quant.cost import measure_layers
from fliqs.quant.layers import quant_layers, set_assignment
from fliqs.run import schema
from fliqs.run.config import Extraction, Prior, to_dict
from fliqs.run.tracking import RunLogger
from fliqs.searchers.budget import extract_within_budget, target_prior
from fliqs.searchers.reinforce import expected_search_cost, fliqs_step, make_search
from fliqs.searchers.space import on_architecture, sample_cost
from fliqs.trainables.loop import recalibrate
from fliqs.trainables.worker import Result, TrainMethod, WorkerContext

VALIDATION_STREAM = 1  # the validation batches' random stream, apart from the sampling stream (0)


class OneShot(TrainMethod):
    def __init__(self, worker: WorkerContext):
        super().__init__(worker)
        cfg, net = worker.cfg, worker.net
        prior = target_prior(net.space, net.shapes, net.total_params, cfg.reward.cost, worker.target) \
            if cfg.budget.prior == Prior.target.value else None
        self.search = make_search(net.space, net.layers, net.shapes, net.total_params, total_steps=worker.total_steps,
                                  target=worker.target, cost_kind=cfg.reward.cost, reward_kind=cfg.reward.kind,
                                  beta=cfg.reward.beta, quality=cfg.reward.quality,
                                  controller_kwargs=dataclasses.asdict(cfg.controller), autocast=worker.autocast,
                                  tracking=cfg.budget.tracking, dual_scale=cfg.budget.dual_scale, prior=prior,
                                  set_architecture=partial(set_architecture, net.model))
        self.history: dict[str, list] = {"steps": [], "probs": []}  # the policy at every logged step
        self.generator: torch.Generator | None = None

    def step(self, model, optimizer, batch, step):
        if self.generator is None:  # after any restore: the streams are functions of (seed, rank, start step)
            self.generator = self.worker.generator(step)
            self.val_batches = self.worker.batches(self.worker.splits.val, step, VALIDATION_STREAM)
        return fliqs_step(model, self.search, optimizer, batch, self.val_batches.next(), step, self.generator,
                          self.worker.all_reduce_mean)

    def progress(self, means, step):
        cfg, net = self.worker.cfg, self.worker.net
        unit = "gbops" if cfg.reward.cost == "bops" else "mb"
        expected = expected_search_cost(self.search, net.shapes, net.total_params, cfg.reward.cost)
        probs = self.search.controller.policy.probs().detach()
        self.history["steps"].append(step)
        self.history["probs"].append([row[:n].tolist() for row, n in zip(probs, net.space.sizes, strict=True)])
        quality_key = schema.BATCH_VAL_ACCURACY if self.search.quality.value == "val_accuracy" else "quality"
        multiplier = {schema.COST_MULTIPLIER: means["cost_multiplier"]} if "cost_multiplier" in means else {}
        return {"train_loss": means["loss"], quality_key: means["quality"], "reward": means["reward"],
                "baseline": means["baseline"], "policy_entropy": means["entropy"],
                "entropy_weight": means["entropy_weight"], f"expected_{unit}": expected,
                f"sampled_{unit}": means["sampled_cost"], **multiplier}

    def on_checkpoint(self, logger: RunLogger | None) -> None:
        if logger is not None:
            self._log_policy_history(logger)

    def state_dict(self) -> dict:
        return {"controller": self.search.controller.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.search.controller.load_state_dict(state["controller"])
        self.history = state["history"]

    def _decisions(self) -> tuple[list[int], list[dict]]:
        """The final choices (the extraction of ``budget.extraction``) and their report rows; keeps the argmax's
        choices and both costs for `_budget_metrics`."""
        cfg, net = self.worker.cfg, self.worker.net
        policy = self.search.controller.policy
        log_probs = torch.log_softmax(policy.masked_logits().detach(), dim=-1)
        self.extraction = extract_within_budget(net.space, log_probs, net.shapes, net.total_params, cfg.reward.cost,
                                                self.worker.target, cfg.budget.extraction_floor,
                                                cfg.budget.extraction_candidates)
        self.validated: list[dict] = []
        if cfg.budget.extraction != Extraction.within.value:
            choices = self.extraction.argmax
        elif len(self.extraction.candidates) > 1:
            choices = self._validate(self.extraction.candidates, log_probs)
        else:
            choices = self.extraction.choices
        return choices, net.space.report(choices, policy.probs().detach().tolist())

    def _validate(self, candidates, log_probs: torch.Tensor) -> list[int]:
        """The candidate most accurate on the validation split with the shared weights, each evaluated as the result
        is (BatchNorm recalibrated) and the network restored after it; the earlier (more probable) on a tie."""
        net, space = self.worker.net, self.worker.net.space
        kept = {k: v.detach().clone() for k, v in net.model.state_dict().items()}
        for choices in candidates:
            architecture = space.architecture(choices)
            if architecture:
                set_architecture(net.model, architecture)
            set_assignment(net.layers, space.assignment(choices))
            recalibrate(net.model, self.worker)
            self.validated.append({"choices": list(choices), "assignment": space.assignment(choices),
                                   "log_prob": float(sum(log_probs[d, k] for d, k in enumerate(choices))),
                                   "cost": sample_cost(net.shapes, space.assignment(choices), architecture,
                                                       net.total_params, self.worker.cfg.reward.cost),
                                   schema.VALIDATION_ACCURACY: self.worker.accuracy(net.model, "val")})
            net.model.load_state_dict(kept)
        best = max(range(len(self.validated)), key=lambda i: (self.validated[i][schema.VALIDATION_ACCURACY], -i))
        self.validated[best]["chosen"] = True
        return list(candidates[best])

    def _budget_metrics(self) -> dict[str, float]:
        """The argmax's cost against the target, and whether the extraction fit the budget."""
        return {schema.ARGMAX_COST_RATIO: self.extraction.argmax_cost / self.worker.target,
                schema.EXTRACTED_WITHIN_BUDGET: float(self.extraction.within),
                schema.EXTRACTION_CANDIDATES: float(len(self.validated))}

    def _controller_metrics(self) -> dict[str, float]:
        """Final policy entropy, and the largest difference between this rank's logits and any other rank's (0)."""
        logits = self.search.controller.policy.logits.detach().clone()
        divergence = 0.0
        if self.worker.world > 1:
            gathered = [torch.empty_like(logits) for _ in range(self.worker.world)]
            dist.all_gather(gathered, logits)
            divergence = max(float((g - logits).abs().max()) for g in gathered)
        return {"final_entropy": self.search.controller.policy.entropy().detach().item(),
                "controller_divergence": divergence}

    def _alternatives(self, choices: list[int]) -> dict[str, dict]:
        """The argmax's assignment when the result is another one: the loop evaluates it beside the result."""
        argmax = self.extraction.argmax
        if argmax == choices:
            return {}
        _, assignment = on_architecture(self.worker.net.shapes, self.worker.net.space.assignment(argmax),
                                        self.worker.net.space.architecture(argmax))
        return {schema.ARGMAX: assignment}

    def result(self) -> Result:
        net = self.worker.net
        choices, decisions = self._decisions()
        set_assignment(net.layers, net.space.assignment(choices))
        return Result(net.model, net.layers, net.shapes, decisions,
                      {**self._controller_metrics(), **self._budget_metrics()}, self._alternatives(choices))

    def _log_policy_history(self, logger: RunLogger) -> None:
        """The per-decision format probabilities so far, as a JSON artifact (rewritten at every checkpoint)."""
        space = self.worker.net.space
        logger.json_artifact(schema.POLICY_HISTORY_FILE, {
            "decisions": [d.name for d in space.decisions], "candidates": [list(d.candidates) for d in space.decisions],
            **self.history})

    def artifacts(self, logger: RunLogger, result: Result) -> None:
        self._log_policy_history(logger)
        if self.validated:
            logger.json_artifact(schema.EXTRACTION_FILE, {"target": self.worker.target, "candidates": self.validated})
        space = self.worker.net.space
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_policy_history(self.history["steps"], self.history["probs"], [d.name for d in space.decisions],
                                      [list(d.candidates) for d in space.decisions],
                                      Path(tmp) / schema.POLICY_PLOT_FILE, self.search.controller.warmup_steps)
            logger.artifact(png)


class Fliqnas(OneShot):
    """FLIQS on a supernet; the result is the extracted standalone network."""

    def result(self) -> Result:
        worker, net = self.worker, self.worker.net
        choices, decisions = self._decisions()
        architecture = net.space.architecture(choices)
        _, assignment = on_architecture(net.shapes, net.space.assignment(choices), architecture)
        set_architecture(net.model, architecture)
        set_assignment(net.layers, assignment)  # the formats of the layers the architecture keeps
        self.architecture = format_architecture(get_architecture(net.model))
        model = extract(net.model)  # its BatchNorm statistics mix every sampled architecture: the loop recalibrates
        shapes = measure_layers(model, worker.splits.input_size, worker.splits.in_chans)
        return Result(model, quant_layers(model), shapes, decisions,
                      {**self._controller_metrics(), **self._budget_metrics(), "architecture": self.architecture},
                      self._alternatives(choices))

    def artifacts(self, logger: RunLogger, result: Result) -> None:
        super().artifacts(logger, result)
        cfg, info = self.worker.cfg, self.worker.splits.info
        logger.json_artifact(schema.ARCHITECTURE_FILE, {
            "architecture": self.architecture, "model": cfg.model.name, "model_kwargs": dict(cfg.model.kwargs),
            "input_size": info.input_size, "in_chans": info.in_chans, "num_classes": info.num_classes,
            "quant": to_dict(cfg.quant),
            "layers": [s.name for s in result.shapes], "gmacs": sum(s.macs for s in result.shapes) / 1e9})
