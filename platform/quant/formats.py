"""Numeric formats as data: one frozen dataclass per format, a registry by name.

Every format, integer or floating point, is described by the same few numbers, so one generic rounding routine
(`fliqs.quant.rounding.round_to_format`) serves all of them and a layer's format can live in tensors:

* ``man_bits`` (m) and ``emin`` (the exponent of the smallest normal, 1 - bias): a value y is rounded to a
  multiple of ``2 ** (max(floor(log2|y|), emin) - m)``.
* ``max_value``: the largest finite magnitude; beyond it the quantizer applies ``overflow``.

An integer format is the special case of a float format that has only subnormals: with ``m = b - 1`` and
``emin = b - 1`` the rounding step is exactly 1 for every representable magnitude (< 2**(b-1)), and anything
larger is clamped to ``qmax = 2**(b-1) - 1``. That identity is why integer and floating-point layers can share
one compiled graph.

The special-value layout is data too (``specials``):

* ``"ieee"``: the top exponent is reserved for inf/NaN (fp8_e5m2, fp16, bf16, fp32).
* ``"fn"``: finite-only with one NaN pattern per sign (OCP fp8_e4m3fn): the all-ones bit pattern is NaN, so the
  top binade loses its largest mantissa.
* ``"none"``: every bit pattern is a finite number (fp6, fp4 and the integers).

``reference_overflow`` states what the reference cast (``ml_dtypes`` from float32) does past the overflow
threshold; ``overflow`` is what fliqs' quantizer does. They differ on purpose for fp8: a quantizer that scales
values into range must saturate (recent torch casts to float8_e4m3fn saturate too).

Block-scaled formats (``block``, a `BlockScaling`) are an element format whose scale is shared by a block of
consecutive values along the reduction axis, not by a channel or a tensor:

* OCP Microscaling (MX) v1.0: blocks of `MX_BLOCK_SIZE` share one E8M0 scale, a power of two
  ``X = 2**(floor(log2 amax_block) - emax)`` (exponent clamped to [-127, 127]), with ``emax`` the exponent of the
  element format's largest binade; elements ``v / X`` are rounded to nearest-even and saturate at the element's
  max. MXINT8's elements are 8-bit integers with an implicit ``2**-6`` (``fraction_bits``): k / 64 for k in
  [-127, 127], so its emax is 0.
* NVFP4 (NVIDIA): FP4 E2M1 elements in blocks of `NVFP4_BLOCK_SIZE`, an FP8 E4M3 scale per block and an FP32 scale
  per tensor (``tensor_scale``).

``effective_bits`` (element bits plus scale bits / block size: 4.25 for MXFP4, 8.25 for MXFP8, 4.5 for NVFP4; the
per-tensor FP32 scale is negligible) is what the cost model counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fliqs.errors import BadInput

Kind = Literal["int", "float"]
Specials = Literal["ieee", "fn", "none"]
Overflow = Literal["saturate", "nan", "inf"]
ScaleFormat = Literal["e8m0", "fp8_e4m3"]

# Formats of at most this many bits are narrow: tensors are scaled so that their amax maps to the format's max.
# Wider formats (bf16, fp16, fp32) have range enough to be used as a plain cast.
SCALED_MAX_BITS = 8

MX_BLOCK_SIZE = 32  # OCP MX v1.0: elements per shared E8M0 scale
NVFP4_BLOCK_SIZE = 16  # NVIDIA NVFP4: elements per FP8 E4M3 block scale
E8M0_EXP_RANGE = (-127, 127)  # the exponents an E8M0 scale represents (0xFF is its NaN)
SCALE_BITS = 8  # both block-scale formats


@dataclass(frozen=True)
class BlockScaling:
    """How a block-scaled format shares its scales: ``size`` consecutive elements along the reduction axis share one
    scale in ``scale`` format (``e8m0``: a power of two; ``fp8_e4m3``: an FP8 value under an FP32 scale per tensor,
    ``tensor_scale``)."""

    size: int
    scale: ScaleFormat
    tensor_scale: bool = False
    scale_bits: int = SCALE_BITS


@dataclass(frozen=True)
class Format:
    """A numeric format. All derived limits are computed from the bit layout in ``__post_init__``."""

    name: str
    kind: Kind
    bits: int
    exp_bits: int
    man_bits: int
    specials: Specials = "none"
    reference_overflow: Overflow = "saturate"
    overflow: Overflow = "saturate"
    ml_dtypes_name: str | None = None  # of the element format
    block: BlockScaling | None = None  # block-scaled formats: the shared scales (module docstring)
    fraction_bits: int = 0  # integers only: the codes are scaled by 2**-fraction_bits (MXINT8: 6)
    # derived
    bias: int = field(init=False)
    emin: int = field(init=False)
    max_value: float = field(init=False)
    min_normal: float = field(init=False)
    min_subnormal: float = field(init=False)
    emax: int = field(init=False)  # exponent of the largest binade (MX's shared scale is 2**(floor(log2 amax) - emax))

    def __post_init__(self) -> None:
        if self.kind == "int":
            # Signed symmetric integer seen as a subnormal-only float (see module docstring).
            assert self.exp_bits == 0 and self.man_bits == self.bits - 1
            # No exponent field: bias 0, and emin only drives the rounding step, 2**(emin - man_bits) everywhere.
            bias, emin = 0, self.bits - 1 - self.fraction_bits
            step = 2.0**-self.fraction_bits
            max_value = (2 ** (self.bits - 1) - 1) * step
            min_normal = min_subnormal = step
        else:
            assert 1 + self.exp_bits + self.man_bits == self.bits, self.name
            bias = 2 ** (self.exp_bits - 1) - 1
            emin = 1 - bias
            emax = 2**self.exp_bits - 1 - bias  # top binade if every exponent is finite
            top_mantissa = 2.0 - 2.0 ** (-self.man_bits)
            if self.specials == "ieee":  # top exponent reserved for inf/NaN
                max_value = 2.0 ** (emax - 1) * top_mantissa
            elif self.specials == "fn":  # only the all-ones pattern is NaN
                max_value = 2.0**emax * (top_mantissa - 2.0 ** (-self.man_bits))
            else:
                max_value = 2.0**emax * top_mantissa
            min_normal = 2.0**emin
            min_subnormal = 2.0 ** (emin - self.man_bits)
        for name, value in (("bias", bias), ("emin", emin), ("max_value", max_value),
                            ("min_normal", min_normal), ("min_subnormal", min_subnormal),
                            ("emax", math.floor(math.log2(max_value)))):
            object.__setattr__(self, name, value)

    @property
    def scaled(self) -> bool:
        """Whether tensors are scaled so that their amax maps to ``max_value`` (all narrow formats)."""
        return self.bits <= SCALED_MAX_BITS

    @property
    def effective_bits(self) -> float:
        """Bits per element the cost model counts: the element's, plus its share of a block scale."""
        return self.bits + (self.block.scale_bits / self.block.size if self.block else 0)

    def code_values(self) -> list[float]:
        """The value of every bit pattern of a finite-only float format (``specials == "none"``: fp4, fp6), indexed
        by the pattern (sign, exponent, mantissa from the top bit down): the lookup table an export decodes codes
        with."""
        if self.kind != "float" or self.specials != "none":
            raise ValueError(f"{self.name}: only finite-only float formats have a plain code table")
        m, values = self.man_bits, []
        for code in range(2**self.bits):
            sign, exponent, mantissa = code >> (self.bits - 1), (code >> m) & (2**self.exp_bits - 1), code & (2**m - 1)
            magnitude = mantissa * 2.0 ** (self.emin - m) if exponent == 0 else \
                (1 + mantissa / 2**m) * 2.0 ** (exponent - self.bias)
            values.append(-magnitude if sign else magnitude)
        return values

    def describe(self) -> dict:
        """The format as plain data (``fliqs formats``); the limits are the element format's."""
        return {
            "name": self.name, "kind": self.kind, "bits": self.bits, "exp_bits": self.exp_bits,
            "man_bits": self.man_bits, "bias": self.bias, "max_value": self.max_value,
            "min_normal": self.min_normal, "min_subnormal": self.min_subnormal, "specials": self.specials,
            "overflow": self.overflow, "reference_overflow": self.reference_overflow, "scaled": self.scaled,
            "block_size": self.block.size if self.block else None,
            "scale_format": self.block.scale if self.block else ("fp32 per tensor/channel" if self.scaled else None),
            "effective_bits": self.effective_bits,
        }


def _int(bits: int, name: str | None = None, block: BlockScaling | None = None, fraction_bits: int = 0) -> Format:
    return Format(name or f"int{bits}", "int", bits, 0, bits - 1, block=block, fraction_bits=fraction_bits)


MX = BlockScaling(MX_BLOCK_SIZE, "e8m0")
NVFP4 = BlockScaling(NVFP4_BLOCK_SIZE, "fp8_e4m3", tensor_scale=True)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        _int(2), _int(3), _int(4), _int(8),
        Format("fp4_e2m1", "float", 4, 2, 1, ml_dtypes_name="float4_e2m1fn"),
        Format("fp6_e2m3", "float", 6, 2, 3, ml_dtypes_name="float6_e2m3fn"),
        Format("fp6_e3m2", "float", 6, 3, 2, ml_dtypes_name="float6_e3m2fn"),
        Format("fp8_e4m3", "float", 8, 4, 3, "fn", "nan", ml_dtypes_name="float8_e4m3fn"),
        Format("fp8_e5m2", "float", 8, 5, 2, "ieee", "inf", ml_dtypes_name="float8_e5m2"),
        Format("bf16", "float", 16, 8, 7, "ieee", "inf", ml_dtypes_name="bfloat16"),
        Format("fp16", "float", 16, 5, 10, "ieee", "inf", ml_dtypes_name="float16"),
        Format("fp32", "float", 32, 8, 23, "ieee", "inf", ml_dtypes_name="float32"),
        # Block-scaled: every element format saturates (OCP MX v1.0 section 6.3; NVIDIA's NVFP4 recipe).
        Format("mxfp8_e4m3", "float", 8, 4, 3, "fn", "nan", ml_dtypes_name="float8_e4m3fn", block=MX),
        Format("mxfp8_e5m2", "float", 8, 5, 2, "ieee", "inf", ml_dtypes_name="float8_e5m2", block=MX),
        Format("mxfp6_e2m3", "float", 6, 2, 3, ml_dtypes_name="float6_e2m3fn", block=MX),
        Format("mxfp6_e3m2", "float", 6, 3, 2, ml_dtypes_name="float6_e3m2fn", block=MX),
        Format("mxfp4_e2m1", "float", 4, 2, 1, ml_dtypes_name="float4_e2m1fn", block=MX),
        _int(8, "mxint8", MX, fraction_bits=6),
        Format("nvfp4", "float", 4, 2, 1, ml_dtypes_name="float4_e2m1fn", block=NVFP4),
    )
}
BLOCK_SCALED = tuple(name for name, f in FORMATS.items() if f.block is not None)

FULL_PRECISION = FORMATS["fp32"]


class UnknownFormatError(BadInput):
    pass


def get_format(name: str | Format) -> Format:
    """Look a format up by name; an unknown name raises with the list of valid ones."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownFormatError(
            f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}"
        ) from None


def format_pair(spec) -> tuple[Format, Format]:
    """(weight format, activation format) from a name, a Format, a (w, a) pair or a {"w": .., "a": ..} mapping."""
    if isinstance(spec, dict) or hasattr(spec, "keys"):
        return get_format(spec["w"]), get_format(spec["a"])
    if isinstance(spec, tuple | list):
        return get_format(spec[0]), get_format(spec[1])
    fmt = get_format(spec)
    return fmt, fmt

