"""fliqs.quant.formats: the registry and every derived limit, against ml_dtypes / numpy finfo and FLIQS.md."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from fliqs.errors import BadInput
from fliqs.quant.formats import FORMATS, FULL_PRECISION, Format, UnknownFormatError, get_format

EXPECTED_NAMES = ["int2", "int3", "int4", "int8", "fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2",
                  "bf16", "fp16", "fp32", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4_e2m1",
                  "mxint8", "nvfp4"]

# name -> (finfo source, exp bits, man bits, total bits)
FLOAT_REFERENCES = {
    "fp4_e2m1": (ml_dtypes.finfo(ml_dtypes.float4_e2m1fn), 2, 1, 4),
    "fp6_e2m3": (ml_dtypes.finfo(ml_dtypes.float6_e2m3fn), 2, 3, 6),
    "fp6_e3m2": (ml_dtypes.finfo(ml_dtypes.float6_e3m2fn), 3, 2, 6),
    "fp8_e4m3": (ml_dtypes.finfo(ml_dtypes.float8_e4m3fn), 4, 3, 8),
    "fp8_e5m2": (ml_dtypes.finfo(ml_dtypes.float8_e5m2), 5, 2, 8),
    "bf16": (ml_dtypes.finfo(ml_dtypes.bfloat16), 8, 7, 16),
    "fp16": (np.finfo(np.float16), 5, 10, 16),
    "fp32": (np.finfo(np.float32), 8, 23, 32),
}

# FLIQS.md section 4: format -> (bias, max finite, min normal, min subnormal), written out by hand.
FLIQS_TABLE = {
    "fp8_e4m3": (7, 448.0, 2.0**-6, 2.0**-9),
    "fp8_e5m2": (15, 57344.0, 2.0**-14, 2.0**-16),
    "fp6_e2m3": (1, 7.5, 1.0, 0.125),
    "fp6_e3m2": (3, 28.0, 0.25, 0.0625),
    "fp4_e2m1": (1, 6.0, 1.0, 0.5),
}


def test_registry_contents_and_order():
    assert list(FORMATS) == EXPECTED_NAMES
    assert list(FORMATS) == EXPECTED_NAMES
    for name, fmt in FORMATS.items():
        assert fmt.name == name
        assert get_format(name) is fmt
        assert get_format(fmt) is fmt
    assert FULL_PRECISION is FORMATS["fp32"]


def test_formats_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FORMATS["int8"].bits = 4  # type: ignore[misc]


@pytest.mark.parametrize("name", list(FLOAT_REFERENCES))
def test_float_limits_match_finfo(name):
    info, exp_bits, man_bits, bits = FLOAT_REFERENCES[name]
    fmt = get_format(name)
    assert fmt.kind == "float"
    assert (fmt.exp_bits, fmt.man_bits, fmt.bits) == (exp_bits, man_bits, bits)
    assert (info.nexp, info.nmant, info.bits) == (exp_bits, man_bits, bits)
    assert fmt.max_value == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.bias == 2 ** (exp_bits - 1) - 1
    assert fmt.emin == int(info.minexp) == 1 - fmt.bias


@pytest.mark.parametrize("name", list(FLIQS_TABLE))
def test_fp_limits_match_fliqs_table(name):
    bias, fmax, min_normal, min_sub = FLIQS_TABLE[name]
    fmt = get_format(name)
    assert (fmt.bias, fmt.max_value, fmt.min_normal, fmt.min_subnormal) == (bias, fmax, min_normal, min_sub)


def _values_from_layout(fmt: Format) -> list[float]:
    """Magnitudes of a finite-only format built from its bit layout by hand (no specials)."""
    m = fmt.man_bits
    subnormals = [k * 2.0 ** (fmt.emin - m) for k in range(2**m)]
    normals = [(2**m + k) * 2.0 ** (e - m) for e in range(fmt.emin, fmt.emin + 2**fmt.exp_bits - 1)
               for k in range(2**m)]
    return sorted(subnormals + normals)


def test_e2m1_value_set():
    """FLIQS.md: E2M1 represents exactly {0, 0.5, 1, 1.5, 2, 3, 4, 6}."""
    assert _values_from_layout(get_format("fp4_e2m1")) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name,dtype", [("fp4_e2m1", ml_dtypes.float4_e2m1fn),
                                        ("fp6_e2m3", ml_dtypes.float6_e2m3fn),
                                        ("fp6_e3m2", ml_dtypes.float6_e3m2fn)])
def test_finite_only_layouts_match_ml_dtypes(name, dtype):
    fmt = get_format(name)
    codes = np.arange(2**fmt.bits, dtype=np.uint8).view(dtype).astype(np.float32)
    mags = sorted({abs(float(v)) for v in codes})
    assert mags == _values_from_layout(fmt)
    assert mags[-1] == fmt.max_value and mags[1] == fmt.min_subnormal


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_formats(bits):
    fmt = get_format(f"int{bits}")
    assert fmt.kind == "int"
    assert fmt.bits == bits
    assert fmt.max_value == 2 ** (bits - 1) - 1
    assert fmt.scaled


@pytest.mark.parametrize("name,reference_overflow,specials", [
    ("fp8_e4m3", "nan", "fn"), ("fp8_e5m2", "inf", "ieee"), ("fp6_e2m3", "saturate", "none"),
    ("fp6_e3m2", "saturate", "none"), ("fp4_e2m1", "saturate", "none"), ("bf16", "inf", "ieee"),
    ("fp16", "inf", "ieee"), ("fp32", "inf", "ieee"),
])
def test_overflow_policy_is_data(name, reference_overflow, specials):
    fmt = get_format(name)
    assert fmt.reference_overflow == reference_overflow
    assert fmt.specials == specials
    assert fmt.overflow == "saturate"  # fliqs' quantizer always saturates


def test_scaled_flag():
    for name, fmt in FORMATS.items():
        assert fmt.scaled == (fmt.bits <= 8), name


def test_ml_dtypes_names_point_at_matching_types():
    for name, (info, *_rest) in FLOAT_REFERENCES.items():
        fmt = get_format(name)
        dtype = getattr(ml_dtypes, fmt.ml_dtypes_name, None) or np.dtype(fmt.ml_dtypes_name).type
        ref = ml_dtypes.finfo(dtype) if name not in ("fp16", "fp32") else np.finfo(dtype)
        assert float(ref.max) == float(info.max)


def test_describe_has_all_limits():
    d = get_format("fp8_e4m3").describe()
    for key in ("name", "kind", "bits", "exp_bits", "man_bits", "bias", "max_value", "min_normal",
                "min_subnormal", "specials", "overflow", "reference_overflow", "scaled"):
        assert key in d
    assert d["max_value"] == 448.0


@pytest.mark.parametrize("bad", ["fp8", "int16", "FP32", "", "e4m3"])
def test_unknown_name_lists_valid_names(bad):
    with pytest.raises(UnknownFormatError) as info:
        get_format(bad)
    assert isinstance(info.value, BadInput)
    msg = str(info.value)
    assert repr(bad) in msg
    for name in EXPECTED_NAMES:
        assert name in msg


def test_custom_format_derivation():
    """The derivation is generic: an IEEE-like e3m4 and an fn-style e5m2 follow the same rules."""
    f = Format("x", "float", 8, 3, 4, "ieee")
    assert f.bias == 3 and f.max_value == 2.0**3 * (2 - 2**-4) and f.min_subnormal == 2.0 ** (-2 - 4)
    g = Format("y", "float", 8, 5, 2, "fn")
    assert g.max_value == 2.0**16 * 1.5
