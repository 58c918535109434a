"""Sensitivity scores of every (decision, candidate format) on a trained network, and the integer program that picks
one format per decision under a cost budget: the family of HAWQ-V3, NVIDIA ModelOpt AutoQuantize, AIMET AMP.

A score estimates how much the mean training loss grows when one decision's targets (its layers' weights and/or
input activations) go from the *reference* to a candidate format, every other target staying at the reference: the
searched targets at full precision (fp32), pinned and fixed targets at their own format. Quantization is fliqs' own
(`fliqs.quant.layers.FormatQuantizer`: weights per output channel, activations per tensor, the run's clip policy and
activation ranges, evaluation mode). A decision's score is the sum over the layers it sets. Three kinds
(``sensitivity.score``); N is the number of scored samples, l_n the cross-entropy of sample n:

* ``hessian`` (HAWQ-V3: average Hessian trace x quantization perturbation, the second-order Taylor term with the
  Hessian replaced by Tr(H)/n times the identity), for the weights W and, where the decision sets them, the input
  activation X of each layer (as that layer sees it: other consumers of X, e.g. a residual, are not perturbed)::

      s_w(l, f) = 1/2 * [mean_b Tr(d^2 L_b / dW^2) / numel(W)] * ||Q_f(W) - W||^2        L_b: the batch's mean loss
      s_a(l, f) = 1/2 * sum_b [Tr(d^2 S_b / dX_b^2) / numel(X_b)] * ||Q_f(X_b) - X_b||^2 / N    S_b: its summed loss

  Both estimate the growth of the mean loss per sample. Traces are Hutchinson estimates, E[v^T H v] over
  ``sensitivity.hutchinson_samples`` Rademacher vectors v per batch (one joint v over all tensors, as PyHessian
  does: the cross-block terms have mean 0). HAWQ-V3 scores weights only and has no 1/2 (a constant: the argmin
  is the same); the activation term is fliqs' addition, so that a decision setting both sides is scored for both.
  A negative estimate (a non-convex direction, or noise) is clamped to 0.
* ``gradient`` (ModelOpt AutoQuantize, the Fisher-diagonal form on the layer's output Y)::

      s(l, f) = 1/2 * 1/N * sum_b sum_{n,i} (d l_n / d Y_{n,i})^2 * (Y_f - Y)_{n,i}^2

  with Y_f the layer's output with its targets at f (weights and activations together, so no separate activation
  term is needed). AutoQuantize sums (dL/dY)^2 (Y_f - Y)^2 over batches with L the batch's mean loss: the same up to
  a positive constant.
* ``kl``: the mean over samples of KL(p_ref || p_{d at f}) of the network's output distribution (float64), with only
  decision d at f (one forward per decision x candidate; no labels used).

A candidate equal to the reference on every target (fp32) scores exactly 0 with every kind.

The integer program that minimises the total score under the budget is `fliqs.searchers.program.solve`. The method
keeps it linear (`fliqs.searchers.program.linear_costs`): BOPs of a layer whose weights and activations one decision
sets are MACs x b^2, of a searched side against a fixed one MACs x b x b_fixed; model size is linear. Separate weight
and activation decisions make BOPs bilinear, refused by the method's registry check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fliqs.errors import BadInput
from fliqs.quant.layers import FormatQuantizer, QuantLayer
from fliqs.searchers.space import FORMAT, SearchSpace

REFERENCE_FORMAT = "fp32"  # what every searched target is at while the others are scored
KINDS = ("hessian", "gradient", "kl")
Batch = tuple[torch.Tensor, torch.Tensor]


# -- what a decision sets ------------------------------------------------------------------------------------------
def decision_layers(space: SearchSpace) -> list[list[tuple[str, frozenset[str]]]]:
    """Per decision, its layers in order with the roles ("w", "a") it sets on each."""
    out = []
    for decision in space.decisions:
        roles: dict[str, set[str]] = {}
        for layer, role in decision.targets:
            roles.setdefault(layer, set()).add(role)
        out.append([(layer, frozenset(r)) for layer, r in roles.items()])
    return out


def _formats(layer: QuantLayer, roles: frozenset[str], fmt: str) -> tuple[str, str]:
    return (fmt if "w" in roles else layer.w_format.name), (fmt if "a" in roles else layer.a_format.name)


@contextmanager
def at_reference(model: nn.Module, layers: Sequence[QuantLayer], space: SearchSpace):
    """``model`` in evaluation mode with every searched target at `REFERENCE_FORMAT`; formats and mode restored."""
    saved = [(layer.w_format, layer.a_format) for layer in layers]
    was_training = model.training
    by_name = {layer.name: layer for layer in layers}
    model.eval()
    try:
        for decision in space.decisions:
            for name, role in decision.targets:
                quantizer = by_name[name].weight_quant if role == "w" else by_name[name].act_quant
                quantizer.set_format(REFERENCE_FORMAT)
        yield
    finally:
        for layer, (w, a) in zip(layers, saved, strict=True):
            layer.set_formats(w, a)
        model.train(was_training)


@contextmanager
def formats_set(layer: QuantLayer, w: str, a: str):
    old = layer.w_format, layer.a_format
    layer.set_formats(w, a)
    try:
        yield
    finally:
        layer.set_formats(*old)


@torch.no_grad()
def perturbation(quantizer: FormatQuantizer, x: torch.Tensor, fmt: str) -> float:
    """||Q_fmt(x) - x||^2 with ``quantizer`` (its scaling, clip policy and range) switched to ``fmt`` for the call."""
    old = quantizer.format
    quantizer.set_format(fmt)
    try:
        x = x.detach()
        return float((quantizer(x) - x).double().square().sum())
    finally:
        quantizer.set_format(old)


@contextmanager
def captured(layers: Iterable[QuantLayer], inputs: bool = False, outputs: bool = False):
    """Record the input (made a leaf of this layer's path only: a clone, requiring grad) and/or the output (a clone
    handed on downstream, so later in-place operations cannot change it) of each layer's forward."""
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        if inputs:
            def pre(module, args, name=layer.name):
                x = args[0]
                x = x.clone() if x.requires_grad else x.detach().clone().requires_grad_(True)
                seen_in[name] = x
                return (x, *args[1:])
            hooks.append(layer.register_forward_pre_hook(pre))
        if outputs:
            def post(module, args, out, name=layer.name):
                seen_out[name] = out
                return out.clone()
            hooks.append(layer.register_forward_hook(post))
    try:
        yield seen_in, seen_out
    finally:
        for h in hooks:
            h.remove()


# -- Hutchinson ----------------------------------------------------------------------------------------------------
def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Entries +-1 with probability 1/2 each, shaped like ``like`` (drawn on the CPU generator, moved after)."""
    v = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (v.to(like.dtype) * 2 - 1).to(like.device)


def hutchinson_traces(loss: torch.Tensor, tensors: Sequence[torch.Tensor], samples: int,
                      generator: torch.Generator) -> torch.Tensor:
    """Hutchinson estimates of Tr(d^2 loss / dT^2) for each tensor T (the diagonal blocks of the Hessian), float64.

    ``loss`` must have been computed from ``tensors`` with a graph. Per sample one joint Rademacher vector v over all
    tensors and one Hessian-vector product Hv by double backward; block t's estimate is v_t . (Hv)_t, unbiased since
    the off-block terms v_t^T H_ts v_s (s != t) have mean 0.
    """
    grads = torch.autograd.grad(loss, list(tensors), create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # a constant gradient: H = 0 there
    total = torch.zeros(len(tensors), dtype=torch.float64)
    if not live:
        return total
    for _ in range(samples):
        vs = [rademacher(tensors[i], generator) for i in live]
        hvs = torch.autograd.grad([grads[i] for i in live], [tensors[i] for i in live], grad_outputs=vs,
                                  retain_graph=True, allow_unused=True)
        for i, v, hv in zip(live, vs, hvs, strict=True):
            if hv is not None:
                total[i] += float((v.double() * hv.double()).sum())
    return total / samples


# -- scores --------------------------------------------------------------------------------------------------------
def _layers_by_name(layers: Sequence[QuantLayer]) -> dict[str, QuantLayer]:
    return {layer.name: layer for layer in layers}


def _check_formats_only(space: SearchSpace) -> None:
    if any(d.kind != FORMAT for d in space.decisions):
        raise BadInput("sensitivity scores cover format decisions only; this space searches an architecture")


def hessian_scores(model: nn.Module, layers: Sequence[QuantLayer], space: SearchSpace, batches: Sequence[Batch],
                   samples: int, generator: torch.Generator) -> list[list[float]]:
    """HAWQ-V3 scores (module docstring), [decision][candidate]."""
    _check_formats_only(space)
    by_name, per_decision = _layers_by_name(layers), decision_layers(space)
    w_names = sorted({n for d in per_decision for n, roles in d if "w" in roles})
    a_names = sorted({n for d in per_decision for n, roles in d if "a" in roles})
    candidates = sorted({c for d in space.decisions for c in d.candidates})
    w_trace = dict.fromkeys(w_names, 0.0)
    a_term = {(n, c): 0.0 for n in a_names for c in candidates}  # sum_b Tr_b / numel * ||Q(X_b) - X_b||^2
    seen = 0
    with at_reference(model, layers, space):
        for x, y in batches:
            with captured([by_name[n] for n in a_names], inputs=True) as (inputs, _):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)  # the batch's mean loss
            tensors = [by_name[n].source_weight() for n in w_names] + [inputs[n] for n in a_names]
            traces = hutchinson_traces(loss, tensors, samples, generator)
            for i, n in enumerate(w_names):
                w_trace[n] += float(traces[i]) / len(batches)
            for i, n in enumerate(a_names):
                xb = inputs[n]
                per_element = float(traces[len(w_names) + i]) * len(y) / xb.numel()  # summed loss: x batch size
                for c in candidates:
                    a_term[n, c] += per_element * perturbation(by_name[n].act_quant, xb, c)
            seen += len(y)
        w_score = {(n, c): 0.5 * max(0.0, w_trace[n]) / by_name[n].source_weight().numel()
                   * perturbation(by_name[n].weight_quant, by_name[n].source_weight(), c)
                   for n in w_names for c in candidates}
    a_score = {k: 0.5 * max(0.0, v) / seen for k, v in a_term.items()}
    return [[sum(("w" in roles) * w_score.get((n, c), 0.0) + ("a" in roles) * a_score.get((n, c), 0.0)
                 for n, roles in layer_roles) for c in decision.candidates]
            for decision, layer_roles in zip(space.decisions, per_decision, strict=True)]


def gradient_scores(model: nn.Module, layers: Sequence[QuantLayer], space: SearchSpace,
                    batches: Sequence[Batch]) -> list[list[float]]:
    """ModelOpt AutoQuantize's gradient scores in their Fisher-diagonal form (module docstring)."""
    _check_formats_only(space)
    by_name, per_decision = _layers_by_name(layers), decision_layers(space)
    scored = sorted({n for d in per_decision for n, _ in d})
    totals = [[0.0] * len(d.candidates) for d in space.decisions]
    seen = 0
    with at_reference(model, layers, space):
        for x, y in batches:
            with captured([by_name[n] for n in scored], inputs=True, outputs=True) as (inputs, outputs):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")  # d l_n / d Y_n: per-sample gradients
            grads = dict(zip(scored, torch.autograd.grad(loss, [outputs[n] for n in scored], allow_unused=True),
                             strict=True))
            with torch.no_grad():
                for d, (decision, layer_roles) in enumerate(zip(space.decisions, per_decision, strict=True)):
                    for n, roles in layer_roles:
                        layer, g = by_name[n], grads[n]
                        if g is None:
                            continue
                        x_in = inputs[n].detach()
                        reference = layer(x_in)
                        g2 = g.double().square()
                        for k, c in enumerate(decision.candidates):
                            with formats_set(layer, *_formats(layer, roles, c)):
                                diff = layer(x_in).double() - reference.double()
                            totals[d][k] += float((g2 * diff.square()).sum())
            seen += len(y)
    return [[0.5 * v / seen for v in row] for row in totals]


def kl_scores(model: nn.Module, layers: Sequence[QuantLayer], space: SearchSpace,
              batches: Sequence[Batch]) -> list[list[float]]:
    """Mean KL(p_ref || p with one decision at the candidate) of the network's outputs, [decision][candidate]."""
    _check_formats_only(space)
    by_name, per_decision = _layers_by_name(layers), decision_layers(space)
    totals = [[0.0] * len(d.candidates) for d in space.decisions]
    seen = 0
    with at_reference(model, layers, space), torch.no_grad():
        for x, _ in batches:
            ref = F.log_softmax(model(x).double(), dim=-1)
            for d, (decision, layer_roles) in enumerate(zip(space.decisions, per_decision, strict=True)):
                for k, c in enumerate(decision.candidates):
                    saved = [(by_name[n], by_name[n].w_format, by_name[n].a_format) for n, _ in layer_roles]
                    try:
                        for n, roles in layer_roles:
                            by_name[n].set_formats(*_formats(by_name[n], roles, c))
                        logq = F.log_softmax(model(x).double(), dim=-1)
                    finally:
                        for layer, w, a in saved:
                            layer.set_formats(w, a)
                    totals[d][k] += float(F.kl_div(logq, ref, log_target=True, reduction="sum"))
            seen += len(x)
    return [[max(0.0, v) / seen for v in row] for row in totals]  # >= 0 but for rounding


def scores(kind: str, model: nn.Module, layers: Sequence[QuantLayer], space: SearchSpace, batches: Sequence[Batch],
           samples: int = 16, generator: torch.Generator | None = None) -> list[list[float]]:
    """The scores of ``kind`` (one of `KINDS`), [decision][candidate]."""
    kind = getattr(kind, "value", kind)
    if kind == "hessian":
        return hessian_scores(model, layers, space, batches, samples, generator or torch.Generator().manual_seed(0))
    if kind == "gradient":
        return gradient_scores(model, layers, space, batches)
    if kind == "kl":
        return kl_scores(model, layers, space, batches)
    raise BadInput(f"unknown score kind {kind!r}; valid: {', '.join(KINDS)}")
