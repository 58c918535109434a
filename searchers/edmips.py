"""EdMIPS (Cai & Vasconcelos, CVPR 2020): efficient differentiable mixed-precision search.

Per decision, ``p = softmax(alpha)`` over the candidate formats. A layer keeps ONE weight; its composite weight
is ``sum_k p_k * Q_k(w)`` and its composite input ``sum_k p_k * Q_k(x)`` (each ``Q_k`` a straight-through fake
quantization into candidate k), and the layer runs ONE conv/linear on the two. A decision that sets both the
weights and the activations of a layer uses the same ``p`` on both sides. Memory grows with the number of
candidates only by the K quantized copies of each weight and input kept for the gradient of ``p``.

Loss = cross entropy + ``lam * E[GBOPs] / target`` (the complexity loss, expected under ``p``). The logits are
trained with Adam, the weights with the caller's optimizer (SGD), jointly on the same batch. At the end the
argmax format per decision is kept (`EdMIPSSearch.apply_final`); EdMIPS then retrains, which is left to the
caller.
"""

from __future__ import annotations

import torch

from fliqs.quant.layers import FormatQuantizer
from fliqs.searchers.relaxed import MixedQuantLayer, RelaxedSearch


class EdMIPSSearch(RelaxedSearch):
    method = "edmips"

    def mix(self, decision: int, x: torch.Tensor, quantizer: FormatQuantizer) -> torch.Tensor:
        """``sum_k p_k * Q_k(x)``."""
        p = self.mixture_weights(decision)
        out = None
        for k, q in enumerate(self.candidates(decision, x, quantizer)):
            term = p[k] * q
            out = term if out is None else out + term
        return out

    def layer_forward(self, m: MixedQuantLayer, x: torch.Tensor) -> torch.Tensor:
        w = m.source_weight()
        weight = m.weight_quant(w) if m.w_decision is None else self.mix(m.w_decision, w, m.weight_quant)
        xq = m.act_quant(x) if m.a_decision is None else self.mix(m.a_decision, x, m.act_quant)
        return m.run(xq, weight)
