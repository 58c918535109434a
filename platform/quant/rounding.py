"""Quantize-dequantize ("fake quantization") for every format, with a straight-through estimator.

There is one generic rounding routine, `round_to_format`, in the spirit of ml_dtypes' ``float8.h``:

1. ``E = floor(log2|y|)``, read exactly from the float32 exponent field with a bit mask (``log2`` can round up
   just below a power of two, and ``frexp`` is several times slower on CPUs).
2. Values below the format's smallest normal share its exponent: ``E = max(E, emin)``. This is what makes
   subnormals (and, with ``emin = man_bits = b - 1``, integers; see `fliqs.quant.formats`) come out of one formula.
3. ``r = y / 2**E`` is exact (a power-of-two division whose result is normal), and ``|r| < 2``.
4. ``round(r * 2**m) * 2**-m * 2**E`` keeps ``m`` mantissa bits: every product is by a power of two and exact,
   and ``torch.round`` rounds half to even, so ties go to the even mantissa as the reference casts do.
   Normalising by the value's own binade keeps every factor a normal float32 (E >= emin >= -126), so even the
   subnormal spacing of fp32 and bf16 (down to 2**-149) is reproduced exactly; the spacing ``2**(E - m)``
   itself would underflow there.
5. Overflow follows the format's policy (data, not branches in callers): saturate to ``+-max_value``, or NaN, or
   a signed infinity. NaN inputs stay NaN; with saturation an infinite input becomes ``+-max_value``.

A format enters the routine as three numbers (``max_value``, ``2**man_bits``, ``2**emin``), Python numbers or
0-dim tensors. Quantized layers keep them in a buffer (`format_tensor`), so switching a layer to another format is a
``copy_`` into that buffer: no new parameters, no recompilation of a compiled graph. After the first division
the work is done in place: in eager mode on CPUs each fresh full-size tensor costs more (page faults) than the
arithmetic. Under ``torch.compile`` the routine fuses into one kernel.

All arithmetic is float32: inputs in other dtypes are upcast and the result cast back.
"""

from __future__ import annotations

import torch

from fliqs.quant.formats import Format, Overflow, get_format

# Layout of the per-layer format buffer: the numbers the rounding needs, precomputed so that a call costs as few
# (dispatch-bound, on small layers) tensor operations as possible.
MAX_VALUE, POW2_MAN_BITS, POW2_EMIN, SCALED = range(4)
FORMAT_TENSOR_SIZE = 4

# amax below this is treated as an all-zero tensor (avoids a division by zero in the scale).
AMAX_EPS = 1e-30

_F32_EXP_MASK = 0x7F800000  # the exponent field of a float32
_F32_MAX_BINADE = 2.0**127


def format_tensor(fmt: Format | str, device=None) -> torch.Tensor:
    """The format as the float32 vector (max_value, 2**man_bits, 2**emin, scaled) that quantizers hold."""
    fmt = get_format(fmt)
    return torch.tensor([fmt.max_value, 2.0**fmt.man_bits, 2.0**fmt.emin, float(fmt.scaled)],
                        dtype=torch.float32, device=device)


_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def cached_format_tensor(fmt: Format | str, device: torch.device) -> torch.Tensor:
    """`format_tensor` made once per (format, device) and kept; callers must not modify it.

    Switching a layer's format is then a device-to-device ``copy_``, queued like any kernel. A copy from a fresh
    host tensor would instead make the host wait for the GPU to drain its queue (a blocking host-to-device copy),
    once per quantizer and step.
    """
    fmt, device = get_format(fmt), torch.device(device)
    key = (fmt.name, device)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = format_tensor(fmt, device)
    return _ON_DEVICE[key]


def round_to_format(y: torch.Tensor, max_value, pow2_man_bits, pow2_emin,
                    overflow: Overflow = "saturate") -> torch.Tensor:
    """Round float32 values, already expressed in the format's units, to the nearest representable value.

    The format enters as ``max_value``, ``2**man_bits`` and ``2**emin`` (numbers or 0-dim tensors). Returns a new
    tensor; ``y`` is not modified.
    """
    # Masking everything but the exponent field leaves 2**floor(log2|y|) (inf for inf and NaN). Positive floats
    # order like their bit patterns, so clamping it as a float gives 2**max(E, emin), capped at the top binade.
    pow2_e = (y.view(torch.int32) & _F32_EXP_MASK).view(torch.float32)
    # Both bounds numbers or both tensors: a tensor bound next to a number bound makes torch.compile read the tensor
    # as a Python number (``.item()``), a graph break in every quantizer (tests/test_compile.py).
    top = pow2_emin.new_full((), _F32_MAX_BINADE) if isinstance(pow2_emin, torch.Tensor) else _F32_MAX_BINADE
    pow2_e.clamp_(min=pow2_emin, max=top)
    q = (y / pow2_e).mul_(pow2_man_bits).round_().div_(pow2_man_bits).mul_(pow2_e)  # powers of two: exact
    if overflow == "saturate":
        return q.clamp_(min=-max_value, max=max_value)
    inf = torch.full_like(q, float("inf"))
    fill = torch.full_like(q, float("nan")) if overflow == "nan" else torch.copysign(inf, y)
    return torch.where(q.abs() > max_value, fill, q)


def amax_per_tensor(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().to(torch.float32)


def amax_per_channel(x: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """amax over every dim but ``axis``, shaped to broadcast against x (weights: one scale per output channel)."""
    dims = tuple(d for d in range(x.dim()) if d != axis)
    return x.detach().abs().amax(dim=dims, keepdim=True).to(torch.float32)


# Clipping (`fliqs.quant.layers.ClipPolicy`): the grid of clip ratios the MSE search tries, and the most elements a
# percentile is estimated from (a strided subsample beyond that: exact enough, and bounded in cost).
MSE_CLIP_RATIOS = tuple(0.2 + 0.05 * i for i in range(17))  # 0.20, 0.25, ..., 1.00
PERCENTILE_MAX_ELEMENTS = 2**20


@torch.no_grad()
def mse_clip_amax(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Per slice along ``axis``, the clipped range ``r * amax`` (``r`` in `MSE_CLIP_RATIOS`) whose quantization
    error ``||Q(x; r * amax) - x||^2`` is smallest: the MSE-optimal weight clip of the integer QAT literature.
    Ties keep the larger range; ``amax`` itself (r = 1) is always a candidate, so the error never grows."""
    x = x.detach().to(torch.float32)
    dims = tuple(d for d in range(x.dim()) if d != axis)
    best, best_err = amax, None
    for ratio in reversed(MSE_CLIP_RATIOS):  # from 1.0 down: strict improvements only
        candidate = amax * ratio
        err = (quantize_dequantize(x, candidate, fmt) - x).square().sum(dim=dims, keepdim=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best, best_err = torch.where(better, candidate, best), torch.where(better, err, best_err)
    return best


@torch.no_grad()
def percentile_amax(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of ``|x|`` (per tensor), from at most `PERCENTILE_MAX_ELEMENTS` elements."""
    flat = x.detach().abs().reshape(-1).to(torch.float32)
    flat = flat[::max(1, flat.numel() // PERCENTILE_MAX_ELEMENTS)]
    k = min(flat.numel(), max(1, int(-(-percentile * flat.numel() // 100))))
    return flat.kthvalue(k).values


def quantize_dequantize(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
    """Scale x so that amax maps to the format's max (narrow formats only), round, scale back. No gradient trick."""
    max_value, scaled = fmt[MAX_VALUE], fmt[SCALED] > 0
    one = torch.ones_like(amax)
    # Narrow formats map amax to max_value; bf16/fp16/fp32 are plain casts (factor 1 both ways).
    down = torch.where(scaled, max_value, one)
    up = torch.where(scaled, torch.clamp_min(amax, AMAX_EPS), one)
    q = round_to_format(x.to(torch.float32) * (down / up), max_value, fmt[POW2_MAN_BITS], fmt[POW2_EMIN])
    # Scale back as (q / max) * amax rather than q / scale: then +-max maps back to +-amax exactly (a tensor's
    # largest element survives quantization bit for bit); q / scale misses amax by one ulp in ~10% of cases.
    return q.div_(down).mul_(up).to(x.dtype)


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (identity). ``fmt`` is a `format_tensor` buffer.

    Written as ``x + (q - x)`` with the difference computed off the autograd graph: the rounding is never
    recorded, and no Python ``autograd.Function`` runs per call (its overhead outweighs the arithmetic on
    small layers).
    """
    if not x.requires_grad:
        return quantize_dequantize(x, amax, fmt)
    detached = x.detach()
    return x + (quantize_dequantize(detached, amax, fmt) - detached)


def fake_quantize_per_tensor(x: torch.Tensor, fmt: Format | str) -> torch.Tensor:
    """``x`` quantized to ``fmt`` and back, scaled per tensor (its largest magnitude maps to the format's max; the
    wide formats bf16, fp16 and fp32 are plain casts), with a straight-through gradient: `fliqs.quant.fake_quantize`,
    the public face of the rounding."""
    return fake_quantize(x, amax_per_tensor(x), format_tensor(fmt, x.device))
