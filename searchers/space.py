"""Search spaces as plain data (TuNAS style): an ordered list of one-of decisions.

A `Decision` picks one of its candidate formats and applies it to one or more *targets*: a layer's weights
(``"w"``), its activations (``"a"``) or both. By default there is one decision per quantized layer setting both;
options split weights and activations into separate decisions, tie layers matching a name pattern into one
shared decision (a group), or pin layers to a fixed format (they get no decision at all).

An *architecture* decision (FLIQNAS) picks a searchable block's kernel size (``"k3"``, ``"k5"``, ``"k7"``) or its
expansion ratio (``"e3"``, ``"e6"``, ``"skip"``); the same controller samples it with the format decisions. Its
cost enters through `fliqs.cost.ArchShapes`: the layer shapes of the sampled architecture.

Turning choices into an assignment and an architecture, and those into cost, are pure functions of this data.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fliqs.cost import ArchShapes, LayerShape, summarize
from fliqs.errors import BadInput
from fliqs.formats import get_format

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

    def uniform(self, fmt: str) -> dict[str, dict[str, str]]:
        """Every searched target in ``fmt`` (fixed layers keep theirs): the uniform baselines."""
        out = {layer: dict(fmts) for layer, fmts in self.fixed.items()}
        for decision in self.decisions:
            if decision.kind == FORMAT:
                for layer, role in decision.targets:
                    out.setdefault(layer, {})[role] = fmt
        return out

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
    * ``blocks``: ``{block: (kernels, expansions)}`` (`fliqs.supernet.block_options`; expansion 0 = skip): a
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


def expected_cost(space: SearchSpace, probs: Sequence[Sequence[float]], shapes: Sequence[LayerShape],
                  total_params: int | None, cost: str = "bops") -> float:
    """Cost expected under independent per-decision probabilities (for logging "expected GBOPs").

    BOPs are bilinear in the weight and activation bits: a decision that sets both contributes E[bits**2],
    two separate decisions contribute E[w_bits] * E[a_bits]. Architecture decisions are not averaged over:
    ``shapes`` is one architecture (FLIQNAS passes the most likely one).
    """
    by_layer: dict[str, dict[str, tuple[int, int] | int]] = {}
    for layer, fmts in space.fixed.items():
        for role, fmt in fmts.items():
            by_layer.setdefault(layer, {})[role] = get_format(fmt).bits
    for i, decision in enumerate(space.decisions):
        if decision.kind == FORMAT:
            for layer, role in decision.targets:
                by_layer.setdefault(layer, {})[role] = (i, 0)
    moment = [
        (sum(p * get_format(c).bits for p, c in zip(ps[:len(d.candidates)], d.candidates, strict=True)),
         sum(p * get_format(c).bits ** 2 for p, c in zip(ps[:len(d.candidates)], d.candidates, strict=True)))
        if d.kind == FORMAT else (0.0, 0.0)  # the policy pads shorter decisions
        for ps, d in zip(probs, space.decisions, strict=True)
    ]

    def mean_bits(spec) -> float:
        return moment[spec[0]][0] if isinstance(spec, tuple) else float(spec)

    total_bops, weight_bits, counted_weights = 0.0, 0.0, 0
    for shape in shapes:
        if shape.kind == "attn_matmul" or shape.name not in by_layer:  # not searched: full precision, as summarize
            unsearched = summarize([shape]).layers[0]
            total_bops += unsearched.bops
            weight_bits += unsearched.weight_params * unsearched.weight_bits
            counted_weights += unsearched.weight_params
            continue
        w, a = by_layer[shape.name]["w"], by_layer[shape.name]["a"]
        same = isinstance(w, tuple) and isinstance(a, tuple) and w[0] == a[0]
        total_bops += shape.macs * (moment[w[0]][1] if same else mean_bits(w) * mean_bits(a))
        weight_bits += shape.weight_params * mean_bits(w)
        counted_weights += shape.weight_params
    if cost == "bops":
        return total_bops / 1e9
    other = 0 if total_params is None else total_params - counted_weights
    return (weight_bits + other * 32) / 8 / 1e6
