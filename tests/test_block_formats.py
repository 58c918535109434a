"""Block-scaled formats (OCP MX v1.0: MXFP8/MXFP6/MXFP4/MXINT8; NVIDIA NVFP4): bit for bit against the independent
NumPy + ml_dtypes reference of tests/mx_reference.py (written from the spec and ModelOpt's recipe, not from fliqs),
the blocks along each layer's reduction axis, their effective bits in the cost, and one compiled graph."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mx_reference import BLOCK, EMAX
from mx_reference import quantize_dequantize as reference

from fliqs.models.registry import create_model
from fliqs.quant import fake_quantize
from fliqs.quant.cost import measure_layers, summarize
from fliqs.quant.formats import BLOCK_SCALED, FORMATS, get_format
from fliqs.quant.layers import quantize_model, set_assignment

MX = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4_e2m1", "mxint8"]


def _same(ours: torch.Tensor, ref: np.ndarray) -> bool:
    """Bit for bit (signed zeros included); NaN where the reference has NaN."""
    a = ours.detach().numpy().astype(np.float32)
    nan = np.isnan(ref)
    return np.array_equal(np.isnan(a), nan) and np.array_equal(np.where(nan, 0, a).view(np.int32),
                                                                np.where(nan, 0, ref).view(np.int32))


def _check(x: np.ndarray, name: str) -> None:
    x = np.asarray(x, dtype=np.float32)
    assert _same(fake_quantize(torch.from_numpy(x.copy()), name), reference(x, name)), name


def test_the_registry_names_the_spec_formats_with_their_blocks_and_effective_bits():
    assert list(BLOCK_SCALED) == [*MX, "nvfp4"]
    for name in MX:
        fmt = get_format(name)
        assert (fmt.block.size, fmt.block.scale, fmt.block.tensor_scale) == (32, "e8m0", False) == \
            (BLOCK[name], "e8m0", False)
        assert fmt.emax == EMAX[name] and fmt.overflow == "saturate"
    nv = get_format("nvfp4")
    assert (nv.block.size, nv.block.scale, nv.block.tensor_scale) == (16, "fp8_e4m3", True)
    assert {n: get_format(n).effective_bits for n in BLOCK_SCALED} == {
        "mxfp8_e4m3": 8.25, "mxfp8_e5m2": 8.25, "mxfp6_e2m3": 6.25, "mxfp6_e3m2": 6.25, "mxfp4_e2m1": 4.25,
        "mxint8": 8.25, "nvfp4": 4.5}
    assert get_format("mxint8").max_value == 127 / 64 and get_format("mxint8").emax == 0  # k / 64, k in +-127
    assert get_format("int4").effective_bits == 4 and get_format("fp8_e4m3").block is None


@pytest.mark.parametrize("name", BLOCK_SCALED)
def test_bit_exact_on_the_cases_a_block_makes_hard(name):
    rng = np.random.default_rng(0)
    size = get_format(name).block.size
    normal = rng.standard_normal((6, 4 * size))
    wide = normal * np.exp(rng.uniform(-9, 9, normal.shape))  # values far apart within each block
    far = np.array([[1e-8, 1e4, -3e-3, 0.5] + [0.25] * (size - 4)])
    zeros = np.concatenate([np.zeros((1, size)), normal[:1, :size]], axis=1)  # an all-zero block beside another
    # A block whose values fall in the element's subnormal range after scaling: one large value sets the scale.
    subnormal = np.concatenate([[1.0], rng.uniform(-1, 1, size - 1) * 2.0 ** -8])[None]
    f32_subnormal = normal[:2] * 1e-40  # the scale itself at E8M0's (or FP8's) smallest
    huge = normal[:2] * 1e37
    ties = np.arange(-64, 64, dtype=np.float64)[None] / 8  # halfway points of most element grids
    for x in (normal, wide, far, zeros, subnormal, f32_subnormal, huge, ties, np.zeros((2, size))):
        _check(x, name)


@pytest.mark.parametrize("name", BLOCK_SCALED)
@pytest.mark.parametrize("length", [1, 7, 50, 33])
def test_a_short_last_block_has_its_own_scale(name, length):
    """Lengths that are not a multiple of the block: the last block is short (zero padding, which changes no
    maximum), as in the reference."""
    x = np.random.default_rng(length).standard_normal((3, length)) * 10 ** np.arange(3)[:, None]
    _check(x, name)
    if length == 33 and name in MX:  # element 33 alone in its block: its own scale keeps it exact-ish
        single = np.concatenate([np.full((1, 32), 1000.0), [[0.001]]], axis=1)
        q = fake_quantize(torch.tensor(single, dtype=torch.float32), name)
        assert float(q[0, 32]) == pytest.approx(0.001, rel=0.07)


@pytest.mark.parametrize("name", BLOCK_SCALED)
def test_nan_and_infinities(name):
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    x[0, 3], x[1, 40] = np.nan, np.inf
    _check(x, name)
    q = fake_quantize(torch.from_numpy(x), name)
    if name in MX:  # only the blocks holding them are NaN
        assert torch.isnan(q[0, :32]).all() and not torch.isnan(q[0, 32:]).any()
        assert torch.isnan(q[1, 32:]).all() and not torch.isnan(q[1, :32]).any()
    else:  # NVFP4's tensor scale is NaN: the whole tensor
        assert torch.isnan(q).all()


@pytest.mark.parametrize("name", BLOCK_SCALED)
@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70),
                    elements=st.floats(-1e6, 1e6, width=32)))
def test_bit_exact_on_arbitrary_arrays(name, x):
    _check(x, name)


def test_mx_scales_are_powers_of_two_and_elements_saturate():
    """Hand-checked points: a block with max 6 has scale 1 for MXFP4 (6 = 1.5 x 2**2, emax 2) and comes back exact;
    with max 7.9 the scale is still 1 and 7.9 saturates to 6; with max 100 the scale is 2**(6 - 2) = 16, and 100
    becomes 96 (6 x 16)."""
    block = torch.tensor([[6.0, 3.0, 1.5, 0.5] + [0.0] * 28])
    assert torch.equal(fake_quantize(block, "mxfp4_e2m1"), block)
    assert float(fake_quantize(torch.tensor([[7.9] + [0.0] * 31]), "mxfp4_e2m1")[0, 0]) == 6.0
    assert float(fake_quantize(torch.tensor([[100.0] + [0.0] * 31]), "mxfp4_e2m1")[0, 0]) == 96.0
    # MXINT8: k / 64 in units of the scale: 1.999 (scale 1) saturates to 127 / 64.
    assert float(fake_quantize(torch.tensor([[1.999] + [0.0] * 31]), "mxint8")[0, 0]) == 127 / 64


def test_nvfp4_maps_the_tensor_max_to_six_times_the_largest_block_scale():
    """NVFP4's two-level scale: the tensor's amax is 6 x 448 x the tensor scale, so a block holding it keeps it; a
    block far below gets a small FP8 scale and its own resolution."""
    x = torch.tensor([[3.7] + [0.0] * 15 + [1e-3] * 16])
    q = fake_quantize(x, "nvfp4")
    assert float(q[0, 0]) == pytest.approx(3.7, rel=1e-6)
    assert float(q[0, 16]) == pytest.approx(1e-3, rel=1 / 16)  # within one step of the FP8 block scale


def test_the_gradient_is_the_identity():
    x = torch.randn(3, 64, requires_grad=True)
    fake_quantize(x, "mxfp4_e2m1").mul(torch.arange(64.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(64.0).expand(3, 64))



@pytest.mark.parametrize("name", ["mxfp4_e2m1", "nvfp4", "mxint8"])
def test_layers_block_along_the_reduction_axis(name):
    """A conv weight [O, I, kh, kw] in blocks of in_channels x kh x kw flattened in that order, its input in blocks
    along the channels; a linear's weight and input along in_features."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(40, 8, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 10))
    conv, linear = quantize_model(model)
    set_assignment([conv, linear], {"0": name, "2": name})
    x = torch.randn(2, 40, 4, 4)
    torch.set_grad_enabled(False)  # the training path's straight-through sum x + (q - x) loses signed zeros
    w = conv.layer.weight.detach()
    ref_w = reference(w.reshape(8, -1).numpy(), name).reshape(w.shape)
    assert _same(conv.weight_quant(conv.source_weight().detach()), ref_w)
    ref_x = np.moveaxis(reference(np.moveaxis(x.numpy(), 1, -1), name), -1, 1)
    assert _same(conv.act_quant(x), ref_x)
    wl = linear.layer.weight.detach()
    assert _same(linear.weight_quant(linear.source_weight().detach()), reference(wl.numpy(), name))
    h = torch.randn(2, 128)
    assert _same(linear.act_quant(h), reference(h.numpy(), name))
    torch.set_grad_enabled(True)


def test_effective_bits_price_bops_and_size():
    """resnet18 (224 px): GBOPs at mxfp4 = those at fp4 x (4.25/4)**2, at nvfp4 x (4.5/4)**2; size likewise with
    the weight bits once."""
    model = create_model("resnet18", num_classes=1000)
    shapes = measure_layers(model, 224, 3)
    params = sum(p.numel() for p in model.parameters())
    base = summarize(shapes, {s.name: "fp4_e2m1" for s in shapes}, total_params=params)
    for name, bits in (("mxfp4_e2m1", 4.25), ("nvfp4", 4.5), ("mxfp8_e4m3", 8.25)):
        cost = summarize(shapes, {s.name: name for s in shapes}, total_params=params)
        assert cost.gbops == pytest.approx(base.gbops * (bits / 4) ** 2, rel=1e-12)
        weights = sum(s.weight_params for s in shapes)
        assert (cost.size_mb - base.size_mb) * 8e6 == pytest.approx(weights * (bits - 4), rel=1e-9)
    assert base.gmacs == pytest.approx(1.814, abs=5e-4)  # FLIQS.md section 5


def test_every_format_is_listed_with_its_block_and_effective_bits():
    rows = {f["name"]: f for f in (fmt.describe() for fmt in FORMATS.values())}
    assert rows["mxfp4_e2m1"]["block_size"] == 32 and rows["mxfp4_e2m1"]["scale_format"] == "e8m0"
    assert rows["nvfp4"]["block_size"] == 16 and rows["nvfp4"]["effective_bits"] == 4.5
    assert rows["int8"]["block_size"] is None and rows["int8"]["effective_bits"] == 8
    assert math.isclose(rows["mxfp6_e3m2"]["effective_bits"], 6.25)
