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

Block-scaled formats (`fliqs.quant.formats.BlockScaling`) use the same rounding; only the scale differs. Instead of
one scale per tensor or channel, `block_scales` gives every element the scale of its block of consecutive values
along the last axis (callers lay the reduction axis out last: `blocks_last`):

* OCP MX: ``X = 2**(floor(log2 amax_block) - emax)``, the exponent clamped to E8M0's [-127, 127]; elements are
  ``v / X`` (exact: X is a power of two).
* NVFP4 (NVIDIA ModelOpt's ``NVFP4QTensor``): a per-tensor scale ``s_t = amax_tensor / (6 * 448)`` (E2M1's max
  times E4M3's), and per block of 16 the FP8 E4M3 scale ``s_b = e4m3(amax_block / (6 * s_t))`` (rounded as every
  format is, saturating at 448); elements are ``v / (s_b * s_t)``, and a block whose scale rounds to zero is zero.
* A length that is not a multiple of the block is padded with zeros for the block maxima (zeros change no maximum):
  the last block of a row is a short block with its own scale.
* A block holding a NaN or an infinity has a NaN scale (E8M0's NaN), so every element of that block is NaN; for
  NVFP4 a non-finite tensor range (a NaN or an infinity anywhere, when the range is the tensor's own) makes every
  element NaN, as in ModelOpt.

With ``blocked=True``, `quantize_dequantize` computes both kinds of scale and selects one per format from the format
buffer (`E8M0_BLOCKS`, `NVFP4_BLOCKS`), so one compiled graph still serves assignments that mix block-scaled, INT and
FP formats; with ``blocked=False`` (a quantizer that never holds a block-scaled format) the block path is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fliqs.quant.formats import (
    E8M0_EXP_RANGE,
    FORMATS,
    MX_BLOCK_SIZE,
    NVFP4_BLOCK_SIZE,
    Format,
    Overflow,
    get_format,
)

# Layout of the per-layer format buffer: the numbers the rounding needs, precomputed so that a call costs as few
# (dispatch-bound, on small layers) tensor operations as possible. The last three are for block-scaled formats:
# whether the format has E8M0 blocks (MX) or NVFP4's two-level scale, and 2**emax for MX's shared exponent.
MAX_VALUE, POW2_MAN_BITS, POW2_EMIN, SCALED, E8M0_BLOCKS, NVFP4_BLOCKS, POW2_EMAX = range(7)
FORMAT_TENSOR_SIZE = 7

# Block scales. NVFP4's block scale is an FP8 E4M3 value and its elements FP4 E2M1: the per-tensor scale maps the
# tensor's amax to the largest element under the largest block scale.
# (Plain numbers: an export copies these functions and constants into a file that does not import fliqs.)
_E8M0_MIN, _E8M0_MAX = 2.0 ** E8M0_EXP_RANGE[0], 2.0 ** E8M0_EXP_RANGE[1]
_E4M3 = (FORMATS["fp8_e4m3"].max_value, 2.0 ** FORMATS["fp8_e4m3"].man_bits, 2.0 ** FORMATS["fp8_e4m3"].emin)
_E2M1_MAX = FORMATS["fp4_e2m1"].max_value
NVFP4_TENSOR_RANGE = _E2M1_MAX * _E4M3[0]  # 6 * 448

# amax below this is treated as an all-zero tensor (avoids a division by zero in the scale).
AMAX_EPS = 1e-30

_F32_EXP_MASK = 0x7F800000  # the exponent field of a float32
_F32_MAX_BINADE = 2.0**127


def format_tensor(fmt: Format | str, device=None) -> torch.Tensor:
    """The format as the float32 vector (max_value, 2**man_bits, 2**emin, scaled) that quantizers hold."""
    fmt = get_format(fmt)
    block = fmt.block
    return torch.tensor([fmt.max_value, 2.0**fmt.man_bits, 2.0**fmt.emin, float(fmt.scaled),
                         float(block is not None and block.scale == "e8m0"),
                         float(block is not None and block.tensor_scale), 2.0**fmt.emax],
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


def quantize(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor,
             blocked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (float32) in the format's units, rounded: ``(q, down, up)`` with ``q / down * up`` the dequantized value
    (`quantize_dequantize`). Narrow formats map amax to the format's max (down = max, up = amax); bf16/fp16/fp32
    are plain casts (factor 1 both ways). ``blocked``: ``x`` has its blocks along the last axis and ``fmt`` may
    hold a block-scaled format, whose per-element block scale ``u`` then takes the place of amax / max (down = 1,
    up = u); an NVFP4 block whose scale rounds to zero has ``q = 0``. ``amax`` is still the tensor's (or each
    channel's) range: NVFP4 takes its per-tensor scale from its maximum."""
    max_value, scaled = fmt[MAX_VALUE], fmt[SCALED] > 0
    one = torch.ones_like(amax)
    down = torch.where(scaled, max_value, one)
    up = torch.where(scaled, torch.clamp_min(amax, AMAX_EPS), one)
    if not blocked:
        return round_to_format(x * (down / up), max_value, fmt[POW2_MAN_BITS], fmt[POW2_EMIN]), down, up
    # The same arithmetic with the block scale u in place where the format is block-scaled: x * 1 / u, q / 1 * u
    # (multiplying or dividing by one is exact, so the other formats round exactly as above).
    block = (fmt[E8M0_BLOCKS] + fmt[NVFP4_BLOCKS]) > 0
    u = block_scales(x, amax, fmt)
    zero = block & (u == 0)
    ratio, divisor = torch.where(block, 1.0, down / up), torch.where(block & ~zero, u, 1.0)
    q = round_to_format(x * ratio / divisor, max_value, fmt[POW2_MAN_BITS], fmt[POW2_EMIN])
    return torch.where(zero, x * 0.0, q), torch.where(block, 1.0, down), torch.where(block, u, up)


def quantize_dequantize(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor, blocked: bool = False) -> torch.Tensor:
    """Scale x so that amax maps to the format's max (narrow formats only), round, scale back (`quantize`). No
    gradient trick."""
    dtype = x.dtype
    q, down, up = quantize(x.to(torch.float32), amax, fmt, blocked)
    # Scale back as (q / max) * amax rather than q / scale: then +-max maps back to +-amax exactly (a tensor's
    # largest element survives quantization bit for bit); q / scale misses amax by one ulp in ~10% of cases. A zero
    # NVFP4 block stays zero (u = 0), its zeros signed as x.
    return q.div_(down).mul_(up).to(dtype)


def pow2_floor(a: torch.Tensor) -> torch.Tensor:
    """``2**floor(log2 a)`` of positive float32 values, read from the exponent field (0 for zero and float32
    subnormals, inf for inf and NaN)."""
    return (a.view(torch.int32) & _F32_EXP_MASK).view(torch.float32)


def block_scale_factors(x: torch.Tensor, amax: torch.Tensor,
                        fmt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scales of the blocks along the last axis of float32 ``x``, per block: MX's E8M0 scale [..., n32] (NaN
    for a block holding a NaN or an infinity), NVFP4's FP8 E4M3 block scale [..., n16] and its FP32 tensor scale
    (module docstring). ``amax``: the tensor's range (or its channels'), for NVFP4's per-tensor scale. What an
    export stores; `block_scales` gives every element its block's."""
    length = x.shape[-1]
    magnitude = F.pad(x.detach().abs(), (0, -length % MX_BLOCK_SIZE))
    # [..., blocks of 32, 2 halves of 16, 16] -> maxima [..., n, 2] (NVFP4) and [..., n, 1] (MX)
    amax16 = magnitude.unflatten(-1, (-1, MX_BLOCK_SIZE // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)).amax(-1)
    amax32 = amax16.amax(-1, keepdim=True)  # amax propagates NaN
    # MX: 2**floor(log2 amax) / 2**emax, clamped to E8M0's range; a non-finite maximum makes the scale NaN.
    mx = (pow2_floor(amax32) / fmt[POW2_EMAX]).clamp_(_E8M0_MIN, _E8M0_MAX)
    mx = torch.where(torch.isfinite(amax32), mx, float("nan"))
    # NVFP4, as NVIDIA's ModelOpt computes it (`NVFP4QTensor`, float32): the block's amax over 6 x the tensor scale,
    # rounded to FP8 E4M3 (saturating). An all-zero tensor has a zero tensor scale: every block scale is then zero,
    # and so is every element.
    tensor_scale = amax.amax() / NVFP4_TENSOR_RANGE
    ratio = torch.where(tensor_scale > 0, amax16 / (_E2M1_MAX * tensor_scale), 0.0)
    block_scale = round_to_format(ratio, *_E4M3)
    block_scale = torch.where(torch.isfinite(amax16), block_scale, float("nan"))
    return mx.flatten(-2), block_scale.flatten(-2), tensor_scale


def block_scales(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
    """Every element's block scale along the last axis of float32 ``x``: the E8M0 scale of its block of 32 where the
    format is MX, NVFP4's ``s_b * s_t`` of its block of 16 otherwise; NaN for a block that holds a NaN or an
    infinity, and for every NVFP4 block when the tensor scale is not finite."""
    mx, block_scale, tensor_scale = block_scale_factors(x, amax, fmt)
    nv = torch.where(torch.isfinite(tensor_scale), block_scale * tensor_scale, float("nan"))
    # Back to one scale per element: index each element's block (an expand-and-slice of the padded blocks here
    # miscompiles under inductor, torch 2.14: reads past the rows).
    element = torch.arange(x.shape[-1], device=x.device)
    return torch.where(fmt[E8M0_BLOCKS] > 0, mx[..., element // MX_BLOCK_SIZE], nv[..., element // NVFP4_BLOCK_SIZE])


def blocks_last(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` with its blocked axis last: a weight (``axis=None``) as rows of its flattened input side (in_channels x
    kh x kw, in that order), an activation with ``axis`` (its channels) moved last. A view where possible; undo
    with `blocks_restore`."""
    return x.flatten(1) if axis is None else x.movedim(axis, -1)


def blocks_restore(rows: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``rows`` back in the shape and memory layout of ``like``: the layer after it then runs the same kernel as on
    an unblocked input (a conv on a channels-last view accumulates in another order)."""
    out = rows.reshape(like.shape) if axis is None else rows.movedim(-1, axis)
    return out if out.stride() == like.stride() else torch.empty_like(like).copy_(out)


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, fmt: torch.Tensor, blocked: bool = False) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (identity). ``fmt`` is a `format_tensor` buffer;
    ``blocked`` as in `quantize_dequantize`.

    Written as ``x + (q - x)`` with the difference computed off the autograd graph: the rounding is never
    recorded, and no Python ``autograd.Function`` runs per call (its overhead outweighs the arithmetic on
    small layers).
    """
    if not x.requires_grad:
        return quantize_dequantize(x, amax, fmt, blocked)
    detached = x.detach()
    return x + (quantize_dequantize(detached, amax, fmt, blocked) - detached)


def fake_quantize_any(x: torch.Tensor, fmt: Format | str) -> torch.Tensor:
    """``x`` quantized to ``fmt`` and back with a straight-through gradient: `fliqs.quant.fake_quantize`, the public
    face of the rounding. A block-scaled format (MX, NVFP4) has its blocks along the last axis; any other narrow
    format is scaled per tensor (its largest magnitude maps to the format's max); bf16, fp16 and fp32 are plain
    casts."""
    fmt = get_format(fmt)
    return fake_quantize(x, amax_per_tensor(x), format_tensor(fmt, x.device), blocked=fmt.block is not None)
