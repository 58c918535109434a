"""fliqs.quant.cost: MACs by hand, BOPs = MACs x w bits x a bits, model size, attention matmuls (FLIQS.md 5)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from fliqs.errors import BadInput
from fliqs.models.registry import create_model
from fliqs.quant.cost import measure_layers, model_cost, summarize
from fliqs.quant.layers import quantize_model

# Total bit widths, written out here (FLIQS.md: an FP format counts its total width, full precision 32).
BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8, "fp4_e2m1": 4, "fp6_e2m3": 6, "fp6_e3m2": 6,
        "fp8_e4m3": 8, "fp8_e5m2": 8, "bf16": 16, "fp16": 16, "fp32": 32}

H = W = 16


class HandNet(nn.Module):
    """A grouped conv, a depthwise conv, a strided conv, a Linear on (B, tokens, C) input, a classifier."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(3, 12, 3, padding=1, groups=3)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.strided = nn.Conv2d(12, 24, 3, stride=2, padding=1)
        self.tokens = nn.Linear(24, 40)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        x = self.strided(self.depthwise(self.grouped(x)))
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        t = self.tokens(t)
        return self.head(t.mean(dim=1))


def _out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def hand_macs() -> dict[str, int]:
    # conv: output elements x (in_channels / groups) x kh x kw
    g = 12 * _out(H, 3, 1, 1) * _out(W, 3, 1, 1) * (3 // 3) * 3 * 3
    d = 12 * _out(H, 3, 1, 1) * _out(W, 3, 1, 1) * (12 // 12) * 3 * 3
    so = _out(H, 3, 2, 1)
    s = 24 * so * so * 12 * 3 * 3
    n_tokens = so * so
    t = n_tokens * 40 * 24  # linear on tokens: every token is a matrix-vector product
    h = 5 * 40
    return {"grouped": g, "depthwise": d, "strided": s, "tokens": t, "head": h}


def hand_weights() -> dict[str, int]:
    return {"grouped": 12 * 1 * 9, "depthwise": 12 * 1 * 9, "strided": 24 * 12 * 9, "tokens": 40 * 24,
            "head": 5 * 40}


def test_hand_counted_macs():
    shapes = measure_layers(HandNet(), H, 3)
    assert [s.name for s in shapes] == list(hand_macs())
    assert {s.name: s.macs for s in shapes} == hand_macs()
    assert {s.name: s.weight_params for s in shapes} == hand_weights()
    assert [s.kind for s in shapes] == ["conv", "conv", "conv", "linear", "linear"]


def test_quantized_model_measures_the_same():
    plain = measure_layers(HandNet(), H, 3)
    model = HandNet()
    quantize_model(model, default="int4")
    assert measure_layers(model, H, 3) == plain


def test_measure_restores_training_mode():
    model = HandNet().train()
    measure_layers(model, H, 3)
    assert model.training


def test_resnet18_gmacs_and_uniform_fp8():
    model = timm.create_model("resnet18")
    shapes = measure_layers(model, 224, 3)
    total_params = sum(p.numel() for p in model.parameters())
    summary = summarize(shapes, total_params=total_params)
    assert summary.gmacs == pytest.approx(1.814, rel=0.005)
    assert summary.gbops == pytest.approx(summary.gmacs * 32 * 32, rel=1e-12)  # default fp32 x fp32
    assert summary.size_mb == pytest.approx(total_params * 4 / 1e6, rel=1e-12)
    fp8 = summarize(shapes, default="fp8_e4m3", total_params=total_params)
    assert sum(layer.bops for layer in fp8.layers) == 64 * sum(layer.macs for layer in fp8.layers)
    assert fp8.gbops == pytest.approx(64 * fp8.gmacs, rel=1e-12)
    assert model_cost(model, 224, 3, default="fp8_e4m3") == fp8


@pytest.mark.parametrize("fmt,bits", [("fp8_e4m3", 8), ("int4", 4), ("fp4_e2m1", 4), ("bf16", 16)])
def test_uniform_format_bops(fmt, bits):
    summary = model_cost(HandNet(), H, 3, default=fmt)
    total_macs = sum(hand_macs().values())
    assert sum(layer.bops for layer in summary.layers) == total_macs * bits * bits
    for layer in summary.layers:
        assert layer.bops == layer.macs * bits * bits
        assert layer.w_format == layer.a_format == fmt
    assert summary.gmacs == pytest.approx(total_macs / 1e9, rel=1e-12)
    assert summary.gbops == pytest.approx(summary.gmacs * bits * bits, rel=1e-12)


def test_mixed_assignment():
    assignment = {
        "grouped": ("int8", "fp8_e5m2"),
        "depthwise": {"w": "int2", "a": "int4"},
        "strided": "fp6_e3m2",
        "tokens": ("fp4_e2m1", "bf16"),
        # head: not assigned -> default
    }
    summary = model_cost(HandNet(), H, 3, assignment, default="int3")
    macs = hand_macs()
    expected_pairs = {"grouped": ("int8", "fp8_e5m2"), "depthwise": ("int2", "int4"),
                      "strided": ("fp6_e3m2", "fp6_e3m2"), "tokens": ("fp4_e2m1", "bf16"),
                      "head": ("int3", "int3")}
    total = 0
    for layer in summary.layers:
        w, a = expected_pairs[layer.name]
        assert (layer.w_format, layer.a_format) == (w, a)
        assert layer.bops == macs[layer.name] * BITS[w] * BITS[a]
        total += macs[layer.name] * BITS[w] * BITS[a]
    assert summary.gbops == pytest.approx(total / 1e9, rel=1e-12)


def test_size_mb():
    model = HandNet()
    assignment = {"grouped": "int8", "depthwise": ("int2", "fp32"), "strided": "fp4_e2m1", "tokens": "bf16"}
    summary = model_cost(model, H, 3, assignment, default="fp32")
    w_bits = {"grouped": 8, "depthwise": 2, "strided": 4, "tokens": 16, "head": 32}
    weights = {name: model.get_submodule(name).weight.numel() for name in w_bits}
    total_params = sum(p.numel() for p in model.parameters())
    other = total_params - sum(weights.values())  # the biases
    assert other == 12 + 24 + 40 + 5
    expected_bits = sum(weights[n] * w_bits[n] for n in w_bits) + other * 32
    assert summary.size_mb == pytest.approx(expected_bits / 8 / 1e6, rel=1e-12)
    # fp32 everywhere: 4 bytes per parameter.
    assert model_cost(model, H, 3).size_mb == pytest.approx(total_params * 4 / 1e6, rel=1e-12)
    # Without total_params only the quantized weights count.
    shapes = measure_layers(model, H, 3)
    bare = summarize(shapes, assignment)
    assert bare.size_mb == pytest.approx(sum(weights[n] * w_bits[n] for n in w_bits) / 8 / 1e6, rel=1e-12)


def test_vit_attention_matmuls():
    model = timm.create_model("test_vit")
    img = model.pretrained_cfg["input_size"][-1]
    patch = model.patch_embed.patch_size[0]
    n_tokens = (img // patch) ** 2 + model.num_prefix_tokens
    width = model.embed_dim
    depth = len(model.blocks)
    summary = model_cost(model, img, 3, default="fp8_e4m3")
    attn = [layer for layer in summary.layers if layer.kind == "attn_matmul"]
    assert [layer.name for layer in attn] == [f"blocks.{i}.attn.attn_matmul" for i in range(depth)]
    for layer in attn:
        assert layer.macs == 2 * n_tokens**2 * width  # q @ k^T and attn @ v
        assert (layer.w_format, layer.a_format) == ("fp32", "fp32")
        assert layer.bops == layer.macs * 32 * 32
        assert layer.weight_params == 0
    by_name = {layer.name: layer for layer in summary.layers}
    qkv = by_name["blocks.0.attn.qkv"]
    assert qkv.macs == n_tokens * 3 * width * width  # a Linear on 3-D token input counts every token
    assert qkv.bops == qkv.macs * 64
    non_attn = [layer for layer in summary.layers if layer.kind != "attn_matmul"]
    expected = sum(layer.macs * 64 for layer in non_attn) + sum(layer.macs * 1024 for layer in attn)
    assert sum(layer.bops for layer in summary.layers) == expected


def test_unknown_layer_in_assignment_raises():
    with pytest.raises(BadInput, match="no_such_layer"):
        model_cost(HandNet(), H, 3, {"no_such_layer": "int8"})


def test_unknown_format_in_assignment_raises():
    with pytest.raises(BadInput):
        model_cost(HandNet(), H, 3, {"head": "int7"})


def test_to_dict_shape():
    d = model_cost(HandNet(), H, 3, default="int8").to_dict()
    assert set(d) == {"gmacs", "gbops", "size_mb", "layers"}
    assert {"name", "macs", "w_format", "a_format", "bops"} <= set(d["layers"][0])


def test_fliqs_cnn_cost_at_native_size():
    model = create_model("fliqs_cnn")
    shapes = {s.name: s.macs for s in measure_layers(model, 8, 1)}
    assert shapes == {"features.0": 32 * 8 * 8 * 1 * 9, "features.3": 64 * 4 * 4 * 32 * 9,
                      "features.6": 64 * 4 * 4 * 64 * 9, "head": 10 * 64}
    assert torch.is_grad_enabled()
