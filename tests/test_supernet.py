"""The FLIQNAS supernet: weight sharing, architectures as data, cost per architecture, standalone extraction."""

from __future__ import annotations

import random

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from fliqs.errors import BadInput
from fliqs.models.registry import create_model
from fliqs.models.supernet import (
    BlockChoice,
    ElasticBatchNorm2d,
    ElasticConv2d,
    InvertedResidual,
    SearchableBlock,
    block_options,
    extract,
    format_architecture,
    get_architecture,
    measure_architectures,
    parse_architecture,
    searchable_blocks,
    set_architecture,
)
from fliqs.quant.cost import measure_layers, summarize
from fliqs.quant.layers import quant_layers, quantize_model, set_assignment
from fliqs.searchers.space import build_space, sample_cost

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = ["int4", "int8", "fp4_e2m1", "fp6_e3m2", "fp8_e4m3"]


def random_architecture(model, rng: random.Random) -> dict[str, BlockChoice]:
    return {name: rng.choice(block.options) for name, block in searchable_blocks(model)}


@pytest.fixture
def supernet():
    torch.manual_seed(0)
    return create_model("fliqnas_digits", num_classes=10, in_chans=1)


def test_smaller_kernel_is_the_centre_of_the_largest():
    torch.manual_seed(0)
    block = SearchableBlock(8, 8, 1)
    block.set_choice(BlockChoice(3, 6))
    dw = block.depthwise
    assert dw.weight.shape[-1] == 7
    assert torch.equal(dw.active_weight(), dw.weight[:, :, 2:5, 2:5])
    block.set_choice(BlockChoice(5, 6))
    assert torch.equal(dw.active_weight(), dw.weight[:, :, 1:6, 1:6])
    # The k=3 forward is a plain 3x3 depthwise conv with the centre crop, and only the centre gets gradients.
    block.set_choice(BlockChoice(3, 6))
    x = torch.randn(2, 48, 5, 5)
    expected = F.conv2d(x, dw.weight.detach()[:, :, 2:5, 2:5], padding=1, groups=48)
    out = dw(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    grad = dw.weight.grad
    assert grad[:, :, 2:5, 2:5].abs().sum() > 0
    outside = grad.clone()
    outside[:, :, 2:5, 2:5] = 0
    assert outside.abs().sum() == 0


def test_smaller_expansion_is_the_first_channels():
    torch.manual_seed(0)
    block = SearchableBlock(8, 8, 1)
    block.set_choice(BlockChoice(5, 3))  # 24 of the 48 inner channels
    assert block.expand.active_weight().shape == (24, 8, 1, 1)
    assert torch.equal(block.expand.active_weight(), block.expand.weight[:24])
    assert torch.equal(block.project.active_weight(), block.project.weight[:, :24])
    block(torch.randn(4, 8, 6, 6)).sum().backward()
    assert block.expand.weight.grad[24:].abs().sum() == 0 and block.expand.weight.grad[:24].abs().sum() > 0
    assert block.project.weight.grad[:, 24:].abs().sum() == 0
    assert block.depthwise.weight.grad[24:].abs().sum() == 0
    assert block.bn1.weight.grad[24:].abs().sum() == 0


def test_elastic_batchnorm_updates_only_the_active_statistics():
    bn = ElasticBatchNorm2d(6)
    bn.train()
    bn(torch.randn(8, 4, 3, 3) + 5)
    assert (bn.running_mean[:4] > 0.3).all()
    assert torch.equal(bn.running_mean[4:], torch.zeros(2)) and torch.equal(bn.running_var[4:], torch.ones(2))


def test_elastic_batchnorm_averages_cumulatively_like_batchnorm():
    """momentum=None (BatchNorm recalibration): the running statistics of the active channels are the cumulative
    average over the batches, as nn.BatchNorm2d computes them on the same channels."""
    elastic, plain = ElasticBatchNorm2d(6, momentum=None), torch.nn.BatchNorm2d(4, momentum=None)
    elastic.train(), plain.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 4, 3, 3, generator=gen) * 2 + 1
        elastic(x), plain(x)
    torch.testing.assert_close(elastic.running_mean[:4], plain.running_mean)
    torch.testing.assert_close(elastic.running_var[:4], plain.running_var)
    assert torch.equal(elastic.running_mean[4:], torch.zeros(2))


def test_skip_only_where_the_block_keeps_its_shape(supernet):
    options = block_options(supernet)
    for name, block in searchable_blocks(supernet):
        skippable = block.stride == 1 and block.in_channels == block.out_channels
        assert (0 in options[name][1]) == skippable, name
    assert any(0 in e for _, e in options.values()) and any(0 not in e for _, e in options.values())
    name, block = next((n, b) for n, b in searchable_blocks(supernet) if 0 in b.expansions)
    x = torch.randn(2, block.in_channels, 4, 4)
    block.set_choice(BlockChoice(3, 0))
    assert torch.equal(block(x), x)


def test_default_architecture_is_mobilenetv2_counted_like_timm():
    """The supernet at its default choice is MobileNetV2: timm's mobilenetv2_100 is an independent reference."""
    ours = measure_layers(create_model("fliqnas_mbv2"), 224, 3)
    reference = measure_layers(timm.create_model("mobilenetv2_100", pretrained=False), 224, 3)
    assert sum(s.macs for s in ours) == sum(s.macs for s in reference) == 300_774_272
    assert sorted(s.macs for s in ours) == sorted(s.macs for s in reference)
    assert sum(s.weight_params for s in ours) == sum(s.weight_params for s in reference)


def test_block_macs_by_hand():
    block = SearchableBlock(16, 24, 2)
    block.set_choice(BlockChoice(5, 3))
    model = nn.Sequential(block)
    shapes = {s.name: s.macs for s in measure_layers(model, 8, 16)}
    mid = 16 * 3
    assert shapes == {"0.expand": 8 * 8 * 16 * mid, "0.depthwise": 4 * 4 * mid * 5 * 5, "0.project": 4 * 4 * mid * 24}


def test_architecture_labels_round_trip_and_bad_labels(supernet):
    rng = random.Random(0)
    arch = random_architecture(supernet, rng)
    text = format_architecture(arch)
    assert parse_architecture(supernet, text) == arch
    assert format_architecture({n: b.default_choice() for n, b in searchable_blocks(supernet)}) == \
        ",".join(["k3e6"] * len(arch))
    with pytest.raises(BadInput, match="entries"):
        parse_architecture(supernet, "k3e6")
    first_fixed = [b.expansions for _, b in searchable_blocks(supernet)].index((3, 6))
    labels = ["k3e6"] * len(arch)
    labels[first_fixed] = "skip"
    with pytest.raises(BadInput, match="options are"):
        parse_architecture(supernet, ",".join(labels))
    with pytest.raises(BadInput, match="neither"):
        parse_architecture(supernet, ",".join(["k3x6"] * len(arch)))
    model = create_model("fliqnas_digits", num_classes=10, in_chans=1, arch=text)
    assert get_architecture(model) == arch


def test_cost_of_every_sampled_architecture_equals_the_extracted_model(supernet):
    """The cost the controller sees (a table, no forward) equals a measurement of the standalone network."""
    layers = quantize_model(supernet)
    table = measure_architectures(supernet, 8, 1)
    space = build_space([layer.name for layer in layers], FORMATS, blocks=block_options(supernet))
    rng = random.Random(1)
    seen = set()
    for _ in range(12):
        choices = [rng.randrange(n) for n in space.sizes]
        arch = space.architecture(choices)
        seen.update(arch.values())
        set_architecture(supernet, arch)
        standalone = extract(supernet)
        measured = measure_layers(standalone, 8, 1)
        assert table.shapes(arch) == measured == measure_layers(supernet, 8, 1)
        # The extracted model's own layers decide which formats count (independent of on_architecture's filter).
        assignment = {q.name: space.assignment(choices)[q.name] for q in quant_layers(standalone)}
        cost = sample_cost(table, space.assignment(choices), arch, None)
        assert cost == pytest.approx(summarize(measured, assignment).gbops)
    assert "skip" in seen and len(seen) >= 5


def test_extracted_model_computes_what_the_supernet_computes(supernet, digits_tensors):
    """Same choices, same formats, same calibration: the standalone network's outputs and accuracy are the
    supernet's, and no supernet module is left in it."""
    (x, y), _ = digits_tensors
    x, y = x[:300], y[:300]
    layers = quantize_model(supernet, range_mode="ema")
    supernet.train()
    for _ in range(3):
        supernet(x[:128])  # calibrate activation ranges and BatchNorm statistics under several architectures
        set_architecture(supernet, random_architecture(supernet, random.Random(_)))
    rng = random.Random(2)
    for _ in range(4):
        arch = random_architecture(supernet, rng)
        set_architecture(supernet, arch)
        set_assignment(layers, {layer.name: rng.choice(FORMATS) for layer in layers})
        before = {k: v.clone() for k, v in supernet.state_dict().items()}
        standalone = extract(supernet)
        assert not any(isinstance(m, SearchableBlock | ElasticConv2d | ElasticBatchNorm2d)
                       for m in standalone.modules())
        assert any(isinstance(m, InvertedResidual) for m in standalone.modules())
        assert [q.name for q in quant_layers(standalone)] == [s.name for s in measure_layers(standalone, 8, 1)]
        supernet.eval()
        standalone.eval()
        with torch.no_grad():
            a, b = supernet(x), standalone(x)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert (a.argmax(-1) == y).float().mean() == (b.argmax(-1) == y).float().mean()
        assert all(torch.equal(v, before[k]) for k, v in supernet.state_dict().items())  # supernet unchanged
        assert get_architecture(supernet) == arch
        supernet.train()


def test_width_multiplier_and_unknown_kwargs():
    wide = create_model("fliqnas_digits", num_classes=10, in_chans=1)
    narrow = create_model("fliqnas_digits", num_classes=10, in_chans=1, width_mult=0.5)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())
    with pytest.raises(BadInput, match="unexpected keyword"):
        create_model("fliqnas_digits", num_classes=10, in_chans=1, depth=3)
    with pytest.raises(BadInput, match="preset"):
        create_model("fliqnas_digits", preset="nope")
