"""DNAS (Wu et al., 2018: mixed-precision quantization of ConvNets via differentiable NAS).

Every candidate format is its own quantized path: a layer computes ``sum_k g_k * layer(Q_k(x), Q_k(w))``, K
conv/linear calls per layer, each keeping its own activations for the backward pass, so memory and compute grow
with the number of candidates. ``g`` is a Gumbel-softmax sample of the decision's logits, drawn once per training
forward (every layer of a decision sees the same sample), at temperature ``5 * exp(-0.065 * epoch)`` (the
paper's). Separate weight and activation decisions of a layer give one path per (weight, activation) pair,
weighted ``g_w[i] * g_a[j]`` (DNAS' edges are (w, a) bit pairs); a fixed side is shared by all paths.

The protocol (Wu et al. 2018): the logits minimise ``CE * beta * log(cost)^gamma`` with the cost under the Gumbel
sample (`DNASSearch.objective`), on a held-out part of the training split (``relaxed.arch_fraction``, 20 %) while
the weights train on the rest, after ``relaxed.arch_warmup_epochs`` of weights alone; the argmax is then retrained.
Outside a training step (no sample drawn) the paths are weighted by ``softmax(alpha)``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from fliqs.searchers.relaxed import MixedQuantLayer, RelaxedSearch


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None,
                   hard: bool = False) -> torch.Tensor:
    """``softmax((logits + G) / tau)`` with G ~ Gumbel(0, 1) drawn from ``generator`` (CPU); ``hard``: the exact
    one-hot of its argmax in the forward, the soft sample's gradient in the backward."""
    gumbel = -torch.empty(logits.shape, dtype=logits.dtype).exponential_(generator=generator).log()
    soft = torch.softmax((logits + gumbel.to(logits.device)) / tau, -1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.detach().argmax(-1), soft.shape[-1]).to(soft.dtype)
    return one_hot + (soft - soft.detach())  # value exactly one-hot


class DNASSearch(RelaxedSearch):
    method = "dnas"

    @classmethod
    def options(cls, cfg, steps_per_epoch: int) -> dict:
        r = cfg.relaxed
        return dict(tau0=r.tau0, tau_decay=r.tau_decay, steps_per_epoch=steps_per_epoch, beta=r.dnas_beta,
                    gamma=r.dnas_gamma)

    @classmethod
    def arch_fraction(cls, cfg) -> float | None:
        return cfg.relaxed.arch_fraction  # the logits on 20 %, the weights on the rest (the paper's split)

    @classmethod
    def arch_warmup_epochs(cls, cfg) -> int:
        return cfg.relaxed.arch_warmup_epochs  # resolved at load: the paper's 10, or half a shorter run

    def __init__(self, *args, tau0: float = 5.0, tau_decay: float = 0.065, steps_per_epoch: int = 1,
                 beta: float = 0.2, gamma: float = 0.6, hard: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if steps_per_epoch < 1 or tau0 <= 0 or tau_decay < 0 or beta <= 0 or gamma <= 0:
            raise ValueError(f"need steps_per_epoch >= 1, tau0 > 0, tau_decay >= 0, beta > 0, gamma > 0 (got "
                             f"{steps_per_epoch}, {tau0}, {tau_decay}, {beta}, {gamma})")
        self.tau0, self.tau_decay, self.steps_per_epoch = float(tau0), float(tau_decay), int(steps_per_epoch)
        self.beta, self.gamma, self.hard = float(beta), float(gamma), hard
        self.sample: list[torch.Tensor] | None = None

    def temperature(self, step: int) -> float:
        """DNAS' schedule: ``tau0 * exp(-tau_decay * epoch)``, the epoch fractional (``step / steps_per_epoch``)."""
        return self.tau0 * math.exp(-self.tau_decay * max(0, step) / self.steps_per_epoch)

    def sample_gbops(self) -> torch.Tensor:
        """The cost under the step's Gumbel sample (the mask of the forward), differentiable in the logits."""
        return self.expected_gbops(self.sample) if self.sample is not None else self.expected_gbops()

    def objective(self, task: torch.Tensor, gbops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DNAS' ``CE * beta * log(cost)^gamma``. The paper sets no target; here the cost is in units of the target
        divided by e, so ``log`` is 1 at the target and the loss trades 1 % of cost for ``gamma`` % of cross
        entropy there; below target / e (log clamped at 0.01) nothing pushes the cost further down."""
        log_cost = torch.log(math.e * gbops / self.target).clamp_min(0.01)
        loss = task * self.beta * log_cost ** self.gamma
        return loss, loss - task.detach()

    def draw(self, tau: float, generator: torch.Generator | None = None,
             hard: bool | None = None) -> list[torch.Tensor]:
        """Draw (and use in the following forwards) one Gumbel-softmax sample per decision."""
        hard = self.hard if hard is None else hard
        self.sample = [gumbel_softmax(a, tau, generator, hard) for a in self.alphas]
        return self.sample

    def mixture_weights(self, decision: int) -> torch.Tensor:
        if self.sample is not None:
            return self.sample[decision]
        return super().mixture_weights(decision)

    def begin_step(self, step: int, generator: torch.Generator | None = None) -> dict[str, float]:
        tau = self.temperature(step)
        self.draw(tau, generator)
        return {"temperature": tau}

    def end_step(self) -> None:
        self.sample = None

    def layer_forward(self, m: MixedQuantLayer, x: torch.Tensor) -> torch.Tensor:
        w = m.source_weight()
        if m.shared:  # one decision sets both sides: K paths, candidate k on weights and activations
            g = self.mixture_weights(m.w_decision)
            ws = self.candidates(m.w_decision, w, m.weight_quant)
            xs = self.candidates(m.a_decision, x, m.act_quant)
            paths = [(g[k], xs[k], ws[k]) for k in range(len(ws))]
        else:
            if m.w_decision is None:
                w_side = [(None, m.weight_quant(w))]
            else:
                w_side = list(zip(self.mixture_weights(m.w_decision),
                                  self.candidates(m.w_decision, w, m.weight_quant), strict=True))
            if m.a_decision is None:
                a_side = [(None, m.act_quant(x))]
            else:
                a_side = list(zip(self.mixture_weights(m.a_decision),
                                  self.candidates(m.a_decision, x, m.act_quant), strict=True))
            paths = [(gw if ga is None else ga if gw is None else gw * ga, xq, wq)
                     for (gw, wq), (ga, xq) in itertools.product(w_side, a_side)]
        out = None
        for coef, xq, wq in paths:
            term = coef * m.run(xq, wq)
            out = term if out is None else out + term
        return out
