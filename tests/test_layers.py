"""fliqs.quant.layers: model surgery on timm models, exactness of the wrapped forward, in-place format switches,
pins, activation ranges, and one compiled graph for every assignment."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import timm
import timm.layers
import torch
from torch import nn

from fliqs.errors import BadInput
from fliqs.models.registry import create_model
from fliqs.quant.formats import FORMATS, UnknownFormatError, get_format
from fliqs.quant.layers import (
    FormatQuantizer,
    QuantLayer,
    get_assignment,
    quant_layers,
    quantize_model,
    replace_module,
    set_assignment,
)
from fliqs.quant.policy import RangeMode
from fliqs.quant.rounding import format_tensor

F32 = np.float32


class TimmLayersNet(nn.Module):
    """timm's conv/linear subclasses that override forward: 'same' padding, weight standardisation, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = timm.layers.Conv2dSame(3, 8, 3, stride=2)
        self.act = nn.ReLU()
        self.std = timm.layers.StdConv2d(8, 16, 3, stride=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = timm.layers.Linear(16, 10)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.grouped(self.act(self.std(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# name -> (constructor, input shape). Small inputs keep the CPU run short; test_vit needs its native 160 px.
MODELS = {
    "resnet10t": (lambda: timm.create_model("resnet10t", num_classes=10), (2, 3, 48, 48)),
    "test_resnet": (lambda: timm.create_model("test_resnet", num_classes=10), (2, 3, 32, 32)),
    "test_vit": (lambda: timm.create_model("test_vit", num_classes=10), (1, 3, 160, 160)),
    "timm_layers": (TimmLayersNet, (2, 3, 15, 15)),  # odd size: Conv2dSame pads asymmetrically
}


def _seeded(name):
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    x = torch.randn(*MODELS[name][1], generator=torch.Generator().manual_seed(1))
    return model, x


def _conv_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def np_fake_quant(x: np.ndarray, bits: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric integer fake quantization in numpy (FLIQS.md section 4): amax maps to qmax = 2^(b-1)-1.

    Float32 throughout: y = x * (qmax / amax), codes = clip(round_half_even(y), -qmax, qmax), back to
    x units as codes / qmax * amax. Returns (dequantized, codes)."""
    x = x.astype(F32)
    qmax = F32(2 ** (bits - 1) - 1)
    if per_channel:
        amax = np.abs(x).reshape(x.shape[0], -1).max(axis=1).reshape(-1, *([1] * (x.ndim - 1)))
    else:
        amax = np.abs(x).max()
    amax = np.maximum(amax, F32(1e-30)).astype(F32)
    codes = np.clip(np.round(x * (qmax / amax)), -qmax, qmax).astype(F32)
    return (codes / qmax * amax).astype(F32), codes


# ----------------------------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("name", list(MODELS))
def test_every_conv_linear_is_wrapped_in_module_order(name):
    model, _ = _seeded(name)
    expected = _conv_linear_names(model)
    originals = {n: model.get_submodule(n) for n in expected}
    layers = quantize_model(model)
    assert [layer.name for layer in layers] == expected
    assert len(layers) == len(expected) > 0
    for layer in layers:
        assert isinstance(layer, QuantLayer)
        assert model.get_submodule(layer.name) is layer
        assert layer.layer is originals[layer.name]  # wraps the original object, class kept
        assert layer.kind == ("conv" if isinstance(layer.layer, nn.Conv2d) else "linear")
        assert layer.w_format.name == layer.a_format.name == "fp32"
    # No conv/linear is left outside a QuantLayer.
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            parent = model.get_submodule(mod_name.rpartition(".")[0])
            assert isinstance(parent, QuantLayer), mod_name
    assert quant_layers(model) == layers
    assert quantize_model(model) == layers  # idempotent: the second call returns the existing layers
    # Stable across runs: a fresh model gets the same names.
    fresh, _ = _seeded(name)
    assert [layer.name for layer in quantize_model(fresh)] == expected


def test_replace_module_swaps_top_level_and_nested_children_and_returns_the_old():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    first, nested = model[0], model[1][1]
    new_top, new_nested = nn.Identity(), nn.Linear(2, 2, bias=False)
    assert replace_module(model, "0", new_top) is first
    assert model[0] is new_top
    assert replace_module(model, "1.1", new_nested) is nested
    assert model[1][1] is new_nested and model.get_submodule("1.1") is new_nested
    assert type(model[1][0]) is nn.ReLU  # siblings untouched
    assert [n for n, _ in model.named_modules()] == ["", "0", "1", "1.0", "1.1"]
    # Swapping back restores the original objects; named attributes of a plain module work the same.
    assert replace_module(model, "1.1", nested) is new_nested and model[1][1] is nested
    net = TimmLayersNet()
    fc = net.fc
    assert replace_module(net, "fc", new_top) is fc and net.fc is new_top
    with pytest.raises(AttributeError):
        replace_module(net, "nope.child", new_top)


def test_timm_layer_classes_are_kept():
    model, _ = _seeded("timm_layers")
    layers = {layer.name: layer for layer in quantize_model(model)}
    assert type(layers["stem"].layer) is timm.layers.Conv2dSame
    assert type(layers["std"].layer) is timm.layers.StdConv2d
    assert type(layers["fc"].layer) is timm.layers.Linear


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_forward_is_exactly_the_original(name):
    model, x = _seeded(name)
    original = copy.deepcopy(model)
    quantize_model(model)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def _capture_layer_io(model, layers, x):
    records = {}

    def hook(mod, inputs, out):  # returns None: the output is left alone
        assert mod.name not in records, f"{mod.name} called twice"
        records[mod.name] = (inputs[0].detach().clone(), out.detach().clone())

    hooks = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return records


@pytest.mark.parametrize("name", list(MODELS))
def test_int8_forward_equals_original_module_on_numpy_quantized_weights(name):
    model, x = _seeded(name)
    layers = quantize_model(model, default="int8")
    records = _capture_layer_io(model, layers, x)
    assert set(records) == {layer.name for layer in layers}
    for layer in layers:
        inp, out = records[layer.name]
        ref = copy.deepcopy(layer.layer)  # the original module class and forward
        w_q, w_codes = np_fake_quant(ref.weight.detach().numpy(), 8, per_channel=True)
        x_q, _ = np_fake_quant(inp.numpy(), 8, per_channel=False)
        assert np.abs(w_codes).max() == 127 and np.array_equal(w_codes, np.round(w_codes))
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(w_q))
            expected = ref(torch.from_numpy(x_q))
        assert torch.equal(out, expected), layer.name


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["test_resnet", "timm_layers"])
def test_int4_and_int8_forward_match_numpy_reference_and_int8_is_much_closer_to_fp32(name):
    model, x = _seeded(name)
    with torch.no_grad():
        fp32 = model(x)
    errors = {}
    for bits in (4, 8):
        quantized = copy.deepcopy(model)
        layers = quantize_model(quantized, default=f"int{bits}")
        records = _capture_layer_io(quantized, layers, x)
        qmax = 2 ** (bits - 1) - 1
        for layer in layers:
            inp, out = records[layer.name]
            ref = copy.deepcopy(layer.layer)
            w_q, w_codes = np_fake_quant(ref.weight.detach().numpy(), bits, per_channel=True)
            x_q, x_codes = np_fake_quant(inp.numpy(), bits, per_channel=False)
            # Every output channel reaches the extreme code: the scale is that channel's amax / qmax.
            assert np.array_equal(np.abs(w_codes).reshape(len(w_codes), -1).max(axis=1), np.full(len(w_codes), qmax))
            assert np.abs(x_codes).max() == qmax
            with torch.no_grad():
                ref.weight.copy_(torch.from_numpy(w_q))
                expected = ref(torch.from_numpy(x_q))
            assert torch.equal(out, expected), (bits, layer.name)
        with torch.no_grad():
            errors[bits] = _relative_error(quantized(x), fp32)
    assert errors[4] > 0.05, errors  # int4 changes the output measurably
    assert errors[8] < 0.15 * errors[4], errors  # 4 more bits: a much smaller error
    assert errors[8] > 0, errors


def test_gradients_flow_to_the_original_weights():
    model, x = _seeded("timm_layers")
    layers = quantize_model(model, default="int4")
    model.train()
    model(x).sum().backward()
    for layer in layers:
        assert layer.layer.weight.grad is not None and layer.layer.weight.grad.abs().sum() > 0, layer.name


# ------------------------------------------------------------------------------------- format switching
def _expected_buffer(fmt_name: str) -> list[float]:
    f = get_format(fmt_name)
    mx, nv = f.block is not None and f.block.size == 32, f.block is not None and f.block.size == 16
    return [f.max_value, 2.0**f.man_bits, 2.0**f.emin, 1.0 if f.bits <= 8 else 0.0, float(mx), float(nv),
            2.0 ** math.floor(math.log2(f.max_value))]


def test_set_formats_changes_buffers_in_place():
    model, _ = _seeded("test_resnet")
    layers = quantize_model(model)
    params_before = list(model.parameters())
    buffers_before = [n for n, _ in model.named_buffers()]
    state_keys_before = list(model.state_dict())
    layer = layers[3]
    w_ptr, a_ptr = layer.weight_quant.fmt.data_ptr(), layer.act_quant.fmt.data_ptr()
    w_buf, a_buf = layer.weight_quant.fmt, layer.act_quant.fmt
    for w, a in (("fp8_e4m3", "int4"), ("int2", "fp6_e3m2"), ("bf16", "bf16"), ("fp4_e2m1", None)):
        layer.set_formats(w, a)
        a = a or w
        assert layer.w_format.name == w and layer.a_format.name == a
        assert layer.weight_quant.fmt is w_buf and layer.act_quant.fmt is a_buf
        assert layer.weight_quant.fmt.data_ptr() == w_ptr and layer.act_quant.fmt.data_ptr() == a_ptr
        assert layer.weight_quant.fmt.tolist() == _expected_buffer(w)
        assert layer.act_quant.fmt.tolist() == _expected_buffer(a)
    params_after = list(model.parameters())
    assert len(params_after) == len(params_before)
    assert all(p is q for p, q in zip(params_after, params_before, strict=True))
    assert [n for n, _ in model.named_buffers()] == buffers_before
    assert list(model.state_dict()) == state_keys_before  # the format buffer is not persistent state
    assert not any(k.endswith(".fmt") for k in state_keys_before)


def test_set_assignment_and_pins():
    model = create_model("fliqs_cnn")
    names = _conv_linear_names(model)
    assert names == ["features.0", "features.3", "features.6", "head"]
    layers = quantize_model(model, default="int8", pinned={"head": "fp8_e4m3", "features.0": "int8"})
    pinned = {layer.name: layer.pinned for layer in layers}
    assert pinned == {"features.0": True, "features.3": False, "features.6": False, "head": True}
    assert get_assignment(layers)["head"] == {"w": "fp8_e4m3", "a": "fp8_e4m3"}
    set_assignment(layers, {n: "int2" for n in names})
    assert get_assignment(layers) == {
        "features.0": {"w": "int8", "a": "int8"}, "features.3": {"w": "int2", "a": "int2"},
        "features.6": {"w": "int2", "a": "int2"}, "head": {"w": "fp8_e4m3", "a": "fp8_e4m3"}}
    set_assignment(layers, {"features.3": ("fp4_e2m1", "int8"), "head": ("int4", "int4")})
    assert get_assignment(layers)["features.3"] == {"w": "fp4_e2m1", "a": "int8"}
    assert get_assignment(layers)["features.6"] == {"w": "int2", "a": "int2"}  # not named: unchanged
    assert get_assignment(layers)["head"] == {"w": "fp8_e4m3", "a": "fp8_e4m3"}
    with pytest.raises(BadInput, match="nope"):
        set_assignment(layers, {"nope": "int8"})
    with pytest.raises(UnknownFormatError):
        set_assignment(layers, {"features.3": "int5"})


def test_pinned_glob_patterns():
    model = timm.create_model("test_resnet", num_classes=10)
    layers = quantize_model(model, pinned={"conv1*": "int8", "fc": "fp32"})
    pinned = [layer.name for layer in layers if layer.pinned]
    assert pinned and all(n.startswith("conv1") or n == "fc" for n in pinned)
    assert all(layer.w_format.name == "int8" for layer in layers if layer.name.startswith("conv1"))


@pytest.mark.parametrize("pinned", [{"no_such_layer": "int8"}, {"features.9*": "int4"}])
def test_bad_pinned_pattern_raises(pinned):
    model = create_model("fliqs_cnn")
    with pytest.raises(BadInput, match="match no conv/linear layer"):
        quantize_model(model, pinned=pinned)
    assert not quant_layers(model)  # nothing was rewritten


def test_bad_pinned_format_raises():
    with pytest.raises(UnknownFormatError):
        quantize_model(create_model("fliqs_cnn"), pinned={"head": "fp3"})


def test_exclude_leaves_layers_unwrapped():
    model = create_model("fliqs_cnn")
    layers = quantize_model(model, exclude=["head"])
    assert [layer.name for layer in layers] == ["features.0", "features.3", "features.6"]
    assert type(model.head) is nn.Linear


# --------------------------------------------------------------------------------------- activation range
def test_ema_range_trains_then_uses_calibrated_amax_in_eval():
    conv = nn.Conv2d(2, 3, 1, bias=False)
    layer = QuantLayer(conv, "c", range_mode=RangeMode.ema)
    layer.set_formats("int8", "int8")
    assert layer.act_quant.range_mode is RangeMode.ema
    layer.train()
    for amax in (2.0, 4.0, 1.0):
        x = torch.zeros(1, 2, 2, 2)
        x[0, 0, 0, 0] = amax
        layer(x)
    expected = 2.0
    for amax in (4.0, 1.0):
        expected = 0.9 * expected + 0.1 * amax
    running = float(layer.act_quant.running_amax)
    assert running == pytest.approx(expected, rel=1e-6)
    layer.eval()
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 5  # amax far above running
    before = layer.act_quant.running_amax.clone()
    out = layer(x)
    assert torch.equal(layer.act_quant.running_amax, before)  # eval does not update
    # Expected: quantize x against the calibrated amax (clipping to +-running), as an independent numpy step.
    r = F32(running)
    codes = np.clip(np.round(x.numpy() * (F32(127) / r)), -127, 127).astype(F32)
    x_q = (codes / F32(127) * r).astype(F32)
    w_q, _ = np_fake_quant(conv.weight.detach().numpy(), 8, per_channel=True)
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w_q))
        assert torch.equal(out.detach(), ref(torch.from_numpy(x_q)))
    assert float(layer.act_quant(x).abs().max()) == pytest.approx(running, rel=1e-6)


def test_dynamic_range_uses_batch_amax_in_eval():
    q = FormatQuantizer("int8", range_mode="dynamic").eval()
    x = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3
    x_q, _ = np_fake_quant(x.numpy(), 8, per_channel=False)
    assert torch.equal(q(x), torch.from_numpy(x_q))
    assert float(q.running_amax) == 0.0


# -------------------------------------------------------------------------------- one compiled graph
def _frame_compiles() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def test_compiled_model_does_not_recompile_when_assignment_changes():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    model = create_model("fliqs_cnn")
    eager = copy.deepcopy(model)
    layers = quantize_model(model, blocked=True)  # the choices include block-scaled formats (MX, NVFP4)
    eager_layers = quantize_model(eager)
    compiled = torch.compile(model, backend="eager")
    rng = random.Random(0)
    choices = [n for n in FORMATS if n != "fp32"]
    assert {"mxfp4_e2m1", "nvfp4", "mxint8", "int4", "fp8_e4m3"} <= set(choices)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def step():
        assignment = {layer.name: (rng.choice(choices), rng.choice(choices)) for layer in layers}
        set_assignment(layers, assignment)
        set_assignment(eager_layers, assignment)
        out = compiled(x)
        out.sum().backward()  # a training step: forward and backward through the straight-through estimator
        with torch.no_grad():
            assert torch.equal(out.detach(), eager(x))  # the compiled graph follows the buffers
        return assignment

    seen = [step()]
    after_first = _frame_compiles()
    graphs_first = int(counters["stats"]["unique_graphs"])
    assert after_first >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            seen.append(step())
    assert len({str(a) for a in seen}) == 6  # six different assignments
    assert _frame_compiles() == after_first
    assert int(counters["stats"]["unique_graphs"]) == graphs_first
    # The counter does detect a recompile: a new input shape compiles again.
    compiled(torch.randn(3, 1, 8, 8))
    assert _frame_compiles() > after_first
    torch._dynamo.reset()


# ---------------------------------------------------------------- clipping


def _int_error(w: np.ndarray, amax: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: per-row squared error of symmetric integer quantization with range ``amax``."""
    qmax = 2 ** (bits - 1) - 1
    scale = amax / qmax
    q = np.clip(np.round(w / scale), -qmax, qmax) * scale  # numpy rounds half to even too
    return ((q - w) ** 2).sum(axis=1)


@pytest.mark.parametrize("fmt", ["int2", "int3", "int4"])
def test_mse_clip_picks_the_ratio_with_the_smallest_error(fmt):
    from fliqs.quant.rounding import MSE_CLIP_RATIOS, mse_clip_amax

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 72)).astype(np.float32) * rng.uniform(0.1, 2.0, (16, 1)).astype(np.float32)
    w[3, 5] = 12.0  # an outlier channel: clipping pays most there
    amax = np.abs(w).max(axis=1, keepdims=True)
    bits = get_format(fmt).bits
    errors = np.stack([_int_error(w.astype(np.float64), amax * r, bits) for r in MSE_CLIP_RATIOS], axis=1)
    expected = amax[:, 0] * np.array(MSE_CLIP_RATIOS)[errors.argmin(axis=1)]
    got = mse_clip_amax(torch.from_numpy(w), torch.from_numpy(amax), format_tensor(fmt)).numpy()[:, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert (got < amax[:, 0]).any() and _int_error(w, got[:, None], bits).sum() < _int_error(w, amax, bits).sum()


def test_percentile_range_matches_numpy():
    from fliqs.quant.rounding import percentile_amax

    x = torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(1))
    for q in (90.0, 99.0, 99.99, 100.0):
        expected = np.percentile(x.abs().numpy(), q, method="inverted_cdf")
        assert percentile_amax(x, q).item() == pytest.approx(float(expected), rel=1e-6)


def test_the_clip_policy_applies_per_format():
    """quant.clip_formats decides by format name: int4 gets the MSE range, fp4 keeps the max, on one quantizer
    whose format changes (a flag buffer, so no branch for a compiled graph)."""
    from fliqs.quant.layers import FormatQuantizer
    from fliqs.quant.policy import ActClip, ClipPolicy, WeightClip
    from fliqs.quant.rounding import mse_clip_amax, percentile_amax

    w = torch.randn(8, 27, generator=torch.Generator().manual_seed(2))
    w[0, 0] = 9.0
    policy = ClipPolicy(WeightClip.mse, ActClip.percentile, 99.0, ("int*",))
    wq = FormatQuantizer(per_channel_axis=0, clip=policy)
    aq = FormatQuantizer(clip=policy)
    plain = w.abs().amax(dim=1, keepdim=True)
    wq.set_format("int4")
    assert wq.clip_on.item() == 1.0 and torch.equal(wq.amax(w), mse_clip_amax(w, plain, format_tensor("int4")))
    aq.set_format("int4")
    assert torch.equal(aq.amax(w), percentile_amax(w, 99.0))
    wq.set_format("fp4_e2m1")
    aq.set_format("fp4_e2m1")
    assert wq.clip_on.item() == 0.0 and torch.equal(wq.amax(w), plain) and torch.equal(aq.amax(w), w.abs().amax())
    assert not FormatQuantizer(per_channel_axis=0).clips  # the default policy clips nothing


def test_clip_settings_reach_every_quantizer_of_the_network():
    from fliqs.data.datasets import describe
    from fliqs.run.config import from_dict, to_dict
    from fliqs.run.loading import load_config
    from fliqs.trainables.plan import build_network

    cfg = load_config(["quant.weight_clip=mse", "quant.act_clip=percentile", "quant.act_percentile=99.9",
                       "quant.clip_formats=[int*,fp4_e2m1]"])
    # As a saved model's configuration is read back: from plain data (the options as their values).
    cfg = from_dict(to_dict(cfg))
    net = build_network(cfg, describe("digits"))
    for layer in net.layers:
        for q in (layer.weight_quant, layer.act_quant):
            assert q.clips and q.clip.percentile == 99.9 and q.clip.formats == ("int*", "fp4_e2m1")
