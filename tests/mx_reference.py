"""Independent NumPy reference for block-scaled formats (OCP MX v1.0 and NVIDIA NVFP4).

``quantize_dequantize(x, name)`` quantizes float32 ``x`` in blocks along its last axis and
returns the dequantized float32 values. It uses only NumPy and ml_dtypes, on purpose.

MX (OCP Microscaling v1.0; block 32, E8M0 shared scale):
  1. Pad the last axis with zeros up to a multiple of 32 (a zero never raises a block's max),
     and slice the padding off at the end.
  2. amax = max|v| over the block. E = floor(log2(amax)), taken exactly from the float32
     exponent (np.frexp), which is also right for float32 subnormals.
     Shared exponent s = clip(E - emax_elem, -127, 127). An all-zero block gets s = -127.
  3. v / 2^s is computed with np.ldexp in float32. Dividing by a power of two is exact
     unless the result falls below 2^-126 (float32 subnormal). Any such value is far below
     half the smallest element subnormal (>= 2^-16), so it rounds to (signed) zero either
     way. A single float32 rounding is therefore as good as exact arithmetic.
  4. FP elements: clip to +-max_elem (saturate), then cast float32 -> ml_dtypes type
     (round to nearest, ties to even). Clipping first gives the same result as rounding
     first and then saturating. It also avoids ml_dtypes turning overflow into NaN (e4m3fn)
     or inf (e5m2).
     MXINT8: k = clip(np.round(v * 64), -127, 127) (ties to even), element = k / 64.
     The -128 code (-2.0) is never produced. microxcaling clamps to +-max_norm = +-127/64,
     which is symmetric, and |v| < 2 always holds, so -2 could only come from rounding.
  5. Dequantize: q * 2^s with np.ldexp. This is exact: |q| < 2 * 2^emax_elem, and the
     smallest element step times 2^-127 is still >= 2^-149.
  6. A block whose amax is NaN or inf (i.e. it contains NaN or +-inf) becomes all NaN.
     This matches microxcaling: the shared exponent overflows and the scale is set to NaN.
     It also matches the OCP rule that a NaN scale X makes every element of the block NaN.
Sources: microsoft/microxcaling @7bc4195. mx/mx_ops.py (_shared_exponents, _quantize_mx:
floor(log2(amax)) - emax, clamp at -127, NaN above 127). mx/elemwise_ops.py
(_quantize_elemwise_core: round, then clamp to max_norm). mx/formats.py (emax, max_norm,
int8 = 8 "mbits", emax 0, max_norm 127/64). mx/cpp/shared_exp.cuh (the exact exponent
taken from the bits). Deliberate difference: microxcaling's default round='nearest' rounds
half away from zero, and we use ties-to-even (its round='even').

NVFP4 (block 16, E2M1 elements, FP8 E4M3 block scale, FP32 per-tensor scale). Follows
NVIDIA/TensorRT-Model-Optimizer @5a4242f, modelopt/torch/quantization/qtensor/nvfp4_tensor.py
(NVFP4QTensor.get_weights_scaling_factor_2 / get_weights_scaling_factor / quantize /
dequantize / _cast_fp4) and utils.py (reduce_amax, reduce_block_padding with zeros). All
arithmetic is float32:
  1. Pad to a multiple of 16 with zeros. gs = amax(|x| over the whole tensor) / 2688 (6*448).
  2. bs = block_amax / (6 * gs). Blocks with bs == 0 get bs = 1 (this happens BEFORE the
     FP8 cast). bs8 = float8_e4m3fn(min(bs, 448)), ties to even.
  3. scale = float32(bs8) * gs; e = x / scale (one division by the product);
     q = E2M1(clip(e, -6, 6)), ties to even (_cast_fp4's searchsorted plus its
     odd-bound fix is RNE with saturation at 6).
  4. out = q * scale. If bs8 underflows to 0, scale == 0: modelopt computes x/0 = +-inf,
     saturates it to +-6 and then q * 0 = +-0, so the block dequantizes to zeros signed as x;
     so does this reference (x * 0).
     (torch on CUDA may do x/scalar as x*(1/scalar), which can differ by 1 ulp in gs.)
  5. Specials: an all-zero tensor returns its zeros, signs kept (modelopt's NVFP4QTensor would
     return NaN, 0/0; its Triton fake-quant returns 0). If the tensor has any NaN or inf, gs is NaN/inf
     and modelopt makes EVERY element NaN; this reference does the same.
"""
import ml_dtypes
import numpy as np

# name: (element dtype or None for int8, emax_elem, max finite element value)
_MX = {
    "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8, 448.0),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 15, 57344.0),
    "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 2, 7.5),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4, 28.0),
    "mxfp4_e2m1": (ml_dtypes.float4_e2m1fn, 2, 6.0),
    "mxint8": (None, 0, 127.0 / 64.0),
}
BLOCK = {**{n: 32 for n in _MX}, "nvfp4": 16}
EMAX = {n: v[1] for n, v in _MX.items()}


def _to_blocks(x, block):
    """float32 (..., n) -> zero-padded (..., ceil(n/block), block), plus the original n."""
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), np.float32)], axis=-1)
    return x.reshape(x.shape[:-1] + (-1, block)), n


def _from_blocks(xb, n):
    return xb.reshape(xb.shape[:-2] + (-1,))[..., :n]


def _mx(xb, name):
    dtype, emax, vmax = _MX[name]
    amax = np.max(np.abs(xb), axis=-1, keepdims=True)  # NaN propagates
    special = ~np.isfinite(amax)
    normal = np.isfinite(amax) & (amax > 0)
    _, e = np.frexp(np.where(normal, amax, np.float32(1)))  # amax = m * 2^e, m in [0.5, 1)
    s = np.where(normal, np.clip(e.astype(np.int64) - 1 - emax, -127, 127), -127)
    xb = np.where(special, np.float32(0), xb)  # keep NaN/inf out of the arithmetic
    v = np.ldexp(xb, -s).astype(np.float32)  # exact up to float32 underflow (see docstring)
    if dtype is None:
        q = np.clip(np.round(v * np.float32(64)), -127, 127) / np.float32(64)
    else:
        q = np.clip(v, -vmax, vmax).astype(dtype).astype(np.float32)
    out = np.ldexp(q.astype(np.float32), s).astype(np.float32)
    return np.where(special, np.float32(np.nan), out)


def _nvfp4(xb):
    f32 = np.float32
    amax = np.max(np.abs(xb))  # over the whole (padded) tensor
    if not np.isfinite(amax):
        return np.full_like(xb, np.nan)
    if amax == 0:
        return xb * f32(0.0)
    gs = f32(amax) / f32(6.0 * 448.0)
    bamax = np.max(np.abs(xb), axis=-1, keepdims=True)
    bs = bamax / (f32(6.0) * gs)
    bs = np.where(bs == 0, f32(1.0), bs)
    bs8 = np.minimum(bs, f32(448.0)).astype(ml_dtypes.float8_e4m3fn).astype(f32)
    scale = (bs8 * gs).astype(f32)
    safe = np.where(scale == 0, f32(1.0), scale)
    e = (xb / safe).astype(f32)
    q = np.clip(e, f32(-6.0), f32(6.0)).astype(ml_dtypes.float4_e2m1fn).astype(f32)
    return np.where(scale == 0, xb * f32(0.0), q * scale).astype(f32)


def quantize_dequantize(x: np.ndarray, name: str) -> np.ndarray:
    """Quantize float32 ``x`` to format ``name`` along the last axis, and dequantize."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"expected float32, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have ndim >= 1")
    if name not in BLOCK:
        raise ValueError(f"unknown format {name!r}; known: {sorted(BLOCK)}")
    if x.size == 0:
        return x.copy()
    xb, n = _to_blocks(x, BLOCK[name])
    out = _nvfp4(xb) if name == "nvfp4" else _mx(xb, name)
    return np.ascontiguousarray(_from_blocks(out, n), dtype=np.float32)
