"""One-shot FLIQS on Ray Train: one shared network, a format sampled per layer and per replica at every step.

Each worker samples its own assignment per step (as TuNAS does per replica). Shared weights are all-reduced by
DDP; the policy gradient and the reward fed to the baseline are all-reduced by the controller, so the controller
stays identical on every rank (`OneShotRun.final_metrics` reports the largest difference, which must be 0).
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from fliqs.plots import plot_policy_history
from fliqs.searchers.fliqs import expected_search_cost, fliqs_step, make_search
from fliqs.supernet import set_architecture
from fliqs.tracking import RunLogger
from fliqs.trainables.loop import Batches, TrainRun


class OneShotRun(TrainRun):
    method = "fliqs"

    def setup(self) -> None:
        cfg = self.cfg
        self.search = make_search(self.space, self.layers, self.shapes, self.total_params,
                                  total_steps=self.total_steps, target=self.target, cost_kind=cfg.reward.cost,
                                  reward_kind=cfg.reward.kind, beta=cfg.reward.beta, quality=cfg.reward.quality,
                                  controller_kwargs=dict(cfg.controller), autocast=self.autocast,
                                  set_architecture=partial(set_architecture, self.model))
        self.generator = None

    def method_state(self) -> dict:
        return {"controller": self.search.controller.state_dict()}

    def load_method_state(self, state: dict) -> None:
        self.search.controller.load_state_dict(state["controller"])

    def train_step(self, batch):
        if self.generator is None:  # after any restore: the stream is a function of (seed, rank, start step)
            self.generator = torch.Generator().manual_seed(hash((self.cfg.seed, self.rank, self.step)) % (2**63))
            self.val_batches = Batches(self.splits.val, self.cfg.data.batch_size,
                                       self.cfg.seed + 1000 * self.rank + self.step, self.device)
        return fliqs_step(self.train_model, self.search, self.optimizer, batch, self.val_batches.next(), self.step,
                          self.generator, self.reduce)

    def progress_metrics(self, mean):
        unit = "gbops" if self.cfg.reward.cost == "bops" else "mb"
        expected = expected_search_cost(self.search, self.shapes, self.total_params, self.cfg.reward.cost)
        probs = self.search.controller.policy.probs().detach()
        self.history["steps"].append(self.step)
        self.history["probs"].append([row[:n].tolist() for row, n in zip(probs, self.space.sizes, strict=True)])
        quality_key = "val_accuracy" if self.search.quality.value == "val_accuracy" else "quality"
        return {"train_loss": mean["loss"], quality_key: mean["quality"], "reward": mean["reward"],
                "baseline": mean["baseline"], "policy_entropy": mean["entropy"],
                "entropy_weight": mean["entropy_weight"], f"expected_{unit}": expected,
                f"sampled_{unit}": mean["sampled_cost"]}

    def checkpoint_logged(self) -> None:
        self._log_policy_history()

    def _log_policy_history(self) -> tuple[list[str], list[list[str]]]:
        """The per-decision format probabilities so far, as a JSON artifact (rewritten at every checkpoint)."""
        names = [d.name for d in self.space.decisions]
        cands = [list(d.candidates) for d in self.space.decisions]
        if self.logger is not None:
            self.logger.json_artifact("policy_history.json", {"decisions": names, "candidates": cands,
                                                              **self.history})
        return names, cands

    def final_choices(self) -> list[int]:
        return self.search.final_choices()

    def decisions(self, choices):
        probs = self.search.controller.policy.probs().detach()
        return [{"decision": d.name, "choice": d.candidates[c], "probability": float(probs[i, c]),
                 "probs": dict(zip(d.candidates, probs[i, :len(d.candidates)].tolist(), strict=True))}
                for i, (d, c) in enumerate(zip(self.space.decisions, choices, strict=True))]

    def final_metrics(self):
        return {"final_entropy": self.search.controller.policy.entropy().detach().item(),
                "controller_divergence": self.controller_divergence()}

    def controller_divergence(self) -> float:
        """Largest difference between this rank's policy logits and any other rank's (must be 0)."""
        if self.world == 1:
            return 0.0
        logits = self.search.controller.policy.logits.detach().clone()
        gathered = [torch.empty_like(logits) for _ in range(self.world)]
        dist.all_gather(gathered, logits)
        return max(float((g - logits).abs().max()) for g in gathered)

    def final_artifacts(self, logger: RunLogger) -> None:
        names, cands = self._log_policy_history()
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_policy_history(self.history["steps"], self.history["probs"], names, cands,
                                      Path(tmp) / "policy_probs.png", self.search.controller.warmup_steps)
            logger.artifact(png)

