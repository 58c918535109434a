"""fliqs.quant.rounding: bit-exactness against ml_dtypes / numpy, fliqs' overflow policy, properties, STE, scaling.

Reference: ml_dtypes (numpy for fp16) casts *from float32* (FLIQS.md section 4). Every FP format is checked on
every code point, every midpoint between neighbours (ties), the float32 neighbours of every midpoint, the
subnormal underflow region, the overflow threshold, signed zeros, NaN and infinities.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import cast_to_format
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fliqs.quant.formats import FORMATS, get_format
from fliqs.quant.rounding import (
    amax_per_channel,
    amax_per_tensor,
    fake_quantize,
    format_tensor,
    quantize_dequantize,
)

# The reference dtype of each FP format, written out here (not taken from fliqs' own ml_dtypes_name).
REFERENCE_DTYPES = {
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
}
FP_NAMES = list(REFERENCE_DTYPES)
NARROW_FP = ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2"]
INT_NAMES = ["int2", "int3", "int4", "int8"]
NARROW = INT_NAMES + NARROW_FP
HAS_NAN = {"fp8_e4m3", "fp8_e5m2", "bf16", "fp16"}  # formats with a NaN encoding
F32 = np.float32


# ----------------------------------------------------------------------------------------------- helpers
def _bits(name: str) -> int:
    bits = {"fp4_e2m1": 4, "fp6_e2m3": 6, "fp6_e3m2": 6, "fp8_e4m3": 8, "fp8_e5m2": 8, "bf16": 16, "fp16": 16}
    return bits[name]


def all_codes(name: str) -> np.ndarray:
    """Every bit pattern of the format, as values of the reference dtype."""
    dtype = REFERENCE_DTYPES[name]
    bits = _bits(name)
    raw = np.arange(2**bits, dtype=np.uint8 if bits <= 8 else np.uint16)
    return raw.view(dtype)


def code_values(name: str) -> np.ndarray:
    """All finite values of the format, float32, sorted, -0 and +0 merged."""
    v = all_codes(name).astype(F32)
    return np.unique(v[np.isfinite(v)])


def reference(x: np.ndarray, name: str) -> np.ndarray:
    assert x.dtype == F32  # never from float64 (double rounding)
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(REFERENCE_DTYPES[name]).astype(F32)


def fliqs_cast(x: np.ndarray, name: str, overflow: str | None = "reference") -> np.ndarray:
    fmt = get_format(name)
    if overflow == "reference":
        overflow = fmt.reference_overflow
    out = cast_to_format(torch.from_numpy(np.ascontiguousarray(x, dtype=F32)), fmt, overflow=overflow)
    assert out.dtype == torch.float32
    return out.numpy()


def assert_bits_equal(got: np.ndarray, want: np.ndarray, x: np.ndarray, what: str = "") -> None:
    """Bit-for-bit equality (signed zeros included); any NaN matches any NaN."""
    got, want = np.asarray(got, F32), np.asarray(want, F32)
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    bad = (nan_g != nan_w) | (~nan_g & ~nan_w & (got.view(np.uint32) != want.view(np.uint32)))
    if bad.any():
        idx = np.flatnonzero(bad)[:8]
        rows = ", ".join(f"x={x.flat[i]!r}: got {got.flat[i]!r} want {want.flat[i]!r}" for i in idx)
        pytest.fail(f"{what}: {bad.sum()} mismatches of {bad.size}; {rows}")


def midpoints(values: np.ndarray) -> np.ndarray:
    """Exact float32 midpoints between neighbouring values (checked exact against float64)."""
    a, b = values[:-1], values[1:]
    mid = a + (b - a) / F32(2)  # (a + b) / 2 would overflow at the top of bf16
    exact = (a.astype(np.float64) + b.astype(np.float64)) / 2
    assert np.array_equal(mid.astype(np.float64), exact), "a midpoint is not exact in float32"
    return mid


def overflow_threshold(name: str) -> F32:
    """max + half the spacing of the top binade: the midpoint between max and the next (missing) value."""
    fmax = float(ml_dtypes.finfo(REFERENCE_DTYPES[name]).max)
    man = ml_dtypes.finfo(REFERENCE_DTYPES[name]).nmant
    step = 2.0 ** (np.floor(np.log2(fmax)) - man)
    t = F32(fmax + step / 2)
    assert float(t) == fmax + step / 2
    return t


# ------------------------------------------------------------------------------ bit-exact against ml_dtypes
@pytest.mark.parametrize("name", FP_NAMES)
def test_code_enumeration_round_trips_through_reference(name):
    codes = all_codes(name)
    raw = codes.view(np.uint8 if _bits(name) <= 8 else np.uint16)
    with np.errstate(invalid="ignore"):
        back = codes.astype(F32).astype(REFERENCE_DTYPES[name]).view(raw.dtype)
    finite = np.isfinite(codes.astype(F32))
    assert np.array_equal(back[finite], raw[finite])
    assert len(code_values(name)) == len(np.unique(np.abs(code_values(name)))) * 2 - 1  # symmetric around 0


@pytest.mark.parametrize("name", FP_NAMES)
def test_every_code_point_is_exact(name):
    x = all_codes(name).astype(F32)
    got = fliqs_cast(x, name)
    assert_bits_equal(got, reference(x, name), x, f"{name} code points")
    finite = np.isfinite(x)
    assert_bits_equal(got[finite], x[finite], x[finite], f"{name} code points are fixed points")


@pytest.mark.parametrize("name", FP_NAMES)
def test_midpoints_and_their_neighbours(name):
    mids = midpoints(code_values(name))
    for x, what in ((mids, "midpoints (ties to even)"),
                    (np.nextafter(mids, F32(np.inf)), "just above midpoints"),
                    (np.nextafter(mids, F32(-np.inf)), "just below midpoints")):
        assert_bits_equal(fliqs_cast(x, name), reference(x, name), x, f"{name} {what}")


@pytest.mark.parametrize("name", FP_NAMES)
def test_ties_really_go_to_even(name):
    """Independent of the reference: a tie lands on the neighbour whose last mantissa bit is 0."""
    codes = all_codes(name)
    raw = codes.view(np.uint8 if _bits(name) <= 8 else np.uint16).astype(np.int64)
    vals = codes.astype(F32)
    pos = np.isfinite(vals) & (vals > 0)
    order = np.argsort(vals[pos])
    v, r = vals[pos][order], raw[pos][order]
    got = fliqs_cast(midpoints(v), name)
    even = np.where(r[:-1] % 2 == 0, v[:-1], v[1:])
    assert_bits_equal(got, even, midpoints(v), f"{name} ties to even")


@pytest.mark.parametrize("name", FP_NAMES)
def test_underflow_below_smallest_subnormal(name):
    tiny = F32(ml_dtypes.finfo(REFERENCE_DTYPES[name]).smallest_subnormal)
    half = tiny / F32(2)
    pos = np.array([tiny, half, np.nextafter(half, F32(0)), np.nextafter(half, F32(1)), tiny / F32(4),
                    np.nextafter(tiny, F32(0)), F32(1e-45), F32(1e-40), F32(1e-38)], dtype=F32)
    x = np.concatenate([pos, -pos])
    got = fliqs_cast(x, name)
    assert_bits_equal(got, reference(x, name), x, f"{name} underflow")
    # Half the smallest subnormal is a tie between 0 (even) and the smallest subnormal: it goes to zero,
    # keeping its sign.
    assert got[1] == 0 and not np.signbit(got[1])
    assert got[len(pos) + 1] == 0 and np.signbit(got[len(pos) + 1])
    assert got[3] == tiny  # just above half: rounds up


@pytest.mark.parametrize("name", FP_NAMES)
def test_overflow_threshold_matches_reference_policy(name):
    fmax = F32(ml_dtypes.finfo(REFERENCE_DTYPES[name]).max)
    t = overflow_threshold(name)
    with np.errstate(over="ignore"):
        pos = np.array([fmax, np.nextafter(fmax, F32(np.inf)), np.nextafter(t, F32(0)), t,
                        np.nextafter(t, F32(np.inf)), t * F32(2), F32(1e30), np.finfo(F32).max, np.inf],
                       dtype=F32)
    pos = pos[pos >= fmax]  # bf16's threshold doubled exceeds float32
    x = np.concatenate([pos, -pos])
    got = fliqs_cast(x, name)
    assert_bits_equal(got, reference(x, name), x, f"{name} overflow with reference policy")
    # The tie at the threshold rounds back to max (max has an odd mantissa only in 'fn' formats, where the
    # next pattern is NaN; either way the reference decides and fliqs agrees).


@pytest.mark.parametrize("name", FP_NAMES)
def test_signed_zero_is_preserved(name):
    x = np.array([0.0, -0.0], dtype=F32)
    got = fliqs_cast(x, name)
    want = reference(x, name)
    assert_bits_equal(got, want, x, f"{name} signed zero")
    assert np.array_equal(np.signbit(got), np.signbit(x))
    got_default = cast_to_format(torch.from_numpy(x), name).numpy()
    assert np.array_equal(np.signbit(got_default), np.signbit(x))


@pytest.mark.parametrize("name", FP_NAMES)
def test_nan_and_inf_inputs(name):
    x = np.array([np.nan, -np.nan, np.inf, -np.inf], dtype=F32)
    got = fliqs_cast(x, name)
    want = reference(x, name)
    if name in HAS_NAN:
        assert_bits_equal(got, want, x, f"{name} NaN/inf with reference policy")
    else:
        # fp4/fp6 have no NaN encoding: ml_dtypes maps NaN to some finite pattern; fliqs keeps NaN.
        assert np.isnan(got[:2]).all()
        assert_bits_equal(got[2:], want[2:], x[2:], f"{name} inf with reference policy")


@pytest.mark.parametrize("name", FP_NAMES)
def test_random_float32_values_match_reference(name):
    rng = np.random.default_rng(1)
    fmax = float(ml_dtypes.finfo(REFERENCE_DTYPES[name]).max)
    tiny = float(ml_dtypes.finfo(REFERENCE_DTYPES[name]).smallest_subnormal)
    mags = np.exp(rng.uniform(np.log(tiny / 4), np.log(fmax), 50_000))
    x = (mags * rng.choice([-1, 1], mags.size)).astype(F32)
    assert_bits_equal(fliqs_cast(x, name), reference(x, name), x, f"{name} random")


# ------------------------------------------------------------------------------------ fliqs' own policy
@pytest.mark.parametrize("name", FP_NAMES)
def test_default_policy_saturates(name):
    fmt = get_format(name)
    assert fmt.overflow == "saturate"
    fmax = F32(ml_dtypes.finfo(REFERENCE_DTYPES[name]).max)
    t = overflow_threshold(name)
    pos = np.array([np.nextafter(fmax, F32(np.inf)), t, np.nextafter(t, F32(np.inf)), F32(1e30),
                    np.finfo(F32).max, np.inf], dtype=F32)
    pos = pos[pos > fmax]  # 1e30 is in range for bf16
    x = np.concatenate([pos, -pos, np.array([np.nan], F32)])
    got = cast_to_format(torch.from_numpy(x), fmt).numpy()
    want = np.concatenate([np.full(pos.size, fmax), np.full(pos.size, -fmax), [np.nan]]).astype(F32)
    assert_bits_equal(got, want, x, f"{name} saturating policy")
    # In range, the default policy is the reference.
    v = code_values(name)
    mids = midpoints(v)
    x = np.concatenate([v, mids])
    assert_bits_equal(cast_to_format(torch.from_numpy(x), fmt).numpy(), reference(x, name), x, name)


@pytest.mark.parametrize("name", INT_NAMES)
def test_integers_round_half_to_even_and_clip(name):
    fmt = get_format(name)
    bits = int(name[3:])
    qmax = 2 ** (bits - 1) - 1
    halves = np.arange(-2 * (qmax + 4), 2 * (qmax + 4) + 1, dtype=F32) / F32(2)
    x = np.concatenate([halves, np.nextafter(halves, F32(np.inf)), np.nextafter(halves, F32(-np.inf)),
                        np.array([1e6, -1e6, 1e30, -1e30, np.finfo(F32).max, np.inf, -np.inf, 0.0, -0.0,
                                  0.49999997, -0.49999997, 1e-45, -1e-45], F32)]).astype(F32)
    want = np.clip(np.round(x), -qmax, qmax).astype(F32)
    assert_bits_equal(cast_to_format(torch.from_numpy(x), fmt).numpy(), want, x, name)
    nan = cast_to_format(torch.tensor([float("nan")]), fmt)
    assert torch.isnan(nan).all()


def test_cast_preserves_input_dtype():
    x = torch.linspace(-3, 3, 11, dtype=torch.bfloat16)
    assert cast_to_format(x, "fp8_e4m3").dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- properties
FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
ARRAYS = hnp.arrays(np.float32, st.integers(1, 48), elements=FINITE_F32)
MODERATE = hnp.arrays(np.float32, st.integers(1, 48),
                      elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False))
ALL_NAMES = [name for name, fmt in FORMATS.items() if fmt.block is None]  # block-scaled: test_block_formats.py
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


def _value_set(name: str) -> np.ndarray:
    if name in REFERENCE_DTYPES:
        return code_values(name)
    qmax = 2 ** (int(name[3:]) - 1) - 1
    return np.arange(-qmax, qmax + 1, dtype=F32)


@pytest.mark.parametrize("name", ALL_NAMES)
@PROPERTY_SETTINGS
@given(x=ARRAYS)
def test_cast_properties(name, x):
    t = torch.from_numpy(x)
    q = cast_to_format(t, name)
    assert torch.equal(cast_to_format(q, name), q)  # idempotent
    s = torch.sort(t).values
    assert bool((torch.diff(cast_to_format(s, name)) >= 0).all())  # monotone
    if name == "fp32":
        assert torch.equal(q, t)
    elif name in REFERENCE_DTYPES and name not in ("bf16", "fp16"):
        assert np.isin(q.numpy(), _value_set(name)).all()
    elif name.startswith("int"):
        assert np.isin(q.numpy(), _value_set(name)).all()
    else:  # bf16 / fp16: representable in the reference dtype
        qn = q.numpy()
        assert np.array_equal(qn.astype(REFERENCE_DTYPES[name]).astype(F32), qn)


@pytest.mark.parametrize("name", ALL_NAMES)
@PROPERTY_SETTINGS
@given(x=MODERATE, data=st.data())
def test_quantize_dequantize_properties(name, x, data):
    t = torch.from_numpy(x)
    amax = amax_per_tensor(t)
    # Also exercise an amax that is not the tensor's own (clipping), drawn from the data.
    factor = data.draw(st.sampled_from([1.0, 0.5, 2.0]))
    amax = amax * factor
    fmt = format_tensor(name)
    q = quantize_dequantize(t, amax, fmt)
    assert torch.equal(quantize_dequantize(q, amax, fmt), q)  # idempotent
    s = torch.sort(t).values
    assert bool((torch.diff(quantize_dequantize(s, amax, fmt)) >= 0).all())  # monotone
    fmtd = get_format(name)
    if not fmtd.scaled:
        assert torch.equal(q, cast_to_format(t, name))  # unscaled: a plain (saturating) cast
        return
    a = float(amax)
    if a < 1e-30:
        return
    # Every output is (to float32 rounding) a code value mapped back through amax / max.
    grid = _value_set(name).astype(np.float64) * a / fmtd.max_value
    qn = q.numpy().astype(np.float64)
    dist = np.abs(qn[:, None] - grid[None, :]).min(axis=1)
    assert (dist <= 4e-7 * a).all()
    assert (np.abs(qn) <= a).all()


# ------------------------------------------------------------------------------------- STE and scaling
@pytest.mark.parametrize("name", ["int2", "int8", "fp4_e2m1", "fp8_e4m3", "bf16"])
def test_fake_quantize_gradient_is_identity(name):
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    amax = amax_per_channel(x)
    out = fake_quantize(x, amax, format_tensor(name))
    assert not torch.equal(out, x)
    upstream = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


def test_amax_per_channel_one_scale_per_output_channel():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    a = amax_per_channel(w)
    assert a.shape == (6, 1, 1, 1)
    assert torch.equal(a.flatten(), torch.from_numpy(np.abs(w.numpy()).reshape(6, -1).max(axis=1)))
    lin = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    assert amax_per_channel(lin).shape == (5, 1)
    assert amax_per_tensor(lin).shape == ()
    assert float(amax_per_tensor(lin)) == float(np.abs(lin.numpy()).max())


@pytest.mark.parametrize("name", NARROW)
def test_channel_amax_maps_to_format_max(name):
    gen = torch.Generator().manual_seed(2)
    # Channels of very different magnitudes, so one per-tensor scale would be visibly wrong.
    w = torch.randn(64, 8, 3, 3, generator=gen) * torch.exp(4 * torch.randn(64, 1, 1, 1, generator=gen))
    amax = amax_per_channel(w)
    q = quantize_dequantize(w, amax, format_tensor(name))
    flat_w, flat_q = w.reshape(64, -1), q.reshape(64, -1)
    arg = flat_w.abs().argmax(dim=1)
    rows = torch.arange(64)
    assert torch.equal(flat_q[rows, arg], flat_w[rows, arg])  # each channel's max element survives exactly
    assert torch.equal(flat_q.abs().amax(dim=1), flat_w.abs().amax(dim=1))
    # In units of the channel's scale, every value is a code of the format.
    fmt = get_format(name)
    y = (flat_q.double() / amax.reshape(64, 1).double() * fmt.max_value).numpy()
    grid = _value_set(name).astype(np.float64)
    assert (np.abs(y[..., None] - grid).min(axis=-1) <= 1e-5 * fmt.max_value).all()


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32"])
def test_wide_formats_are_unscaled(name):
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(3)) * 1e-3
    amax = amax_per_channel(w)
    assert not get_format(name).scaled
    q = quantize_dequantize(w, amax, format_tensor(name))
    assert torch.equal(q, torch.from_numpy(reference(w.numpy(), name)) if name != "fp32" else w)
    # A different amax changes nothing: no scale is applied.
    assert torch.equal(quantize_dequantize(w, amax * 7, format_tensor(name)), q)


def test_fp32_is_an_exact_identity():
    rng = np.random.default_rng(4)
    x = np.concatenate([
        rng.standard_normal(10_000).astype(F32),
        (rng.standard_normal(1000) * 1e30).astype(F32),
        np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, np.finfo(F32).max, -np.finfo(F32).max,
                  np.finfo(F32).smallest_normal], F32),
        rng.integers(0, 2**31 - 2**23, 10_000, dtype=np.uint32).view(F32),  # every positive finite exponent
    ])
    t = torch.from_numpy(x)
    for amax in (amax_per_tensor(t), torch.tensor(1.0)):
        q = quantize_dequantize(t, amax, format_tensor("fp32"))
        assert np.array_equal(q.numpy().view(np.uint32), x.view(np.uint32))
    assert np.array_equal(cast_to_format(t, "fp32").numpy().view(np.uint32), x.view(np.uint32))


def test_zero_tensor_and_zero_amax():
    z = torch.zeros(3, 4)
    for name in NARROW:
        q = quantize_dequantize(z, amax_per_channel(z), format_tensor(name))
        assert torch.equal(q, z) and not torch.isnan(q).any()
