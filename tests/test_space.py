"""Search spaces as data (fliqs.searchers.space): decisions, assignments and their cost."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from fliqs.errors import BadInput
from fliqs.quant.cost import ArchShapes, LayerShape, summarize
from fliqs.quant.formats import UnknownFormatError, get_format
from fliqs.searchers.space import (
    Decision,
    ExpectedCost,
    SearchSpace,
    assignment_cost,
    build_space,
    on_architecture,
    sample_cost,
)

NAMES = ["stem", "block1.conv", "block2.conv", "head"]
SHAPES = [
    LayerShape("stem", "conv", 1_000, 90),
    LayerShape("block1.conv", "conv", 40_000, 2_304),
    LayerShape("block2.conv", "conv", 18_000, 4_608),
    LayerShape("head", "linear", 640, 650),
]
BITS = {"int2": 2, "int4": 4, "int8": 8, "fp8_e4m3": 8, "fp4_e2m1": 4, "fp6_e2m3": 6, "bf16": 16, "fp32": 32}


# ---------------------------------------------------------------- structure


def test_default_one_decision_per_layer_setting_w_and_a():
    space = build_space(NAMES, ["int4", "int8"])
    assert [d.name for d in space.decisions] == NAMES
    assert space.sizes == [2, 2, 2, 2]
    for decision, layer in zip(space.decisions, NAMES, strict=True):
        assert decision.candidates == ("int4", "int8")
        assert decision.targets == ((layer, "w"), (layer, "a"))
    assert dict(space.fixed) == {}


def test_separate_weight_and_activation_decisions():
    space = build_space(NAMES, ["int4", "int8"], shared_wa=False)
    assert [d.name for d in space.decisions] == [f"{n}:{r}" for n in NAMES for r in ("w", "a")]
    for decision in space.decisions:
        layer, role = decision.name.split(":")
        assert decision.targets == ((layer, role),)
    # Weight and activation of one layer can now differ.
    choices = [0, 1] * len(NAMES)
    assert space.assignment(choices) == {n: {"w": "int4", "a": "int8"} for n in NAMES}


@pytest.mark.parametrize("act", ["fp32", "bf16", "int8"])
def test_weight_only_fixes_activations(act):
    space = build_space(NAMES, ["int2", "int4", "int8"], weight_only=True, activation_format=act)
    assert [d.name for d in space.decisions] == [f"{n}:w" for n in NAMES]
    assert all(d.targets == ((n, "w"),) for d, n in zip(space.decisions, NAMES, strict=True))
    for choices in itertools.product(range(3), repeat=len(NAMES)):
        assignment = space.assignment(choices)
        assert set(assignment) == set(NAMES)
        for name, c in zip(NAMES, choices, strict=True):
            assert assignment[name] == {"w": ["int2", "int4", "int8"][c], "a": act}


def test_weight_only_default_activation_is_full_precision():
    space = build_space(NAMES, ["int4"], weight_only=True)
    assert space.assignment([0] * 4)["head"] == {"w": "int4", "a": "fp32"}


def test_groups_share_one_decision():
    space = build_space(NAMES, ["int4", "int8"], groups={"block*": "blocks"})
    assert [d.name for d in space.decisions] == ["stem", "blocks", "head"]
    blocks = space.decisions[1]
    assert blocks.targets == (("block1.conv", "w"), ("block1.conv", "a"), ("block2.conv", "w"), ("block2.conv", "a"))
    for c in (0, 1):
        assignment = space.assignment([0, c, 1])
        fmt = ("int4", "int8")[c]
        assert assignment["block1.conv"] == assignment["block2.conv"] == {"w": fmt, "a": fmt}
        assert assignment["stem"] == {"w": "int4", "a": "int4"}
        assert assignment["head"] == {"w": "int8", "a": "int8"}


def test_groups_with_separate_weight_and_activation():
    space = build_space(NAMES, ["int4", "int8"], shared_wa=False, groups={"block?.conv": "blocks", "head": "tail"})
    assert [d.name for d in space.decisions] == ["stem:w", "stem:a", "blocks:w", "blocks:a", "tail:w", "tail:a"]
    assert space.decisions[2].targets == (("block1.conv", "w"), ("block2.conv", "w"))
    assert space.decisions[3].targets == (("block1.conv", "a"), ("block2.conv", "a"))


def test_group_pattern_is_fnmatch_not_prefix():
    # "block1*" matches only block1.conv; block2.conv keeps its own decision.
    space = build_space(NAMES, ["int4", "int8"], groups={"block1*": "g"})
    assert [d.name for d in space.decisions] == ["stem", "g", "block2.conv", "head"]


def test_pinned_layers_get_no_decision_and_keep_their_format():
    space = build_space(NAMES, ["int2", "int4", "int8"], pinned={"stem": "int8", "he*": "bf16"})
    assert [d.name for d in space.decisions] == ["block1.conv", "block2.conv"]
    assert {layer for d in space.decisions for layer, _ in d.targets} == {"block1.conv", "block2.conv"}
    for choices in itertools.product(range(3), repeat=2):
        assignment = space.assignment(choices)
        assert assignment["stem"] == {"w": "int8", "a": "int8"}
        assert assignment["head"] == {"w": "bf16", "a": "bf16"}
    for fmt in ("int2", "int4"):
        uniform = space.uniform(fmt)
        assert uniform["stem"] == {"w": "int8", "a": "int8"}
        assert uniform["head"] == {"w": "bf16", "a": "bf16"}
        assert uniform["block1.conv"] == uniform["block2.conv"] == {"w": fmt, "a": fmt}


def test_pinned_wins_over_weight_only():
    space = build_space(NAMES, ["int4"], weight_only=True, pinned={"stem": "int8"})
    assert space.assignment([0, 0, 0])["stem"] == {"w": "int8", "a": "int8"}


def test_every_layer_pinned_is_an_error():
    with pytest.raises(BadInput, match="pinned"):
        build_space(NAMES, ["int4", "int8"], pinned={"*": "int8"})


def test_no_candidates_is_an_error():
    with pytest.raises(BadInput, match="no candidate"):
        build_space(NAMES, [])


@pytest.mark.parametrize("kwargs", [
    {"candidates": ["int4", "int7"]},
    {"candidates": ["int4"], "pinned": {"stem": "fp5"}},
    {"candidates": ["int4"], "weight_only": True, "activation_format": "bf17"},
])
def test_unknown_format_is_an_error(kwargs):
    with pytest.raises(UnknownFormatError, match="valid formats"):
        build_space(NAMES, **kwargs)


def test_assignment_maps_choices():
    space = build_space(NAMES, ["int2", "int4", "int8", "fp8_e4m3"])
    assert space.assignment([3, 0, 2, 1]) == {
        "stem": {"w": "fp8_e4m3", "a": "fp8_e4m3"},
        "block1.conv": {"w": "int2", "a": "int2"},
        "block2.conv": {"w": "int8", "a": "int8"},
        "head": {"w": "int4", "a": "int4"},
    }


def test_assignment_wrong_length():
    space = build_space(NAMES, ["int4", "int8"])
    with pytest.raises(ValueError, match="expected 4 choices, got 3"):
        space.assignment([0, 1, 0])


def test_assignment_does_not_alias_fixed():
    space = build_space(NAMES, ["int4", "int8"], pinned={"stem": "int8"})
    space.assignment([0, 0, 0])["stem"]["w"] = "int2"
    assert space.assignment([0, 0, 0])["stem"] == {"w": "int8", "a": "int8"}


def test_uniform():
    space = build_space(NAMES, ["int4", "int8"], shared_wa=False)
    assert space.uniform("fp8_e4m3") == {n: {"w": "fp8_e4m3", "a": "fp8_e4m3"} for n in NAMES}


def test_hand_built_space():
    space = SearchSpace((Decision("d", ("int4", "int8"), (("x", "w"), ("y", "a"))),), {"x": {"a": "fp32"},
                                                                                       "y": {"w": "int2"}})
    assert space.assignment([1]) == {"x": {"a": "fp32", "w": "int8"}, "y": {"w": "int2", "a": "int8"}}
    assert space.describe() == [{"decision": "d", "candidates": ["int4", "int8"], "targets": ["x:w", "y:a"]}]


# ---------------------------------------------------------------- the per-decision report


def test_report_without_probs():
    space = build_space(NAMES, ["int2", "int4", "int8"], groups={"block*": "blocks"})
    assert space.report([2, 0, 1]) == [
        {"decision": "stem", "choice": "int8", "probability": 1.0},
        {"decision": "blocks", "choice": "int2", "probability": 1.0},
        {"decision": "head", "choice": "int4", "probability": 1.0},
    ]


def test_report_with_probs_and_padded_rows():
    space = arch_space()  # decision sizes 2, 2, 2, 3, then 2 per layer: rows padded to 3
    probs = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [0.1, 0.9, 0.0], [0.2, 0.3, 0.5],
                          [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    choices = [1, 0, 1, 2, 0, 1, 0, 1]
    rows = space.report(choices, probs)
    assert [r["decision"] for r in rows] == [d.name for d in space.decisions]
    assert rows[0] == {"decision": "b1:kernel", "choice": "k5", "probability": 0.75,
                       "probs": {"k3": 0.25, "k5": 0.75}}
    assert rows[3] == {"decision": "b2:expansion", "choice": "e6", "probability": pytest.approx(0.5),
                       "probs": {"skip": pytest.approx(0.2), "e3": pytest.approx(0.3), "e6": pytest.approx(0.5)}}
    for row, decision, p, c in zip(rows, space.decisions, probs.tolist(), choices, strict=True):
        assert set(row) == {"decision", "choice", "probability", "probs"}
        assert row["choice"] == decision.candidates[c]
        assert list(row["probs"]) == list(decision.candidates)  # padding dropped
        assert list(row["probs"].values()) == pytest.approx(p[:len(decision.candidates)])
        assert row["probability"] == pytest.approx(p[c])
        assert all(type(v) is float for v in row["probs"].values())
    # One list per decision (unpadded) reads the same.
    lists = [p[:len(d.candidates)] for p, d in zip(probs.tolist(), space.decisions, strict=True)]
    assert space.report(choices, lists) == rows


def test_report_wrong_length():
    space = build_space(NAMES, ["int4", "int8"])
    with pytest.raises(ValueError, match="expected 4 choices, got 5"):
        space.report([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="expected 4 choices, got 3"):
        space.report([0, 1, 0], [[0.5, 0.5]] * 3)


# ---------------------------------------------------------------- cost


def _hand_gbops(shapes, assignment):
    return sum(s.macs * BITS[assignment[s.name]["w"]] * BITS[assignment[s.name]["a"]] for s in shapes) / 1e9


def _hand_size_mb(shapes, assignment, total_params):
    weight_bits = sum(s.weight_params * BITS[assignment[s.name]["w"]] for s in shapes)
    other = total_params - sum(s.weight_params for s in shapes)
    return (weight_bits + 32 * other) / 8 / 1e6


@pytest.mark.parametrize("shared_wa", [True, False])
def test_assignment_cost_matches_summarize_and_hand_computation(shared_wa):
    rng = random.Random(0)
    space = build_space(NAMES, ["int2", "int4", "int8", "fp8_e4m3", "fp6_e2m3"], shared_wa=shared_wa)
    total_params = 10_000
    seen = set()
    for _ in range(25):
        choices = [rng.randrange(n) for n in space.sizes]
        assignment = space.assignment(choices)
        gbops = assignment_cost(SHAPES, assignment, total_params)
        assert gbops == summarize(SHAPES, assignment, total_params=total_params).gbops
        assert gbops == pytest.approx(_hand_gbops(SHAPES, assignment), rel=1e-12)
        size = assignment_cost(SHAPES, assignment, total_params, cost="size")
        assert size == pytest.approx(_hand_size_mb(SHAPES, assignment, total_params), rel=1e-12)
        seen.add(round(gbops, 12))
    assert len(seen) > 10  # the random assignments really differ


def test_assignment_cost_known_value():
    space = build_space(NAMES, ["int2", "int4", "int8"])
    # stem int8 (64), block1 int2 (4), block2 int4 (16), head int8 (64).
    gbops = assignment_cost(SHAPES, space.assignment([2, 0, 1, 2]), None)
    assert gbops == pytest.approx((1_000 * 64 + 40_000 * 4 + 18_000 * 16 + 640 * 64) / 1e9, rel=1e-12)
    size = assignment_cost(SHAPES, space.assignment([2, 0, 1, 2]), 8_000, cost="size")
    weight_bits = 90 * 8 + 2_304 * 2 + 4_608 * 4 + 650 * 8
    assert size == pytest.approx((weight_bits + (8_000 - 7_652) * 32) / 8 / 1e6, rel=1e-12)


# Spaces for the expected-cost checks: small enough to enumerate every assignment.
SPACES = {
    "shared": dict(shared_wa=True),
    "separate": dict(shared_wa=False),
    "weight_only": dict(weight_only=True, activation_format="bf16"),
    "grouped": dict(groups={"block*": "blocks"}),
    "grouped_separate": dict(shared_wa=False, groups={"block*": "blocks"}, pinned={"stem": "int8"}),
    "pinned": dict(pinned={"head": "fp32"}),
}
# Extra shapes that no decision covers: an attention matmul and an unquantized layer (both full precision).
EXTRA = [LayerShape("blk.attn_matmul", "attn_matmul", 3_000, 0), LayerShape("aux", "linear", 500, 77)]


def _space_and_shapes(key, candidates=("int2", "int4", "fp8_e4m3")):
    names = NAMES[:3] if key in ("separate", "grouped_separate") else NAMES  # keep the enumeration small
    shapes = [s for s in SHAPES if s.name in names] + EXTRA
    return build_space(names, list(candidates), **SPACES[key]), shapes


def _random_probs(sizes, rng):
    probs = []
    for n in sizes:
        raw = [rng.random() + 0.05 for _ in range(n)]
        probs.append([r / sum(raw) for r in raw])
    return probs


def expected_cost(space, probs, shapes, total_params, kind="bops"):
    """`ExpectedCost` as a float (the module under test), on one float64 vector per decision."""
    value = ExpectedCost(space, shapes, total_params, kind)([torch.tensor(p, dtype=torch.float64) for p in probs])
    assert value.dtype == torch.float64 and value.dim() == 0
    return float(value)


def enumerated_cost(space, probs, shapes, total_params, kind):
    """The independent reference: sum over every assignment of prob(assignment) * its `assignment_cost`."""
    total = mass = 0.0
    for choices in itertools.product(*(range(n) for n in space.sizes)):
        p = math.prod(probs[d][c] for d, c in enumerate(choices))
        mass += p
        total += p * assignment_cost(shapes, space.assignment(choices), total_params, kind)
    assert mass == pytest.approx(1.0, rel=1e-12)
    return total


@pytest.mark.parametrize("key", list(SPACES))
@pytest.mark.parametrize("total_params", [None, 20_000])
def test_expected_cost_one_hot_equals_assignment_cost(key, total_params):
    space, shapes = _space_and_shapes(key)
    for choices in itertools.product(*(range(n) for n in space.sizes)):
        probs = [[1.0 if i == c else 0.0 for i in range(n)] for c, n in zip(choices, space.sizes, strict=True)]
        assignment = space.assignment(choices)
        for kind in ("bops", "size"):
            expected = expected_cost(space, probs, shapes, total_params, kind)
            assert expected == pytest.approx(assignment_cost(shapes, assignment, total_params, kind), rel=1e-12), \
                (choices, kind)


@pytest.mark.parametrize("key", list(SPACES))
@pytest.mark.parametrize("total_params", [None, 20_000])
def test_expected_cost_equals_exact_enumeration(key, total_params):
    rng = random.Random(list(SPACES).index(key) * 7 + (total_params or 0))
    space, shapes = _space_and_shapes(key)
    for _ in range(3):
        probs = _random_probs(space.sizes, rng)
        for kind in ("bops", "size"):
            exact = enumerated_cost(space, probs, shapes, total_params, kind)
            assert expected_cost(space, probs, shapes, total_params, kind) == pytest.approx(exact, rel=1e-10), kind


@pytest.mark.parametrize("key", list(SPACES))
def test_expected_cost_takes_a_padded_matrix_or_one_vector_per_decision(key):
    space, shapes = _space_and_shapes(key, candidates=("int2", "int4", "fp8_e4m3", "bf16"))
    probs = _random_probs(space.sizes, random.Random(5))
    k = max(space.sizes)
    padded = torch.tensor([p + [0.0] * (k - len(p)) for p in probs], dtype=torch.float32)
    for kind in ("bops", "size"):
        module = ExpectedCost(space, shapes, 20_000, kind)
        exact = enumerated_cost(space, probs, shapes, 20_000, kind)
        for form in (probs, [torch.tensor(p) for p in probs], padded, padded.double()):
            assert float(module(form)) == pytest.approx(exact, rel=1e-6), (kind, type(form))
        with pytest.raises(ValueError, match=f"expected probabilities for {len(probs)} decisions"):
            module(probs[:-1])


def test_expected_cost_of_python_float_lists_is_float64_exact():
    space = build_space(["x"], ["int2", "int8"])
    shapes = [LayerShape("x", "conv", 1_000_000_000, 10)]
    assert float(ExpectedCost(space, shapes)([[0.1, 0.9]])) == pytest.approx(0.1 * 4 + 0.9 * 64, rel=1e-12)


def test_a_probability_matrix_of_the_wrong_shape_is_refused():
    """A [1, K] matrix for a 2-decision space would broadcast silently; a [3, K] one would fail deep in torch."""
    space = build_space(["x", "y"], ["int2", "int8"])
    shapes = [LayerShape("x", "conv", 10, 1), LayerShape("y", "conv", 10, 1)]
    cost = ExpectedCost(space, shapes)
    for bad in (torch.tensor([[1.0, 0.0]]), torch.ones(3, 2) / 2, torch.ones(2, 3) / 3):
        with pytest.raises(ValueError, match="expected probabilities for 2 decisions of at most 2 candidates"):
            cost(bad)


def test_expected_cost_with_uneven_decision_sizes_ignores_the_padding():
    """Architecture decisions (no bits) next to format decisions of fewer candidates: the padded entries of a
    [D, K] matrix count for nothing, and the format decisions give the enumerated cost on that architecture."""
    space, table = arch_space(), toy_arch_shapes()
    arch = {"b1": "k5e6", "b2": "k3e3"}
    shapes = table.shapes(arch)
    rng = random.Random(11)
    probs = _random_probs(space.sizes, rng)
    fmt = [d for d, dec in enumerate(space.decisions) if dec.kind == "format"]
    assert len(fmt) == 4 and max(space.sizes) == 3
    exact = {"bops": 0.0, "size": 0.0}
    for choices in itertools.product(*(range(space.sizes[d]) for d in fmt)):
        full = [0] * len(space.sizes)
        for d, c in zip(fmt, choices, strict=True):
            full[d] = c
        p = math.prod(probs[d][c] for d, c in zip(fmt, choices, strict=True))
        for kind in exact:
            exact[kind] += p * sample_cost(table, space.assignment(full), arch, 5_000, kind)
    for kind, value in exact.items():
        module = ExpectedCost(space, shapes, 5_000, kind)
        assert float(module(probs)) == pytest.approx(value, rel=1e-10), kind
        # Garbage in the padding (beyond each decision's size) must not change anything.
        padded = torch.full((len(probs), 3), 7.0, dtype=torch.float64)
        for d, p in enumerate(probs):
            padded[d, :len(p)] = torch.tensor(p, dtype=torch.float64)
        assert float(module(padded)) == pytest.approx(value, rel=1e-10), kind


@pytest.mark.parametrize("key", ["shared", "separate", "grouped_separate"])
def test_expected_cost_gradient_matches_finite_differences_of_the_enumeration(key):
    space, shapes = _space_and_shapes(key)
    probs = _random_probs(space.sizes, random.Random(3))
    for kind in ("bops", "size"):
        module = ExpectedCost(space, shapes, 20_000, kind)
        leaves = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in probs]
        module(leaves).backward()
        h = 1e-6
        got, want = [], []
        for d, leaf in enumerate(leaves):
            numeric = []
            for c in range(len(probs[d])):
                up = [list(p) for p in probs]
                down = [list(p) for p in probs]
                up[d][c] += h
                down[d][c] -= h
                numeric.append((_unnormalized_enumeration(space, up, shapes, 20_000, kind)
                                - _unnormalized_enumeration(space, down, shapes, 20_000, kind)) / (2 * h))
            # Off the simplex the two extensions differ; along it (directions summing to zero) they must agree:
            # compare the gradients with their means removed.
            numeric = torch.tensor(numeric, dtype=torch.float64)
            got.append(leaf.grad - leaf.grad.mean())
            want.append(numeric - numeric.mean())
        scale = max(float(w.abs().max()) for w in want)
        assert scale > 0
        for d, (g, w) in enumerate(zip(got, want, strict=True)):
            # (A size decision on activations has no gradient at all: both sides are zero, up to rounding.)
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-6 * scale), (kind, d, g, w)


def _unnormalized_enumeration(space, probs, shapes, total_params, kind):
    """sum_a prod_d probs[d][a_d] * cost(a), the rows not required to sum to one (a multilinear extension of the
    expected cost off the probability simplex)."""
    return sum(math.prod(probs[d][c] for d, c in enumerate(choices))
               * assignment_cost(shapes, space.assignment(choices), total_params, kind)
               for choices in itertools.product(*(range(n) for n in space.sizes)))


def test_shared_decision_uses_second_moment():
    """A decision setting both w and a gives E[bits^2], not E[bits]^2: the bilinear term matters."""
    shapes = [LayerShape("x", "conv", 1_000_000, 10)]
    probs = [[0.5, 0.5]]
    shared = build_space(["x"], ["int2", "int8"])
    assert expected_cost(shared, probs, shapes, None) == pytest.approx((0.5 * 4 + 0.5 * 64) * 1e-3, rel=1e-12)
    separate = build_space(["x"], ["int2", "int8"], shared_wa=False)
    assert expected_cost(separate, [[0.5, 0.5], [0.5, 0.5]], shapes, None) == pytest.approx(25 * 1e-3, rel=1e-12)
    # Size is linear in the weight bits: E[w bits] * params / 8 bytes, both ways.
    for space, p in ((shared, probs), (separate, [[0.5, 0.5], [0.5, 0.5]])):
        assert expected_cost(space, p, shapes, None, "size") == pytest.approx(10 * 5 / 8 / 1e6, rel=1e-12)


def test_expected_cost_uniform_probs_between_extremes():
    space = build_space(NAMES, ["int2", "int4", "int8"])
    lo = assignment_cost(SHAPES, space.uniform("int2"), None)
    hi = assignment_cost(SHAPES, space.uniform("int8"), None)
    uniform = expected_cost(space, [[1 / 3] * 3] * 4, SHAPES, None)
    assert lo < uniform < hi
    assert uniform == pytest.approx(sum(s.macs for s in SHAPES) * (4 + 16 + 64) / 3 / 1e9, rel=1e-12)


def test_bits_table_matches_formats():
    for name, bits in BITS.items():
        assert get_format(name).bits == bits


# ---------------------------------------------------------------- architecture decisions (FLIQNAS)

def _layer(block: str, macs: int) -> tuple[LayerShape, ...]:
    return (LayerShape(f"{block}.conv", "conv", macs, macs // 10),)


BLOCK_SHAPES = {  # a toy supernet: one fixed stem, two searchable blocks with one layer each, a head
    "b1": {"k3e3": _layer("b1", 100), "k5e3": _layer("b1", 300), "k3e6": _layer("b1", 200), "k5e6": _layer("b1", 600)},
    "b2": {"skip": (), "k3e3": _layer("b2", 50), "k5e3": _layer("b2", 150), "k3e6": _layer("b2", 100),
           "k5e6": _layer("b2", 300)},
}


def toy_arch_shapes():
    segments = (LayerShape("stem", "conv", 1_000, 90), "b1", "b2", LayerShape("head", "linear", 640, 650))
    return ArchShapes(segments, BLOCK_SHAPES, {"b1": "k3e6", "b2": "k3e6"})


def arch_space():
    return build_space(["stem", "b1.conv", "b2.conv", "head"], ["int4", "int8"],
                       blocks={"b1": ((3, 5), (3, 6)), "b2": ((3, 5), (0, 3, 6))})


def test_architecture_decisions_come_first_and_do_not_touch_formats():
    space = arch_space()
    assert [(d.name, d.kind) for d in space.decisions[:4]] == [
        ("b1:kernel", "kernel"), ("b1:expansion", "expansion"), ("b2:kernel", "kernel"), ("b2:expansion", "expansion")]
    assert space.decisions[3].candidates == ("skip", "e3", "e6")
    assert space.sizes == [2, 2, 2, 3, 2, 2, 2, 2]
    assert space.searches_architecture and not build_space(NAMES, ["int4"]).searches_architecture
    assert space.format_candidates == ("int4", "int8")
    choices = [1, 0, 0, 0, 1, 0, 1, 0]
    assert space.architecture(choices) == {"b1": "k5e3", "b2": "skip"}
    assert space.assignment(choices) == {"stem": {"w": "int8", "a": "int8"}, "b1.conv": {"w": "int4", "a": "int4"},
                                         "b2.conv": {"w": "int8", "a": "int8"}, "head": {"w": "int4", "a": "int4"}}
    assert set(space.uniform("int8")) == {"stem", "b1.conv", "b2.conv", "head"}


def _choice_cost(space, table, choices):
    return sample_cost(table, space.assignment(choices), space.architecture(choices), None)


def test_sample_cost_follows_the_sampled_architecture():
    space, table = arch_space(), toy_arch_shapes()
    # b1 = k5e6 (600 MACs) at int8, b2 skipped (no cost), stem int4, head int8: by hand.
    choices = [1, 1, 0, 0, 0, 1, 0, 1]
    assert _choice_cost(space, table, choices) == pytest.approx((1_000 * 16 + 600 * 64 + 640 * 64) / 1e9)
    # b2 = k3e6 at int4 now costs 100 x 16.
    choices = [1, 1, 0, 2, 0, 1, 0, 1]
    assert _choice_cost(space, table, choices) == pytest.approx((1_000 * 16 + 600 * 64 + 100 * 16 + 640 * 64) / 1e9)
    # No architecture given: the reference one (both blocks k3e6).
    shapes, kept = on_architecture(table, space.uniform("int4"))
    assert [s.macs for s in shapes] == [1_000, 200, 100, 640] and set(kept) == {"stem", "b1.conv", "b2.conv", "head"}
    assert table.smallest() == {"b1": "k3e3", "b2": "skip"} and table.largest() == {"b1": "k5e6", "b2": "k5e6"}
    assert [s.name for s in table.shapes({"b1": "k3e3", "b2": "skip"})] == ["stem", "b1.conv", "head"]


def test_only_architecture_decisions_when_every_layer_is_pinned():
    space = build_space(["stem", "b1.conv"], ["int4"], pinned={"*": "fp32"}, blocks={"b1": ((3,), (3, 6))})
    assert [d.kind for d in space.decisions] == ["kernel", "expansion"]
    assert space.assignment([0, 1]) == {"stem": {"w": "fp32", "a": "fp32"}, "b1.conv": {"w": "fp32", "a": "fp32"}}
    with pytest.raises(BadInput, match="nothing to search"):
        build_space(["stem"], ["int4"], pinned={"*": "fp32"})


def test_a_skipped_blocks_decisions_are_inactive():
    """Decisions: b1:kernel, b1:expansion, b2:kernel, b2:expansion, stem, b1.conv, b2.conv, head."""
    space = arch_space()
    kept = [1, 0, 0, 1, 1, 0, 1, 0]  # b2 at e3: every decision shaped the sample
    assert space.active(kept) == [True] * 8
    skipped = [1, 0, 0, 0, 1, 0, 1, 0]  # b2 skipped: its kernel and its conv's format did nothing
    assert space.active(skipped) == [True, True, False, True, True, True, False, True]
    assert build_space(NAMES, ["int4", "int8"]).active([0] * len(NAMES)) == [True] * len(NAMES)
    # A group decision with a layer outside the skipped block stays active.
    grouped = build_space(["stem", "b1.conv", "b2.conv", "head"], ["int4", "int8"], groups={"b*.conv": "convs"},
                          blocks={"b1": ((3, 5), (3, 6)), "b2": ((3, 5), (0, 3, 6))})
    assert [d.name for d in grouped.decisions][4:] == ["stem", "convs", "head"]
    assert grouped.active([1, 0, 0, 0, 1, 0, 1]) == [True, True, False, True, True, True, True]


def test_choices_of_inverts_assignment():
    space = build_space(NAMES, ["int2", "int4", "int8"], groups={NAMES[1]: "g", NAMES[2]: "g"})
    for choices in itertools.product(*(range(n) for n in space.sizes)):
        assert space.choices_of(space.assignment(list(choices))) == list(choices)
    mixed = space.assignment([0] * len(space.sizes))
    mixed[NAMES[2]] = {"w": "int8", "a": "int8"}  # breaks the group's shared decision
    with pytest.raises(BadInput, match="not one of this space"):
        space.choices_of(mixed)
