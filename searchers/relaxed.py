"""Differentiable ("relaxed") mixed-precision search: what the DNAS and EdMIPS baselines share.

A `RelaxedSearch` holds one vector of architecture logits per decision of a `SearchSpace` (``alphas``, zero
init: uniform) and, once `RelaxedSearch.install`-ed on a model, turns each searched `QuantLayer` into a *mixture*
over its candidate formats. The mixture itself is the method's (`fliqs.searchers.edmips`: one conv on a mixed
weight and a mixed activation; `fliqs.searchers.dnas`: one conv per candidate, Gumbel-weighted).

How the mixture is installed: each searched QuantLayer is swapped, in place in the model, for a `MixedQuantLayer`
that *shares* its submodules (the wrapped conv/linear and both quantizers) and whose forward is the search's. The
module tree, the parameter objects and the ``state_dict`` keys are unchanged, ``QuantLayer.forward`` is untouched,
and the architecture logits stay out of ``model.parameters()`` (they are ``search.parameters()``: give them their
own optimizer, and all-reduce their gradients yourself under DDP, see ``allreduce_mean``). `RelaxedSearch.remove`
swaps the original QuantLayers back; `RelaxedSearch.apply_final` does that and sets the argmax assignment.

Expected cost (`RelaxedSearch.expected_gbops`) follows `fliqs.searchers.space.expected_cost`: BOPs are bilinear in
weight and activation bits, so a decision setting both contributes E[bits**2] and two separate decisions
E[w_bits] * E[a_bits]; unsearched layers and attention matmuls are constants. It is vectorised (a few tensor ops
per step whatever the number of layers) and differentiable in the probabilities.

A step (`relaxed_step`, wrapped by ``edmips_step`` and ``dnas_step``) minimises
``cross_entropy + lam * E[GBOPs] / target``, jointly on one batch (EdMIPS), or alternating weights on ``batch`` and
logits on ``arch_batch`` (DNAS' original split). `run_differentiable` is a small in-process driver.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fliqs.cost import LayerShape, summarize
from fliqs.errors import BadInput
from fliqs.fakequant import FORMAT_TENSOR_SIZE, fake_quantize, format_tensor
from fliqs.formats import FULL_PRECISION, get_format
from fliqs.layers import QuantLayer, set_assignment
from fliqs.searchers.space import SearchSpace

AllReduce = Callable[[torch.Tensor], torch.Tensor]

METHODS = ("edmips", "dnas")


class MixedQuantLayer(QuantLayer):
    """Stands in for a searched `QuantLayer` while a `RelaxedSearch` is installed.

    It shares the QuantLayer's submodules (``layer``, ``weight_quant``, ``act_quant``): same parameters, same
    ``state_dict`` keys. ``w_decision`` / ``a_decision`` index the space's decisions (None: that side keeps the
    quantizer's own fixed format). The search is held outside the module tree.
    """

    def __init__(self, base: QuantLayer, search: RelaxedSearch, w_decision: int | None, a_decision: int | None):
        nn.Module.__init__(self)
        self.layer = base.layer
        self.weight_quant = base.weight_quant
        self.act_quant = base.act_quant
        self.name = base.name
        self.pinned = base.pinned
        self.training = base.training
        self.w_decision = w_decision
        self.a_decision = a_decision
        # Plain attributes, not submodules: the logits must not join model.parameters().
        object.__setattr__(self, "search", search)
        object.__setattr__(self, "base", base)

    @property
    def shared(self) -> bool:
        return self.w_decision is not None and self.w_decision == self.a_decision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.search.layer_forward(self, x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, {self.search.method}, w_decision={self.w_decision}, a_decision={self.a_decision}"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class RelaxedSearch(nn.Module):
    """Architecture logits over a `SearchSpace` and the mixture forward of its layers (subclasses: the method).

    ``target`` is the cost target in GBOPs and ``lam`` the weight of the cost term ``lam * E[GBOPs] / target``.
    """

    method = "relaxed"

    def __init__(self, space: SearchSpace, layers: Sequence[QuantLayer], shapes: Sequence[LayerShape], *,
                 target: float, lam: float = 0.1, autocast: torch.autocast | None = None):
        super().__init__()
        if not target > 0:
            raise BadInput(f"the cost target must be positive GBOPs, got {target}")
        self.space = space
        self.target = float(target)
        self.lam = float(lam)
        self.autocast = autocast
        self.sizes = list(space.sizes)
        self.alphas = nn.ParameterList(nn.Parameter(torch.zeros(k)) for k in self.sizes)

        kmax = max(self.sizes)
        formats = format_tensor(FULL_PRECISION).repeat(len(self.sizes), kmax, 1)  # padding: never used
        bits = torch.zeros(len(self.sizes), kmax, dtype=torch.float64)
        for i, decision in enumerate(space.decisions):
            for k, cand in enumerate(decision.candidates):
                formats[i, k] = format_tensor(cand)
                bits[i, k] = get_format(cand).bits
        assert formats.shape[-1] == FORMAT_TENSOR_SIZE
        self.register_buffer("formats", formats, persistent=False)  # [D, K, 4]: one format_tensor per candidate
        self.register_buffer("bits", bits, persistent=False)  # [D, K], 0 where a decision has fewer candidates

        self.layers = list(layers)  # a list, not a ModuleList: the model owns them
        by_name = {layer.name: layer for layer in self.layers}
        self.roles: dict[str, dict[str, int]] = {}  # layer -> {"w": decision, "a": decision}
        for i, decision in enumerate(space.decisions):
            for layer, role in decision.targets:
                if layer not in by_name:
                    raise BadInput(f"decision {decision.name!r} targets {layer!r}, which is not a quantized layer")
                if by_name[layer].pinned:
                    raise BadInput(f"decision {decision.name!r} targets pinned layer {layer!r}; build the space "
                                   f"with the same pinned patterns as the model")
                self.roles.setdefault(layer, {})[role] = i
        self._build_cost(shapes)
        self._installed: list[tuple[nn.Module, str, QuantLayer, MixedQuantLayer]] = []

    # -- cost -------------------------------------------------------------------------------------------------
    def _build_cost(self, shapes: Sequence[LayerShape]) -> None:
        """Coefficients of E[GBOPs] = const + s2 . E[b^2] + s1 . E[b] + E[b]^T C E[b] (b: bits per decision)."""
        d = len(self.sizes)
        spec: dict[str, dict[str, int | float]] = {}  # int: a decision; float: fixed bits
        for layer, fmts in self.space.fixed.items():
            for role, fmt in fmts.items():
                spec.setdefault(layer, {})[role] = float(get_format(fmt).bits)
        for layer, roles in self.roles.items():
            spec.setdefault(layer, {}).update(roles)
        const, s1, s2 = 0.0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        pair = torch.zeros(d, d, dtype=torch.float64)
        for shape in shapes:
            if shape.kind == "attn_matmul" or shape.name not in spec:  # not searched: full precision (as summarize)
                const += summarize([shape]).gbops
                continue
            gmacs = shape.macs / 1e9
            w, a = spec[shape.name]["w"], spec[shape.name]["a"]
            if isinstance(w, int) and isinstance(a, int):
                if w == a:
                    s2[w] += gmacs
                else:
                    pair[w, a] += gmacs
            elif isinstance(w, int):
                s1[w] += gmacs * a
            elif isinstance(a, int):
                s1[a] += gmacs * w
            else:
                const += gmacs * w * a
        self.cost_const = const
        self.register_buffer("cost_s1", s1, persistent=False)
        self.register_buffer("cost_s2", s2, persistent=False)
        self.register_buffer("cost_pair", pair, persistent=False)

    def _stack(self, probs) -> torch.Tensor:
        """[D, K] float64 from a [D, K] tensor or one vector (tensor or list) per decision, zero-padded."""
        if isinstance(probs, torch.Tensor) and probs.dim() == 2:
            return probs.to(device=self.bits.device, dtype=torch.float64)
        kmax = self.bits.shape[1]
        rows = [torch.as_tensor(p, device=self.bits.device).to(torch.float64) for p in probs]
        if len(rows) != len(self.sizes):
            raise ValueError(f"expected probabilities for {len(self.sizes)} decisions, got {len(rows)}")
        return torch.stack([F.pad(r, (0, kmax - r.numel())) for r in rows])

    def expected_gbops(self, probs=None) -> torch.Tensor:
        """E[GBOPs] under independent per-decision probabilities (default: softmax of the logits); differentiable."""
        p = self._stack(self.probs() if probs is None else probs)
        m1 = (p * self.bits).sum(-1)
        m2 = (p * self.bits.square()).sum(-1)
        total = self.cost_const + (self.cost_s2 * m2).sum() + (self.cost_s1 * m1).sum() + m1 @ self.cost_pair @ m1
        return total.to(torch.float32)

    # -- the distribution -------------------------------------------------------------------------------------
    def probs(self) -> list[torch.Tensor]:
        return [torch.softmax(a, -1) for a in self.alphas]

    def entropy(self) -> torch.Tensor:
        """Mean entropy per decision (nats) of softmax(alphas)."""
        return torch.stack([-(torch.softmax(a, -1) * torch.log_softmax(a, -1)).sum() for a in self.alphas]).mean()

    def final_choices(self) -> list[int]:
        return [int(a.detach().argmax()) for a in self.alphas]

    def mixture_weights(self, decision: int) -> torch.Tensor:
        """The weights of decision ``decision``'s candidates in the current forward (default: softmax)."""
        return torch.softmax(self.alphas[decision], -1)

    def begin_step(self, step: int, generator: torch.Generator | None = None) -> dict[str, float]:
        """Called before each training forward (DNAS samples here); returns extra stats to log."""
        return {}

    def end_step(self) -> None:
        """Called after each training forward."""

    # -- quantized candidates and the layer forward -----------------------------------------------------------
    def candidates(self, decision: int, x: torch.Tensor, amax: torch.Tensor) -> list[torch.Tensor]:
        """``x`` fake-quantized (straight-through) into every candidate format of ``decision``."""
        fmts = self.formats[decision]
        return [fake_quantize(x, amax, fmts[k]) for k in range(self.sizes[decision])]

    @staticmethod
    def weight_amax(m: QuantLayer) -> torch.Tensor:
        return m.weight_quant._amax(m.source_weight())

    def layer_forward(self, m: MixedQuantLayer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- installation -----------------------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return bool(self._installed)

    def install(self, model: nn.Module) -> RelaxedSearch:
        """Swap every searched QuantLayer of ``model`` for a `MixedQuantLayer` (call before wrapping in DDP)."""
        if self._installed:
            raise RuntimeError("this search is already installed on a model")
        by_name = {layer.name: layer for layer in self.layers}
        # Fixed sides of searched layers (weight-only search: the activation format) take the space's format.
        for layer_name, fmts in self.space.fixed.items():
            layer = by_name.get(layer_name)
            if layer is not None and not layer.pinned:
                for role, fmt in fmts.items():
                    (layer.weight_quant if role == "w" else layer.act_quant).set_format(fmt)
        searched = {id(by_name[name]): name for name in self.roles}
        for module_name, module in list(model.named_modules()):
            if id(module) not in searched or type(module) is not QuantLayer:
                continue
            roles = self.roles[searched.pop(id(module))]
            mixed = MixedQuantLayer(module, self, roles.get("w"), roles.get("a"))
            parent, child = _parent(model, module_name)
            setattr(parent, child, mixed)
            self._installed.append((parent, child, module, mixed))
        if searched:
            self.remove()
            raise BadInput(f"searched layer(s) not found in the model: {sorted(searched.values())}")
        return self

    def remove(self) -> None:
        """Put the original QuantLayers back (same parameters, no extra modules)."""
        for parent, child, base, mixed in reversed(self._installed):
            base.training = mixed.training  # children are shared: their modes already agree
            setattr(parent, child, base)
        self._installed = []

    def apply_final(self) -> dict[str, dict[str, str]]:
        """Remove the mixtures and set the argmax assignment on the QuantLayers; returns that assignment."""
        self.remove()
        assignment = self.space.assignment(self.final_choices())
        set_assignment(self.layers, assignment)
        return assignment

    def decisions_report(self) -> list[dict]:
        probs = [p.detach().cpu() for p in self.probs()]
        return [{"decision": d.name, "choice": d.candidates[int(p.argmax())], "probability": float(p.max()),
                 "probs": dict(zip(d.candidates, p.tolist(), strict=True))}
                for d, p in zip(self.space.decisions, probs, strict=True)]


# -- the step ---------------------------------------------------------------------------------------------------
def _forward(model: nn.Module, x: torch.Tensor, autocast) -> torch.Tensor:
    if autocast is None:
        return model(x)
    with autocast:
        return model(x)


def _task_loss(model: nn.Module, search: RelaxedSearch, batch, step: int, generator) -> tuple[torch.Tensor, dict]:
    x, y = batch
    extra = search.begin_step(step, generator)
    try:
        logits = _forward(model, x, search.autocast)
    finally:
        search.end_step()
    return F.cross_entropy(logits.float(), y), extra


def _reduce_grads(params: Iterable[torch.Tensor], allreduce_mean: AllReduce | None) -> None:
    if allreduce_mean is None:
        return
    for p in params:
        if p.grad is not None:
            p.grad.copy_(allreduce_mean(p.grad))


def relaxed_step(model: nn.Module, search: RelaxedSearch, w_optimizer: torch.optim.Optimizer,
                 arch_optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], step: int, *,
                 arch_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None,
                 allreduce_mean: AllReduce | None = None) -> dict[str, float]:
    """One search step: loss = CE + lam * E[GBOPs] / target.

    ``arch_batch`` None: one forward/backward on ``batch`` updates the weights (``w_optimizer``) and the logits
    (``arch_optimizer``) together. Given: the weights take a CE step on ``batch``, then the logits take a step on
    ``arch_batch`` (DNAS' split of the training data). ``allreduce_mean`` averages the logits' gradients across
    replicas (the weights' are DDP's). Returns loss, task_loss, cost_loss, expected_gbops, entropy (+ the
    method's extras, e.g. temperature).
    """
    model.train()
    arch_params = list(search.parameters())
    if arch_batch is None:
        task, extra = _task_loss(model, search, batch, step, generator)
        expected = search.expected_gbops()
        cost_loss = search.lam * expected / search.target
        loss = task + cost_loss
        w_optimizer.zero_grad(set_to_none=True)
        arch_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _reduce_grads(arch_params, allreduce_mean)
        w_optimizer.step()
        arch_optimizer.step()
    else:
        task, extra = _task_loss(model, search, batch, step, generator)
        w_optimizer.zero_grad(set_to_none=True)
        task.backward()
        w_optimizer.step()
        arch_task, _ = _task_loss(model, search, arch_batch, step, generator)
        expected = search.expected_gbops()
        cost_loss = search.lam * expected / search.target
        arch_optimizer.zero_grad(set_to_none=True)
        (arch_task + cost_loss).backward()
        _reduce_grads(arch_params, allreduce_mean)
        arch_optimizer.step()
        w_optimizer.zero_grad(set_to_none=True)  # drop the weight gradients of the architecture step
        extra = {**extra, "arch_task_loss": arch_task.detach().item()}
        loss = task.detach() + cost_loss
    return {"loss": loss.detach().item(), "task_loss": task.detach().item(), "cost_loss": cost_loss.detach().item(),
            "expected_gbops": expected.detach().item(), "entropy": search.entropy().detach().item(), **extra}


# -- in-process driver ------------------------------------------------------------------------------------------
@torch.no_grad()
def loader_accuracy(model: nn.Module, loader, device, autocast=None) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((_forward(model, x, autocast).argmax(-1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def make_relaxed(method: str, space: SearchSpace, layers: Sequence[QuantLayer], shapes: Sequence[LayerShape], *,
                 target: float, lam: float, total_steps: int = 1, **kwargs) -> RelaxedSearch:
    """``"edmips"`` -> `EdMIPSSearch`, ``"dnas"`` -> `DNASSearch` (``total_steps`` sets its temperature schedule)."""
    from fliqs.searchers.dnas import DNASSearch
    from fliqs.searchers.edmips import EdMIPSSearch

    if method == "edmips":
        return EdMIPSSearch(space, layers, shapes, target=target, lam=lam, **kwargs)
    if method == "dnas":
        return DNASSearch(space, layers, shapes, target=target, lam=lam, total_steps=total_steps, **kwargs)
    raise BadInput(f"unknown differentiable search method {method!r}; expected one of {', '.join(METHODS)}")


def run_differentiable(method: str, model: nn.Module, layers: Sequence[QuantLayer], shapes: Sequence[LayerShape],
                       space: SearchSpace, train_loader, val_loader, epochs: int, target: float, lam: float,
                       lr: float, arch_lr: float, device: str | torch.device = "cpu", *, momentum: float = 0.9,
                       weight_decay: float = 0.0, seed: int = 0, **search_kwargs) -> dict:
    """Search in-process: SGD on the weights, Adam on the logits, joint steps; then the argmax assignment.

    Returns ``{"choices", "assignment", "history", "gbops", "decisions"}`` (+ ``"val_accuracy"`` of the final
    discrete model when ``val_loader`` is given). ``history`` has one entry per epoch: mean step stats, the
    per-decision probabilities and (with ``val_loader``) the relaxed model's validation accuracy. The model is
    left with plain QuantLayers in the final assignment (no retraining).
    """
    device = torch.device(device)
    total_steps = max(1, epochs * len(train_loader))
    search = make_relaxed(method, space, layers, shapes, target=target, lam=lam, total_steps=total_steps,
                          **search_kwargs)
    search.install(model)
    model.to(device)
    search.to(device)
    w_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    arch_opt = torch.optim.Adam(search.parameters(), lr=arch_lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    step = 0
    try:
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            for x, y in train_loader:
                stats = relaxed_step(model, search, w_opt, arch_opt, (x.to(device), y.to(device)), step,
                                     generator=generator)
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"{method}: non-finite loss at step {step}")
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                step += 1
            n = max(1, len(train_loader))
            entry = {"epoch": epoch, "step": step, **{k: v / n for k, v in sums.items()},
                     "probs": [p.detach().cpu().tolist() for p in search.probs()]}
            if val_loader is not None:
                entry["val_accuracy_relaxed"] = loader_accuracy(model, val_loader, device, search.autocast)
            history.append(entry)
    except BaseException:
        search.remove()
        raise
    choices = search.final_choices()
    decisions = search.decisions_report()
    assignment = search.apply_final()
    result = {"choices": choices, "assignment": assignment, "history": history, "decisions": decisions,
              "gbops": summarize(list(shapes), assignment).gbops}
    if val_loader is not None:
        result["val_accuracy"] = loader_accuracy(model, val_loader, device, search.autocast)
    return result
