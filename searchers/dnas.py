"""DNAS (Wu et al., 2018: mixed-precision quantization of ConvNets via differentiable NAS).

Every candidate format is its own quantized path: a layer computes ``sum_k g_k * layer(Q_k(x), Q_k(w))``, K
conv/linear calls per layer, each keeping its own activations for the backward pass, so memory and compute grow
with the number of candidates. ``g`` is a Gumbel-softmax sample of the decision's logits, drawn once per training
forward (every layer of a decision sees the same sample), with a temperature annealed exponentially from
``tau0 = 5`` to ``tau_end = 0.5`` over ``total_steps``. Separate weight and activation decisions of a layer give
one path per (weight, activation) pair, weighted ``g_w[i] * g_a[j]`` (DNAS' edges are (w, a) bit pairs); a fixed
side is shared by all paths.

Loss = cross entropy + ``lam * E[GBOPs] / target`` with the expectation under ``softmax(alpha)`` (not under the
sample), as in DNAS. Outside a training step (no sample drawn) the paths are weighted by ``softmax(alpha)``.
"""

from __future__ import annotations

import itertools

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

    def __init__(self, *args, tau0: float = 5.0, tau_end: float = 0.5, hard: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        total_steps = self.total_steps
        if total_steps < 1 or not 0 < tau_end <= tau0:
            raise ValueError(f"need total_steps >= 1 and 0 < tau_end <= tau0 (got {total_steps}, {tau_end}, {tau0})")
        self.tau0, self.tau_end, self.hard = float(tau0), float(tau_end), hard
        self.sample: list[torch.Tensor] | None = None

    def temperature(self, step: int) -> float:
        """Exponential annealing: tau0 at step 0, tau_end at the last step (total_steps - 1) and after."""
        frac = min(1.0, max(0, step) / max(1, self.total_steps - 1))
        return self.tau0 * (self.tau_end / self.tau0) ** frac

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
            ws = self.candidates(m.w_decision, w, self.weight_amax(m))
            xs = self.candidates(m.a_decision, x, m.act_quant._amax(x))
            paths = [(g[k], xs[k], ws[k]) for k in range(len(ws))]
        else:
            if m.w_decision is None:
                w_side = [(None, m.weight_quant(w))]
            else:
                w_side = list(zip(self.mixture_weights(m.w_decision),
                                  self.candidates(m.w_decision, w, self.weight_amax(m)), strict=True))
            if m.a_decision is None:
                a_side = [(None, m.act_quant(x))]
            else:
                a_side = list(zip(self.mixture_weights(m.a_decision),
                                  self.candidates(m.a_decision, x, m.act_quant._amax(x)), strict=True))
            paths = [(gw if ga is None else ga if gw is None else gw * ga, xq, wq)
                     for (gw, wq), (ga, xq) in itertools.product(w_side, a_side)]
        out = None
        for coef, xq, wq in paths:
            term = coef * m.run(xq, wq)
            out = term if out is None else out + term
        return out
