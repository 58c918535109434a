"""Quantize-dequantize ("fake quantization") for every format, with a straight-through estimator.

There is one generic rounding routine, `round_to_format`, in the spirit of ml_dtypes' ``float8.h``:

1. ``e = floor(log2|y|)`` read exactly from the float's exponent field (``torch.frexp``; ``log2`` can round up
   just below a power of two).
2. Values below the smallest normal share its exponent: ``e = max(e, emin)``. This is what makes subnormals (and,
   with ``emin = man_bits = b - 1``, integers; see `fliqs.formats`) come out of the same formula.
3. The spacing of representable values in that binade is ``step = 2 ** (e - man_bits)``.
4. ``round(y / step) * step``: dividing by a power of two is exact in float32, and ``torch.round`` rounds half
   to even, so ties go to the even mantissa exactly as the reference casts do.
5. Overflow follows the format's policy (data, not branches in callers): saturate to ``+-max_value``, or NaN, or
   a signed infinity. NaN inputs stay NaN; with saturation an infinite input becomes ``+-max_value``.

A format enters the routine as three numbers (``max_value``, ``man_bits``, ``emin``), which can be Python
floats or tensors. Quantized layers keep them in a buffer (`format_tensor`), so switching a layer to another
format is a ``copy_`` into that buffer: no new parameters, no recompilation of a compiled graph.

All arithmetic is float32: inputs in other dtypes are upcast and the result cast back.
"""

from __future__ import annotations

import torch

from fliqs.formats import Format, Overflow, get_format

# Layout of the per-layer format buffer.
MAX_VALUE, MAN_BITS, EMIN, SCALED = range(4)
FORMAT_TENSOR_SIZE = 4

# amax below this is treated as an all-zero tensor (avoids a division by zero in the scale).
AMAX_EPS = 1e-30


def format_tensor(fmt: Format | str, device=None) -> torch.Tensor:
    """The format as the float32 vector (max_value, man_bits, emin, scaled) that quantizers hold as a buffer."""
    fmt = get_format(fmt)
    return torch.tensor([fmt.max_value, fmt.man_bits, fmt.emin, float(fmt.scaled)],
                        dtype=torch.float32, device=device)


def round_to_format(y: torch.Tensor, max_value, man_bits, emin, overflow: Overflow = "saturate") -> torch.Tensor:
    """Round float32 values, already expressed in the format's units, to the nearest representable value."""
    _, exp = torch.frexp(y)  # |y| = mant * 2**exp with mant in [0.5, 1): floor(log2|y|) = exp - 1
    e = torch.clamp((exp - 1).to(torch.float32), min=emin)
    step = torch.exp2(e - man_bits)
    q = torch.round(y / step) * step
    if overflow == "saturate":
        return torch.clamp(q, min=-max_value, max=max_value)
    inf = torch.full_like(q, float("inf"))
    fill = torch.full_like(q, float("nan")) if overflow == "nan" else torch.copysign(inf, y)
    return torch.where(q.abs() > max_value, fill, q)


def cast_to_format(x: torch.Tensor, fmt: Format | str, overflow: Overflow | None = None) -> torch.Tensor:
    """Reference path: round x (no scaling) to ``fmt``; ``overflow`` defaults to the format's own policy."""
    fmt = get_format(fmt)
    y = x.to(torch.float32)
    q = round_to_format(y, fmt.max_value, float(fmt.man_bits), float(fmt.emin), overflow or fmt.overflow)
    return q.to(x.dtype)


def amax_per_tensor(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().to(torch.float32)


def amax_per_channel(x: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """amax over every dim but ``axis``, shaped to broadcast against x (weights: one scale per output channel)."""
    dims = tuple(d for d in range(x.dim()) if d != axis)
    return x.detach().abs().amax(dim=dims, keepdim=True).to(torch.float32)


def quantize_dequantize(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
    """Scale x so that amax maps to the format's max (narrow formats only), round, scale back. No gradient trick."""
    y = x.to(torch.float32)
    max_value, man_bits, emin, scaled = fmt[MAX_VALUE], fmt[MAN_BITS], fmt[EMIN], fmt[SCALED]
    amax = torch.clamp_min(amax, AMAX_EPS)
    scale = torch.where(scaled > 0, max_value / amax, torch.ones_like(amax))
    q = round_to_format(y * scale, max_value, man_bits, emin)
    # Scale back as (q / max) * amax rather than q / scale: then +-max maps back to +-amax exactly (a tensor's
    # largest element survives quantization bit for bit); q / scale misses amax by one ulp in ~10% of cases.
    q = torch.where(scaled > 0, q / max_value * amax, q)
    return q.to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: fake-quantize. Backward: identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, amax, fmt):
        return quantize_dequantize(x, amax, fmt)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient. ``fmt`` is a `format_tensor` buffer."""
    return _StraightThrough.apply(x, amax, fmt)
