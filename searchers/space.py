"""Search spaces as plain data (TuNAS style): an ordered list of one-of decisions.

A `Decision` picks one of its candidate formats and applies it to one or more *targets*: a layer's weights
(``"w"``), its activations (``"a"``) or both. By default there is one decision per quantized layer setting both;
options split weights and activations into separate decisions, tie layers matching a name pattern into one
shared decision (a group), or pin layers to a fixed format (they get no decision at all).

An *architecture* decision (FLIQNAS) picks a searchable block's kernel size (``"k3"``, ``"k5"``, ``"k7"``) or its
expansion ratio (``"e3"``, ``"e6"``, ``"skip"``); the same controller samples it with the format decisions. Its
cost enters through `fliqs.quant.cost.ArchShapes`: the layer shapes of the sampled architecture.

Turning choices into an assignment and an architecture, and those into cost, are pure functions of this data.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fliqs.errors import BadInput
from fliqs.quant.cost import OTHER_PARAM_BITS, ArchShapes, LayerShape, summarize
from fliqs.quant.formats import get_format

FORMAT, KERNEL, EXPANSION = "format", "kernel", "expansion"  # what a decision picks


@dataclass(frozen=True)
class Decision:
    name: str
    candidates: tuple[str, ...]  # format names, or "k3".. (kernel) / "e3".., "skip" (expansion)
    targets: tuple[tuple[str, str], ...]  # (layer name, "w" | "a"); architecture: (block name, kind)
    kind: str = FORMAT


@dataclass(frozen=True)
class SearchSpace:
    decisions: tuple[Decision, ...]
    fixed: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # layer -> {"w": f, "a": f}, not searched

    @property
    def sizes(self) -> list[int]:
        return [len(d.candidates) for d in self.decisions]

    @property
    def format_candidates(self) -> tuple[str, ...]:
        """The candidate formats (every format decision has the same)."""
        return next((d.candidates for d in self.decisions if d.kind == FORMAT), ())

    @property
    def searches_architecture(self) -> bool:
        return any(d.kind != FORMAT for d in self.decisions)

    def _check(self, choices: Sequence[int]) -> None:
        if len(choices) != len(self.decisions):
            raise ValueError(f"expected {len(self.decisions)} choices, got {len(choices)}")

    def assignment(self, choices: Sequence[int]) -> dict[str, dict[str, str]]:
        """``{layer: {"w": format, "a": format}}`` for one choice index per decision (fixed layers included)."""
        self._check(choices)
        out = {layer: dict(fmts) for layer, fmts in self.fixed.items()}
        for decision, choice in zip(self.decisions, choices, strict=True):
            if decision.kind == FORMAT:
                for layer, role in decision.targets:
                    out.setdefault(layer, {})[role] = decision.candidates[int(choice)]
        return out

    def architecture(self, choices: Sequence[int]) -> dict[str, str]:
        """``{block: "k5e3" | "skip"}`` for the architecture decisions (empty when none are searched)."""
        self._check(choices)
        picked: dict[str, dict[str, str]] = {}
        for decision, choice in zip(self.decisions, choices, strict=True):
            if decision.kind != FORMAT:
                for block, kind in decision.targets:
                    picked.setdefault(block, {})[kind] = decision.candidates[int(choice)]
        return {block: "skip" if p[EXPANSION] == "skip" else p[KERNEL] + p[EXPANSION] for block, p in picked.items()}

    def choices_of(self, assignment: Mapping[str, Mapping[str, str]]) -> list[int]:
        """The choice per format decision that gives ``assignment`` (the inverse of `assignment`)."""
        if self.searches_architecture:
            raise ValueError("choices_of covers format decisions only")
        out = []
        for d in self.decisions:
            layer, role = d.targets[0]
            try:
                out.append(d.candidates.index(assignment[layer][role]))
            except (KeyError, ValueError):
                raise BadInput(f"assignment has no {role} format of {layer} among {list(d.candidates)}") from None
        if self.assignment(out) != {k: dict(v) for k, v in assignment.items() if k in self.assignment(out)}:
            raise BadInput("assignment is not one of this space's (decisions shared by several layers differ)")
        return out

    def active(self, choices: Sequence[int]) -> list[bool]:
        """Which decisions shaped a sample: all but those of a skipped block — its kernel decision and the format
        decisions whose layers all lie inside it. TuNAS keeps inactive paths out of the policy gradient."""
        skipped = [block for block, label in self.architecture(choices).items() if label == "skip"]
        if not skipped:
            return [True] * len(self.decisions)

        def inside(layer: str) -> bool:
            return any(layer.startswith(f"{block}.") for block in skipped)

        return [(d.targets[0][0] not in skipped) if d.kind == KERNEL else
                (d.kind == EXPANSION or not all(inside(layer) for layer, _ in d.targets)) for d in self.decisions]

    def uniform(self, fmt: str) -> dict[str, dict[str, str]]:
        """Every searched target in ``fmt`` (fixed layers keep theirs): the uniform baselines."""
        out = {layer: dict(fmts) for layer, fmts in self.fixed.items()}
        for decision in self.decisions:
            if decision.kind == FORMAT:
                for layer, role in decision.targets:
                    out.setdefault(layer, {})[role] = fmt
        return out

    def report(self, choices: Sequence[int], probs=None) -> list[dict]:
        """One row per decision: the chosen candidate and its probability, and every candidate's probability when
        ``probs`` (one row per decision, padded rows allowed) is given; 1.0 without."""
        self._check(choices)
        rows = []
        for i, (decision, choice) in enumerate(zip(self.decisions, choices, strict=True)):
            row = {"decision": decision.name, "choice": decision.candidates[int(choice)], "probability": 1.0}
            if probs is not None:
                p = [float(v) for v in list(probs[i])[:len(decision.candidates)]]
                row.update(probability=p[int(choice)], probs=dict(zip(decision.candidates, p, strict=True)))
            rows.append(row)
        return rows

    def describe(self) -> list[dict]:
        return [{"decision": d.name, "candidates": list(d.candidates),
                 "targets": [f"{layer}:{role}" for layer, role in d.targets]} for d in self.decisions]


def build_space(layer_names: Sequence[str], candidates: Sequence[str], *, shared_wa: bool = True,
                weight_only: bool = False, groups: Mapping[str, str] | None = None,
                pinned: Mapping[str, str] | None = None, activation_format: str = "fp32",
                blocks: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None) -> SearchSpace:
    """One decision per layer (or per group), over ``candidates``; architecture decisions first when ``blocks``.

    * ``shared_wa``: one decision sets weights and activations (default); otherwise two decisions per layer.
    * ``weight_only``: only weights are searched; activations stay at ``activation_format``.
    * ``groups``: ``{name pattern: group name}``; all layers matching a pattern share the group's decision(s).
    * ``pinned``: ``{name pattern: format}``; matching layers are fixed and get no decision.
    * ``blocks``: ``{block: (kernels, expansions)}`` (`fliqs.models.supernet.block_options`; expansion 0 = skip): a
      kernel and an expansion decision per block.
    """
    arch = architecture_decisions(blocks or {})
    if not candidates:
        raise BadInput("the search space has no candidate formats")
    cands = tuple(get_format(c).name for c in candidates)
    groups, pinned = dict(groups or {}), dict(pinned or {})
    fixed: dict[str, dict[str, str]] = {}
    order: list[str] = []
    targets: dict[str, list[tuple[str, str]]] = {}
    roles = ("w",) if weight_only else (("wa",) if shared_wa else ("w", "a"))
    for layer in layer_names:
        pin = next((p for p in pinned if fnmatch.fnmatchcase(layer, p)), None)
        if pin is not None:
            fmt = get_format(pinned[pin]).name
            fixed[layer] = {"w": fmt, "a": fmt}
            continue
        if weight_only:
            fixed[layer] = {"a": get_format(activation_format).name}
        group = next((g for p, g in groups.items() if fnmatch.fnmatchcase(layer, p)), layer)
        for role in roles:
            key = group if role == "wa" else f"{group}:{role}"
            if key not in targets:
                order.append(key)
                targets[key] = []
            targets[key].extend((layer, r) for r in (("w", "a") if role == "wa" else (role,)))
    if not order and not arch:
        raise BadInput("every layer is pinned: nothing to search")
    decisions = tuple(Decision(key, cands, tuple(targets[key])) for key in order)
    return SearchSpace(arch + decisions, fixed)


def architecture_decisions(blocks: Mapping[str, tuple[Sequence[int], Sequence[int]]]) -> tuple[Decision, ...]:
    """A kernel-size and an expansion-ratio decision per searchable block (expansion 0 is the "skip" option)."""
    out = []
    for block, (kernels, expansions) in blocks.items():
        out.append(Decision(f"{block}:kernel", tuple(f"k{k}" for k in kernels), ((block, KERNEL),), KERNEL))
        out.append(Decision(f"{block}:expansion", tuple("skip" if e == 0 else f"e{e}" for e in expansions),
                            ((block, EXPANSION),), EXPANSION))
    return tuple(out)


def assignment_cost(shapes: Sequence[LayerShape], assignment: Mapping, total_params: int | None,
                    cost: str = "bops") -> float:
    """The cost the reward sees: GBOPs (``"bops"``) or model size in MB (``"size"``)."""
    summary = summarize(list(shapes), assignment, total_params=total_params)
    return summary.gbops if cost == "bops" else summary.size_mb


def on_architecture(shapes: Sequence[LayerShape] | ArchShapes, assignment: Mapping,
                    architecture: Mapping[str, str] | None = None) -> tuple[list[LayerShape], dict]:
    """The layer shapes of ``architecture`` (its reference one when None; ``shapes`` itself when no architecture
    is searched) and the part of ``assignment`` on the layers it keeps (a skipped block's layers are gone)."""
    if not isinstance(shapes, ArchShapes):
        return list(shapes), dict(assignment)
    layer_shapes = shapes.shapes(architecture or shapes.reference)
    kept = {s.name for s in layer_shapes}
    return layer_shapes, {k: v for k, v in assignment.items() if k in kept}


def sample_cost(shapes: Sequence[LayerShape] | ArchShapes, assignment: Mapping, architecture: Mapping[str, str],
                total_params: int | None, cost: str = "bops") -> float:
    """The cost of one sample: its formats on its architecture (layers of skipped blocks cost nothing)."""
    return assignment_cost(*on_architecture(shapes, assignment, architecture), total_params, cost)


class ExpectedCost(nn.Module):
    """Cost expected under independent per-decision probabilities: one formula for the FLIQS logs ("expected
    GBOPs") and the differentiable searches' cost loss (differentiable in the probabilities).

    With b_d the bits of decision d's candidate (a random variable), BOPs are bilinear in weight and activation
    bits:

        E[GBOPs] = const + sum_d s2_d E[b_d^2] + sum_d s1_d E[b_d] + sum_{d,e} P_de E[b_d] E[b_e]

    A decision setting both sides of a layer contributes its MACs to ``s2`` (E[b^2], not E[b]^2); separate weight
    and activation decisions to ``P`` (they are independent); one searched side against a fixed one to ``s1``.
    Unsearched layers and attention matmuls are constants. Size (MB) is linear: const + sum_d w_d E[b_d] over the
    decisions that set weights. Architecture decisions have no bits: ``shapes`` is one architecture (FLIQNAS logs
    its most likely one).
    """

    def __init__(self, space: SearchSpace, shapes: Sequence[LayerShape], total_params: int | None = None,
                 cost: str = "bops"):
        super().__init__()
        self.cost = cost
        sizes = space.sizes
        bits = torch.zeros(len(sizes), max(sizes), dtype=torch.float64)
        for d, decision in enumerate(space.decisions):
            if decision.kind == FORMAT:
                bits[d, :len(decision.candidates)] = torch.tensor(
                    [get_format(c).effective_bits for c in decision.candidates], dtype=torch.float64)
        spec: dict[str, dict[str, int | float]] = {}  # layer -> role -> decision index (int) or fixed bits (float)
        for layer, fmts in space.fixed.items():
            for role, fmt in fmts.items():
                spec.setdefault(layer, {})[role] = float(get_format(fmt).effective_bits)
        for d, decision in enumerate(space.decisions):
            if decision.kind == FORMAT:
                for layer, role in decision.targets:
                    spec.setdefault(layer, {})[role] = d
        n = len(sizes)
        const, s1, s2, pair = 0.0, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), \
            torch.zeros(n, n, dtype=torch.float64)
        size_const, size_w = 0.0, torch.zeros(n, dtype=torch.float64)
        for shape in shapes:
            if shape.kind == "attn_matmul" or shape.name not in spec:  # not searched: full precision (summarize)
                unsearched = summarize([shape]).layers[0]
                const += unsearched.bops / 1e9
                size_const += unsearched.weight_params * unsearched.weight_bits
                continue
            gmacs = shape.macs / 1e9
            w, a = spec[shape.name]["w"], spec[shape.name]["a"]
            if isinstance(w, int) and isinstance(a, int):
                if w == a:
                    s2[w] += gmacs
                else:
                    pair[w, a] += gmacs
            elif isinstance(w, int) or isinstance(a, int):
                searched, fixed = (w, a) if isinstance(w, int) else (a, w)
                s1[searched] += gmacs * fixed
            else:
                const += gmacs * w * a
            if isinstance(w, int):
                size_w[w] += shape.weight_params
            else:
                size_const += shape.weight_params * w
        if total_params is not None:
            size_const += (total_params - sum(s.weight_params for s in shapes)) * OTHER_PARAM_BITS
        self.const, self.size_const = const, size_const
        for name, value in (("bits", bits), ("s1", s1), ("s2", s2), ("pair", pair), ("size_w", size_w)):
            self.register_buffer(name, value, persistent=False)

    def _stack(self, probs) -> torch.Tensor:
        """[D, K] float64 from a [D, K] tensor or one vector per decision (zero-padded)."""
        d, k = self.bits.shape
        if isinstance(probs, torch.Tensor) and probs.dim() == 2:
            p = probs.to(device=self.bits.device, dtype=torch.float64)
        else:
            rows = [torch.as_tensor(r, dtype=torch.float64, device=self.bits.device).reshape(-1) for r in probs]
            p = torch.stack([torch.nn.functional.pad(r, (0, k - r.numel())) for r in rows]) if rows else None
        if p is None or p.shape != (d, k):
            raise ValueError(f"expected probabilities for {d} decisions of at most {k} candidates, got "
                             f"{'nothing' if p is None else tuple(p.shape)}")
        return p

    def forward(self, probs) -> torch.Tensor:
        """E[cost] in GBOPs (``cost="bops"``) or MB (``"size"``), float64, differentiable in ``probs``."""
        p = self._stack(probs)
        m1 = (p * self.bits).sum(-1)
        if self.cost == "size":
            return (self.size_const + (self.size_w * m1).sum()) / 8 / 1e6
        m2 = (p * self.bits.square()).sum(-1)
        return self.const + (self.s2 * m2).sum() + (self.s1 * m1).sum() + m1 @ self.pair @ m1
