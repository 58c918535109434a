"""fliqs.searchers.relaxed: expected cost of a relaxed search, installation and removal of the mixtures."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from fliqs.errors import BadInput
from fliqs.models.registry import create_model
from fliqs.quant.cost import measure_layers, summarize
from fliqs.quant.layers import QuantLayer, get_assignment, quant_layers, quantize_model
from fliqs.searchers import methods
from fliqs.searchers.dnas import DNASSearch
from fliqs.searchers.edmips import EdMIPSSearch
from fliqs.searchers.relaxed import MixedQuantLayer
from fliqs.searchers.space import build_space

CANDIDATES = ["int2", "int4", "fp8_e4m3"]
SPACES = {"shared": {}, "separate": {"shared_wa": False}, "weight_only": {"weight_only": True}}


def tiny():
    """A 2-layer model (conv 1->4 on 4x4, linear 64->3) with its QuantLayers and shapes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    layers = quantize_model(model)
    shapes = measure_layers(model, 4, 1)
    return model, layers, shapes


def random_probs(space, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(k, generator=gen, dtype=torch.float64).softmax(0) for k in space.sizes]


def enumerated_gbops(space, shapes, probs):
    """E[GBOPs] by exact enumeration: sum over every assignment of prob(assignment) * its summarized GBOPs."""
    return sum(math.prod(float(p[c]) for p, c in zip(probs, choices, strict=True))
               * summarize(shapes, space.assignment(choices)).gbops
               for choices in itertools.product(*(range(k) for k in space.sizes)))


@pytest.mark.parametrize("kind", SPACES)
def test_expected_gbops_of_one_hot_probs_is_the_assignment_cost(kind):
    _, layers, shapes = tiny()
    space = build_space([layer.name for layer in layers], CANDIDATES, **SPACES[kind])
    search = EdMIPSSearch(space, layers, shapes, target=1.0)
    for choices in itertools.product(*(range(k) for k in space.sizes)):
        probs = [torch.nn.functional.one_hot(torch.tensor(c), k).double()
                 for c, k in zip(choices, space.sizes, strict=True)]
        exact = summarize(shapes, space.assignment(choices)).gbops
        assert float(search.expected_gbops(probs)) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("kind", SPACES)
def test_expected_gbops_is_the_exact_expectation(kind):
    _, layers, shapes = tiny()
    space = build_space([layer.name for layer in layers], CANDIDATES, **SPACES[kind])
    search = EdMIPSSearch(space, layers, shapes, target=1.0)
    probs = random_probs(space)
    exact = enumerated_gbops(space, shapes, probs)
    assert float(search.expected_gbops(probs)) == pytest.approx(exact, rel=1e-6)
    assert search.expected_gbops(probs).dtype == torch.float32  # the loss term's dtype
    # Plain lists of floats are accepted, as is a padded [D, K] matrix; the default is softmax of the (zero)
    # logits: uniform.
    assert float(search.expected_gbops([p.tolist() for p in probs])) == pytest.approx(exact, rel=1e-6)
    assert float(search.expected_gbops(torch.stack(probs))) == pytest.approx(exact, rel=1e-6)
    uniform = [torch.full((k,), 1 / k) for k in space.sizes]
    assert float(search.expected_gbops().detach()) == pytest.approx(float(search.expected_gbops(uniform)), rel=1e-6)


@pytest.mark.parametrize("shared_wa", [True, False])
def test_expected_gbops_on_a_real_model_with_pins_and_groups_is_the_exact_expectation(shared_wa):
    model = create_model("fliqs_cnn", num_classes=10, in_chans=1)
    layers = quantize_model(model, pinned={"head": "int8"})
    shapes = measure_layers(model, 8, 1)
    space = build_space([layer.name for layer in layers], ["int2", "int3", "int4", "int8", "fp4_e2m1"],
                        pinned={"head": "int8"}, groups={"features.[36]": "deep"}, shared_wa=shared_wa)
    assert [d.name for d in space.decisions] == (
        ["features.0", "deep"] if shared_wa else ["features.0:w", "features.0:a", "deep:w", "deep:a"])
    search = EdMIPSSearch(space, layers, shapes, target=1.0)
    probs = random_probs(space, seed=3)
    assert float(search.expected_gbops(probs)) == pytest.approx(enumerated_gbops(space, shapes, probs), rel=1e-6)


def test_expected_gbops_is_differentiable_and_favours_cheap_formats():
    _, layers, shapes = tiny()
    space = build_space([layer.name for layer in layers], CANDIDATES)
    search = EdMIPSSearch(space, layers, shapes, target=1.0)
    search.expected_gbops().backward()
    for alpha in search.alphas:
        # d E / d alpha_k = p_k (bits_k^2 - E[bits^2]): negative for int2, positive for the 8-bit format.
        assert alpha.grad[0] < 0 < alpha.grad[2]
        assert float(alpha.grad.sum()) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("cls", [EdMIPSSearch, DNASSearch])
def test_install_keeps_parameters_and_keys_and_remove_restores_plain_layers(cls):
    model, layers, shapes = tiny()
    space = build_space([layer.name for layer in layers], CANDIDATES)
    kwargs = {"total_steps": 10} if cls is DNASSearch else {}
    names = [n for n, _ in model.named_modules()]
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    search = cls(space, layers, shapes, target=1.0, **kwargs).install(model)
    assert all(type(m) is MixedQuantLayer for m in quant_layers(model))
    assert [n for n, _ in model.named_modules()] == names
    assert list(model.state_dict()) == keys
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert not {id(p) for p in search.parameters()} & {id(p) for p in model.parameters()}
    assert [p.shape for p in search.parameters()] == [torch.Size([3]), torch.Size([3])]
    with pytest.raises(RuntimeError, match="already installed"):
        search.install(model)
    model.eval()
    model(torch.randn(2, 1, 4, 4))
    search.remove()
    assert not search.installed
    assert [type(m) for m in model.modules() if isinstance(m, QuantLayer)] == [QuantLayer, QuantLayer]
    assert quant_layers(model) == layers
    assert not layers[0].training  # the mode set while installed carries over
    assert [n for n, _ in model.named_modules()] == names
    assert dict(model.named_parameters()) == params


def test_apply_final_sets_the_argmax_assignment():
    model, layers, shapes = tiny()
    space = build_space([layer.name for layer in layers], CANDIDATES, shared_wa=False)
    search = EdMIPSSearch(space, layers, shapes, target=1.0).install(model)
    with torch.no_grad():
        for alpha, best in zip(search.alphas, [2, 0, 1, 2], strict=True):
            alpha[best] = 1.0
    assert search.final_choices() == [2, 0, 1, 2]
    assignment = search.apply_final()
    assert assignment == space.assignment([2, 0, 1, 2])
    assert get_assignment(layers) == {"0": {"w": "fp8_e4m3", "a": "int2"}, "3": {"w": "int4", "a": "fp8_e4m3"}}
    assert all(type(m) is QuantLayer for m in quant_layers(model))


def test_weight_only_space_fixes_the_activation_format_and_pinned_layers_stay_plain():
    model = create_model("fliqs_cnn", num_classes=10, in_chans=1)
    layers = quantize_model(model, pinned={"features.0": "int8"})
    shapes = measure_layers(model, 8, 1)
    space = build_space([layer.name for layer in layers], CANDIDATES, weight_only=True,
                        activation_format="bf16", pinned={"features.0": "int8"})
    search = EdMIPSSearch(space, layers, shapes, target=1.0).install(model)
    assert [type(m).__name__ for m in quant_layers(model)] == ["QuantLayer"] + ["MixedQuantLayer"] * 3
    assert all(m.a_decision is None and m.w_decision is not None for m in quant_layers(model)[1:])
    assert [m.a_format.name for m in layers] == ["int8", "bf16", "bf16", "bf16"]
    search.apply_final()
    assert get_assignment(layers)["head"] == {"w": "int2", "a": "bf16"}


def test_the_registry_names_the_differentiable_search_classes():
    differentiable = {name: methods.resolve(m.searcher) for name, m in methods.METHODS.items()
                      if m.family == methods.DIFFERENTIABLE}
    assert differentiable == {"edmips": EdMIPSSearch, "dnas": DNASSearch}
    assert all(cls.method == name for name, cls in differentiable.items())


def test_bad_inputs():
    model, layers, shapes = tiny()
    space = build_space([layer.name for layer in layers], CANDIDATES)
    with pytest.raises(BadInput, match="target"):
        EdMIPSSearch(space, layers, shapes, target=0.0)
    with pytest.raises(BadInput, match="unknown method 'darts'; valid: fliqs, "):
        methods.get("darts")
    other = build_space(["0", "missing"], CANDIDATES)
    with pytest.raises(BadInput, match="not a quantized layer"):
        EdMIPSSearch(other, layers, shapes, target=1.0)
    layers[0].pinned = True
    with pytest.raises(BadInput, match="pinned"):
        EdMIPSSearch(space, layers, shapes, target=1.0)
    layers[0].pinned = False
    search = EdMIPSSearch(space, layers, shapes, target=1.0)
    with pytest.raises(BadInput, match="not found in the model"):
        search.install(nn.Sequential(nn.Linear(2, 2)))
    assert not search.installed


def test_dnas_trains_weights_and_logits_on_disjoint_parts_of_the_training_split():
    from torch.utils.data import TensorDataset

    from fliqs.run.config import ConfigError
    from fliqs.run.loading import load_config
    from fliqs.trainables.differentiable import Relaxed

    data = TensorDataset(torch.arange(100.0)[:, None], torch.zeros(100, dtype=torch.long))
    weights, logits = Relaxed.split_train(load_config(["method=dnas", "train.epochs=12"]), data)
    w, a = {int(x) for x, _ in weights}, {int(x) for x, _ in logits}
    assert len(a) == 20 and len(w) == 80 and not w & a
    again = Relaxed.split_train(load_config(["method=dnas", "train.epochs=12"]), data)[1]
    assert {int(x) for x, _ in again} == a  # a fixed split (by data.seed): a resumed run keeps it
    assert Relaxed.split_train(load_config(["method=edmips"]), data) == (data, None)
    with pytest.raises(ConfigError, match="no epoch of architecture search"):
        load_config(["method=dnas", "train.epochs=10", "relaxed.arch_warmup_epochs=10"])
