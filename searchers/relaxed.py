"""Differentiable ("relaxed") mixed-precision search: what the DNAS and EdMIPS baselines share.

A `RelaxedSearch` holds one vector of architecture logits per decision of a `SearchSpace` (``alphas``, zero
init: uniform) and, once `RelaxedSearch.install`-ed on a model, turns each searched `QuantLayer` into a *mixture*
over its candidate formats. The mixture itself is the method's (`fliqs.searchers.edmips`: one conv on a mixed
weight and a mixed activation; `fliqs.searchers.dnas`: one conv per candidate, Gumbel-weighted).

How the mixture is installed: each searched QuantLayer is swapped (`fliqs.quant.layers.replace_module`) for a
`MixedQuantLayer` that *shares* its submodules (the wrapped conv/linear and both quantizers) and whose forward is
the search's. The module tree, the parameter objects and the ``state_dict`` keys are unchanged,
``QuantLayer.forward`` is untouched, and the architecture logits stay out of ``model.parameters()`` (they are
``search.parameters()``: give them their own optimizer, and all-reduce their gradients yourself under DDP, see
``allreduce_mean``). `RelaxedSearch.remove`
swaps the original QuantLayers back; `RelaxedSearch.apply_final` does that and sets the argmax assignment.

Expected cost (`RelaxedSearch.expected_gbops`) is `fliqs.searchers.space.ExpectedCost`, the formula the FLIQS logs
use too: a few tensor ops per step whatever the number of layers, differentiable in the probabilities.

A step (`relaxed_step`) minimises the method's `RelaxedSearch.objective` — EdMIPS: ``cross_entropy + lam * E[GBOPs] /
target`` jointly on one batch; DNAS: its multiplicative loss on a split of the training data (`fliqs.searchers.dnas`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from fliqs.errors import BadInput
from fliqs.quant.cost import LayerShape
from fliqs.quant.formats import FULL_PRECISION, get_format
from fliqs.quant.layers import FormatQuantizer, QuantLayer, replace_module, set_assignment
from fliqs.quant.rounding import FORMAT_TENSOR_SIZE, format_tensor
from fliqs.searchers.space import ExpectedCost, SearchSpace
from fliqs.training.step import classification_loss, descend

AllReduce = Callable[[torch.Tensor], torch.Tensor]


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


class RelaxedSearch(nn.Module):
    """Architecture logits over a `SearchSpace` and the mixture forward of its layers (subclasses: the method).

    ``target`` is the cost target in GBOPs and ``lam`` the weight of the cost term ``lam * E[GBOPs] / target``;
    ``total_steps`` is the search's length (a method with a schedule uses it).
    """

    method = "relaxed"

    @classmethod
    def options(cls, cfg, steps_per_epoch: int) -> dict:
        """The method's own constructor arguments, from a configuration's ``relaxed`` section."""
        return {}

    @classmethod
    def arch_fraction(cls, cfg) -> float | None:
        """The share of the training split the logits train on, apart from the weights (None: the same data)."""
        return None

    @classmethod
    def arch_warmup_epochs(cls, cfg) -> int:
        """Epochs of weights alone before the logits train."""
        return 0

    def __init__(self, space: SearchSpace, layers: Sequence[QuantLayer], shapes: Sequence[LayerShape], *,
                 target: float, lam: float = 0.1, total_steps: int = 1, autocast: torch.autocast | None = None):
        super().__init__()
        if not target > 0:
            raise BadInput(f"the cost target must be positive GBOPs, got {target}")
        self.space = space
        self.target = float(target)
        self.lam = float(lam)
        self.autocast = autocast
        self.sizes = list(space.sizes)
        self.alphas = nn.ParameterList(nn.Parameter(torch.zeros(k)) for k in self.sizes)

        self.total_steps = int(total_steps)
        formats = format_tensor(FULL_PRECISION).repeat(len(self.sizes), max(self.sizes), 1)  # padding: never used
        for i, decision in enumerate(space.decisions):
            for k, cand in enumerate(decision.candidates):
                formats[i, k] = format_tensor(cand)
        assert formats.shape[-1] == FORMAT_TENSOR_SIZE
        # Block-scaled candidates (MX, NVFP4): every candidate runs through the block path (one graph for all).
        self.blocked = any(get_format(c).block is not None for d in space.decisions for c in d.candidates)
        self.register_buffer("formats", formats, persistent=False)  # [D, K, FORMAT_TENSOR_SIZE]: one per candidate
        self.expected_cost = ExpectedCost(space, shapes)  # a submodule: moves with .to(device)

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
        self._installed: list[tuple[nn.Module, str, QuantLayer, MixedQuantLayer]] = []  # (model, name, old, new)

    def expected_gbops(self, probs=None) -> torch.Tensor:
        """E[GBOPs] under independent per-decision probabilities (default: softmax of the logits); differentiable."""
        return self.expected_cost(self.probs() if probs is None else probs).to(torch.float32)

    def sample_gbops(self) -> torch.Tensor:
        """The cost the step's objective sees, under the forward's mixture (default: the softmax expectation)."""
        return self.expected_gbops()

    def objective(self, task: torch.Tensor, gbops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss the logits minimise, its cost part): ``task + lam * gbops / target`` (EdMIPS' complexity loss)."""
        cost_loss = self.lam * gbops / self.target
        return task + cost_loss, cost_loss

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
    def candidates(self, decision: int, x: torch.Tensor, quantizer: FormatQuantizer) -> list[torch.Tensor]:
        """``x`` fake-quantized (straight-through) into every candidate format of ``decision``, at the range and in
        the block layout of ``quantizer`` (the layer's weight or activation quantizer)."""
        fmts, amax = self.formats[decision], quantizer.amax(x)
        return [quantizer.quantize(x, amax, fmts[k], self.blocked) for k in range(self.sizes[decision])]

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
            replace_module(model, module_name, mixed)
            self._installed.append((model, module_name, module, mixed))
        if searched:
            self.remove()
            raise BadInput(f"searched layer(s) not found in the model: {sorted(searched.values())}")
        return self

    def remove(self) -> None:
        """Put the original QuantLayers back (same parameters, no extra modules)."""
        for model, name, base, mixed in reversed(self._installed):
            base.training = mixed.training  # children are shared: their modes already agree
            replace_module(model, name, base)
        self._installed = []

    def apply_final(self) -> dict[str, dict[str, str]]:
        """Remove the mixtures and set the argmax assignment on the QuantLayers; returns that assignment."""
        self.remove()
        assignment = self.space.assignment(self.final_choices())
        set_assignment(self.layers, assignment)
        return assignment

    def decisions_report(self) -> list[dict]:
        return self.space.report(self.final_choices(), [p.detach().cpu().tolist() for p in self.probs()])


# -- the step ---------------------------------------------------------------------------------------------------
def _task_loss(model: nn.Module, search: RelaxedSearch, batch, step: int, generator):
    """Cross entropy of a forward under the step's mixture, and the cost under that same mixture."""
    extra = search.begin_step(step, generator)
    try:
        task = classification_loss(model, batch, search.autocast)
        cost = search.sample_gbops()
    finally:
        search.end_step()
    return task, extra, cost


def _reduce_grads(params: Iterable[torch.Tensor], allreduce_mean: AllReduce | None) -> None:
    if allreduce_mean is None:
        return
    for p in params:
        if p.grad is not None:
            p.grad.copy_(allreduce_mean(p.grad))


def relaxed_step(model: nn.Module, search: RelaxedSearch, w_optimizer: torch.optim.Optimizer,
                 arch_optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], step: int, *,
                 arch_batch: tuple[torch.Tensor, torch.Tensor] | None = None, train_arch: bool = True,
                 generator: torch.Generator | None = None,
                 allreduce_mean: AllReduce | None = None) -> dict[str, float]:
    """One search step on the method's objective (`RelaxedSearch.objective`).

    ``arch_batch`` None: one forward/backward on ``batch`` updates the weights (``w_optimizer``) and the logits
    (``arch_optimizer``) together (EdMIPS). Given: the weights take a cross-entropy step on ``batch``, then the
    logits a step on ``arch_batch`` (DNAS' split of the training data). ``train_arch=False``: weights only (an
    architecture warm-up). ``allreduce_mean`` averages the logits' gradients across replicas (the weights' are
    DDP's). Returns loss, task_loss, cost_loss, expected_gbops, entropy (+ the method's extras, e.g. temperature).
    """
    model.train()
    arch_params = list(search.parameters())
    reduce = lambda: _reduce_grads(arch_params, allreduce_mean)  # noqa: E731
    expected = search.expected_gbops().detach()  # under the logits the step starts from
    task, extra, cost = _task_loss(model, search, batch, step, generator)
    if arch_batch is None:
        loss, cost_loss = search.objective(task, cost)
        if train_arch:
            descend(loss, w_optimizer, arch_optimizer, before_step=reduce)
        else:
            descend(task, w_optimizer)
    else:
        descend(task, w_optimizer)
        if train_arch:
            arch_task, _, arch_cost = _task_loss(model, search, arch_batch, step, generator)
            arch_loss, cost_loss = search.objective(arch_task, arch_cost)
            descend(arch_loss, arch_optimizer, before_step=reduce)
            w_optimizer.zero_grad(set_to_none=True)  # drop the weight gradients of the architecture step
            extra = {**extra, "arch_task_loss": arch_task.detach().item()}
        else:
            _, cost_loss = search.objective(task.detach(), cost.detach())
        loss = task.detach() + cost_loss.detach()
    return {"loss": loss.detach().item(), "task_loss": task.detach().item(), "cost_loss": cost_loss.detach().item(),
            "expected_gbops": expected.item(), "entropy": search.entropy().detach().item(),
            **extra}
