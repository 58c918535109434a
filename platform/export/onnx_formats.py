"""What each numeric format becomes in ONNX: how a quantized layer's weight is stored and decoded, how its input is
quantized, and why (the one-line descriptions the export prints and writes into assignment.json).

Weights are stored in the narrowest type that onnxruntime (CPU provider, 1.32, opset 21) decodes exactly, so the
file holds the codes fliqs computed, not float copies:

| format | stored as | decoded by |
|---|---|---|
| int8; int4, int3, int2 | INT8; INT4 codes (packed; int3 / int2 in +-3 / +-1) | DequantizeLinear per output channel |
| fp8_e4m3, fp8_e5m2 | FLOAT8E4M3FN / FLOAT8E5M2 codes | DequantizeLinear per output channel |
| fp4_e2m1 | UINT4 bit patterns (packed) | Cast, Gather from the 16 E2M1 values, x per-channel scale |
| fp6_e2m3, fp6_e3m2 | UINT8 bit patterns (ONNX has no 6-bit type) | Cast, Gather from the 64 values, x scale |
| mxfp8_*, mxint8 | FLOAT8 / INT8 codes; E8M0 scales | blocked DequantizeLinear (block_size 32, input side) |
| mxfp6_*, mxfp4_e2m1 | UINT8 / UINT4 bit patterns; E8M0 scales | Gather, x each block's scale |
| nvfp4 | UINT4 bit patterns; FLOAT8E4M3FN block scales | Gather, x (block scales x the FP32 tensor scale) |
| bf16, fp16 | BFLOAT16 / FLOAT16 | Cast |

FLOAT4E2M1 has no DequantizeLinear kernel in onnxruntime 1.32 (``float4="qdq"`` writes it anyway, opset 23, valid
ONNX that other runtimes may run). DequantizeLinear's output takes its scale's type, so an E8M0 scale cannot give a
float: MX scales are stored as their 8-bit exponents (UINT8, 0.25 bits per element as the cost model counts them)
and decoded in the graph to float32 powers of two (exact). A block-scaled weight is decoded as a
``[out, in x kh x kw]`` matrix with its blocks along the rows (the input side, as fliqs blocks it), then reshaped
to the layer's weight.

Activations are quantized with the layer's range: a constant (``quant.act_range=ema``: calibrated, static, what
hardware deploys) or the batch's ``ReduceMax(Abs(x))`` (``dynamic``). int and fp8: QuantizeLinear +
DequantizeLinear (int inputs clipped to +-amax: fliqs is symmetric). fp4, fp6 and the block-scaled formats have no
QuantizeLinear that onnxruntime runs: their rounding is written in float ops (`round_emulated`: floor(log2|y|)
from Log, corrected where Log rounds across a power of two), and block-scaled activations compute their block
scales in the graph as fliqs does (blocks along the channels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fliqs.export.onnx_graph import Graph
from fliqs.quant import rounding
from fliqs.quant.formats import E8M0_EXP_RANGE, FORMATS, MX_BLOCK_SIZE, Format
from fliqs.quant.layers import QuantLayer

_NATIVE = {"int8": "INT8", "int4": "INT4", "int3": "INT4", "int2": "INT4", "fp8_e4m3": "FLOAT8E4M3FN",
           "fp8_e5m2": "FLOAT8E5M2", "mxfp8_e4m3": "FLOAT8E4M3FN", "mxfp8_e5m2": "FLOAT8E5M2", "mxint8": "INT8"}
_CASTS = {"bf16": "BFLOAT16", "fp16": "FLOAT16"}
_E4M3 = FORMATS["fp8_e4m3"]


def _element(fmt: Format) -> Format:
    """The element format of a block-scaled format's code table (nvfp4 and mxfp4: E2M1; mxfp6: fp6)."""
    return FORMATS[{"nvfp4": "fp4_e2m1"}.get(fmt.name, fmt.name.removeprefix("mx"))]


def weight_plan(fmt: Format, float4: str = "emulate") -> dict:
    """How a weight in ``fmt`` is stored: {"type": the ONNX type of its codes (None: float), "how": a description}."""
    if fmt.name == "fp32":
        return {"type": None, "how": "float32 (not quantized)"}
    if fmt.name in _CASTS:
        return {"type": _CASTS[fmt.name], "how": f"{_CASTS[fmt.name].lower()} values, Cast to float"}
    if fmt.name == "fp4_e2m1" and float4 == "qdq":
        return {"type": "FLOAT4E2M1", "how": "float4e2m1 codes, DequantizeLinear per channel (opset 23; onnxruntime "
                                             "1.32 cannot run it)"}
    blocks = f"blocks of {fmt.block.size} along the input side" if fmt.block else "per output channel"
    if fmt.name in _NATIVE:
        kind = _NATIVE[fmt.name].lower()
        clipped = f" in +-{int(fmt.max_value)} (no {fmt.name} type)" if fmt.name in ("int3", "int2") else ""
        dq = "blocked DequantizeLinear" if fmt.block else "DequantizeLinear"
        scale = ", E8M0 scales as uint8 exponents decoded to 2**(e-127) in the graph (DequantizeLinear cannot take " \
            "an E8M0 scale)" if fmt.block else ""
        return {"type": _NATIVE[fmt.name], "how": f"{kind} codes{clipped}, {dq} {blocks}{scale}"}
    element = _element(fmt)
    carrier = "UINT4" if element.bits <= 4 else "UINT8"
    why = "no ONNX 6-bit type" if element.bits == 6 else "onnxruntime has no float4e2m1 DequantizeLinear"
    scale = {"nvfp4": "x float8e4m3fn block scales x the float32 tensor scale"}.get(
        fmt.name, "x the E8M0 block scales (uint8 exponents)" if fmt.block else "x per-channel scale")
    return {"type": carrier, "how": f"{element.name} bit patterns as {carrier.lower()}, Gather from its "
                                    f"{2 ** element.bits} values, {scale} ({why})"}


def activation_plan(fmt: Format, static: bool) -> dict:
    """How an input in ``fmt`` is quantized: {"type": the Q/DQ type (None: emulated or none), "how": ...}."""
    rng = "static scale (calibrated)" if static else "scale from the batch's amax"
    if fmt.name == "fp32":
        return {"type": None, "how": "float32 (not quantized)"}
    if fmt.name in _CASTS:
        return {"type": _CASTS[fmt.name], "how": f"Cast to {_CASTS[fmt.name].lower()} and back"}
    if fmt.name in _NATIVE and not fmt.block:
        kind = _NATIVE[fmt.name].lower()
        clip = f", input clipped to +-amax (symmetric, +-{int(fmt.max_value)})" if fmt.kind == "int" else ""
        return {"type": _NATIVE[fmt.name], "how": f"QuantizeLinear/DequantizeLinear {kind}, {rng}{clip}"}
    if fmt.block:
        scales = "E4M3 block scales of 16 under the tensor's " + ("static" if static else "batch") + " scale" \
            if fmt.block.tensor_scale else f"E8M0 scales of blocks of {fmt.block.size}"
        return {"type": None, "how": f"{fmt.name} rounding in float ops, {scales} computed in the graph along the "
                                     f"channels (no ONNX Q/DQ for it)"}
    why = "no ONNX type" if fmt.bits == 6 else "no onnxruntime float4e2m1 Q/DQ kernel"
    return {"type": None, "how": f"{fmt.name} rounding in float ops, {rng} ({why})"}


# -- weights --------------------------------------------------------------------------------------------------------
def encode_weight(g: Graph, q: QuantLayer, float4: str = "emulate") -> str:
    """The layer's weight as ONNX computes it: stored codes and the nodes that decode them (`weight_plan`)."""
    fmt, plan = q.w_format, weight_plan(q.w_format, float4)
    weight = q.source_weight().detach().float()
    name = f"{q.name}.weight"
    if fmt.name == "fp32":
        return g.const(weight, name)
    if fmt.name in _CASTS:
        return g.node("Cast", [g.initializer(name, plan["type"], weight)], name, to=g.T.FLOAT)
    fmt_tensor = rounding.format_tensor(fmt)
    amax = q.weight_quant.amax(weight)  # per output channel, clipped as the layer clips
    if fmt.block is None:
        codes, _, up = rounding.quantize(weight, amax, fmt_tensor)
        scale = (up / fmt.max_value).flatten()  # amax / max per output channel
        if fmt.name in _NATIVE or (float4 == "qdq" and fmt.name == "fp4_e2m1"):
            return _dequantize(g, name, plan["type"], codes, scale, axis=0)
        values = _gather(g, name, fmt, codes)
        return g.node("Mul", [values, g.const(scale.reshape(-1, *[1] * (weight.dim() - 1)), f"{name}_scale")], name)
    rows = weight.flatten(1)
    codes, _, _ = rounding.quantize(rows, amax.flatten(1), fmt_tensor, blocked=True)
    mx, block_scale, tensor_scale = rounding.block_scale_factors(rows, amax.flatten(1), fmt_tensor)
    size = fmt.block.size
    blocks = -(-rows.shape[1] // size)
    if fmt.block.tensor_scale:  # nvfp4: the E4M3 block scales as float8 codes, decoded with the tensor scale
        stored = g.initializer(f"{name}_block_scale", "FLOAT8E4M3FN", block_scale[:, :blocks])
        scales = g.node("DequantizeLinear", [stored, g.const(float(tensor_scale), f"{name}_tensor_scale")])
    else:  # MX: E8M0 scales stored as their 8-bit biased exponents, decoded to float32 powers of two (exact)
        scales = _e8m0(g, name, mx[:, :blocks], shift=6 if fmt.kind == "int" else 0)  # mxint8: codes k = 64 v
    if fmt.name in _NATIVE:  # mxfp8, mxint8: blocked DequantizeLinear
        matrix = _dequantize(g, name, plan["type"], codes * 64 if fmt.kind == "int" else codes, scales, axis=1,
                             block_size=MX_BLOCK_SIZE)
        return g.node("Reshape", [matrix, g.ints(list(weight.shape))], name)
    padded = torch.nn.functional.pad(codes, (0, -codes.shape[1] % size))
    values = _gather(g, name, fmt, padded)  # [out, blocks x size]
    grouped = g.node("Reshape", [values, g.ints([padded.shape[0], -1, size])])
    scaled = g.node("Mul", [grouped, g.node("Unsqueeze", [scales, g.ints([-1])])])
    matrix = g.node("Slice", [g.node("Reshape", [scaled, g.ints([padded.shape[0], -1])]), g.ints([0]),
                              g.ints([rows.shape[1]]), g.ints([1])])
    return g.node("Reshape", [matrix, g.ints(list(weight.shape))], name)


def _e8m0(g: Graph, name: str, scales: torch.Tensor, shift: int = 0) -> str:
    """Power-of-two ``scales`` stored as E8M0 (their exponent + 127 in a UINT8) and decoded in the graph:
    ``2**(e - 127 - shift)``. (ONNX's E8M0 type cannot be decoded to float by DequantizeLinear.)"""
    exponents = torch.log2(scales).round() + 127
    if not torch.equal(torch.exp2(exponents - 127), scales):
        raise AssertionError(f"{name}: a block scale is not a power of two in E8M0's range")
    stored = g.initializer(f"{name}_scale_e8m0", "UINT8", exponents)
    return g.node("Pow", [g.const(2.0), g.node("Sub", [g.node("Cast", [stored], to=g.T.FLOAT),
                                                       g.const(float(127 + shift))])], f"{name}_block_scale")


def _dequantize(g: Graph, name: str, type_name: str, codes: torch.Tensor, scale: torch.Tensor | str, axis: int,
                block_size: int | None = None) -> str:
    """DequantizeLinear of ``codes`` stored in ``type_name``; ``scale``: a tensor (per channel) or a graph value
    (decoded block scales)."""
    stored = g.initializer(f"{name}_q", type_name, codes)
    if isinstance(scale, str):
        return g.node("DequantizeLinear", [stored, scale], name, axis=axis, block_size=block_size)
    zero = g.initializer("zero_point", type_name, torch.zeros(scale.shape))
    attrs = {"axis": axis, **({"block_size": block_size} if block_size else {})}
    return g.node("DequantizeLinear", [stored, g.const(scale, f"{name}_scale"), zero], name, **attrs)


def _gather(g: Graph, name: str, fmt: Format, values: torch.Tensor) -> str:
    """``values`` (exact element values) stored as the element format's bit patterns, decoded by a table lookup."""
    element = _element(fmt)
    table = np.asarray(element.code_values(), dtype=np.float32)
    order = np.argsort(table, kind="stable")  # -0 before +0: a zero is stored as the pattern of +0 or -0
    found = order[np.searchsorted(table[order], values.numpy().astype(np.float32).ravel(), side="right") - 1]
    if not np.array_equal(table[found], values.numpy().astype(np.float32).ravel()):
        raise AssertionError(f"{name}: a value is not in the {element.name} table")
    stored = g.initializer(f"{name}_codes", "UINT4" if element.bits <= 4 else "UINT8", found.reshape(values.shape))
    return g.node("Gather", [g.const(torch.from_numpy(table), f"{name}_table"), g.node("Cast", [stored],
                                                                                       to=g.T.INT64)])


# -- activations ----------------------------------------------------------------------------------------------------
def quantize_activation(g: Graph, x: str, q: QuantLayer) -> str:
    """The layer's input as fliqs quantizes it (`activation_plan`)."""
    fmt, static = q.a_format, q.act_quant.range_mode.value == "ema"
    plan, name = activation_plan(fmt, static), f"{q.name}.input"
    if fmt.name == "fp32":
        return x
    if fmt.name in _CASTS:
        return g.node("Cast", [g.node("Cast", [x], to=getattr(g.T, plan["type"]))], name, to=g.T.FLOAT)
    if static:
        amax = g.const(max(float(q.act_quant.running_amax), rounding.AMAX_EPS), f"{name}_amax")
    else:
        amax = g.node("Max", [g.node("ReduceMax", [g.node("Abs", [x])], keepdims=0), g.const(rounding.AMAX_EPS)],
                      f"{name}_amax")
    if fmt.block:
        return _block_activation(g, x, amax, fmt, channel_axis=1 if isinstance(q.layer, nn.Conv2d) else -1,
                                 name=name)
    if plan["type"] is None:
        top = g.const(fmt.max_value)
        y = g.node("Mul", [x, g.node("Div", [top, amax])])
        return g.node("Mul", [g.node("Div", [round_emulated(g, y, fmt), top]), amax], name)
    scale = g.node("Div", [amax, g.const(fmt.max_value)], f"{name}_scale")
    # Saturate at +-amax before QuantizeLinear, as fliqs does: for int formats because ONNX's int range has one more
    # negative code (fliqs is symmetric); for float8 because onnxruntime's optimiser drops a ReLU in front of a
    # QuantizeLinear with a zero zero point, assuming the codes clip negatives, which float8 codes do not. (Min / Max,
    # not Clip: its Clip + QuantizeLinear fusion fails on an int4 zero point.)
    x = g.node("Max", [g.node("Min", [x, amax]), g.node("Neg", [amax])])
    zero = g.initializer("zero_point", plan["type"], np.zeros(()))
    quantized = g.node("QuantizeLinear", [x, scale, zero], f"{name}_q")
    return g.node("DequantizeLinear", [quantized, scale, zero], name)


def floor_log2(g: Graph, a: str) -> str:
    """floor(log2 a) of positive values in float ops: Floor(Log(a) / ln 2), moved by one where Log rounded across a
    power of two (checked with Pow, which is exact for powers of two)."""
    two = g.const(2.0)
    e = g.node("Floor", [g.node("Div", [g.node("Log", [a]), g.const(math.log(2.0))])])
    too_big = g.node("Cast", [g.node("Greater", [g.node("Pow", [two, e]), a])], to=g.T.FLOAT)
    e = g.node("Sub", [e, too_big])
    too_small = g.node("Cast", [g.node("LessOrEqual", [g.node("Pow", [two, g.node("Add", [e, g.const(1.0)])]), a])],
                       to=g.T.FLOAT)
    return g.node("Add", [e, too_small])


def round_emulated(g: Graph, y: str, fmt: Format) -> str:
    """``y`` (already in the format's units) rounded as fliqs rounds it (`fliqs.quant.rounding.round_to_format`):
    E = max(floor(log2|y|), emin), round y to a multiple of 2**(E - man_bits) (Round: half to even), saturate.
    Every scaling is by a power of two, so this is fliqs' arithmetic."""
    magnitude = g.node("Max", [g.node("Abs", [y]), g.const(2.0 ** -126)])  # zero: any exponent <= emin does
    e = g.node("Max", [floor_log2(g, magnitude), g.const(float(fmt.emin))])
    step = g.node("Pow", [g.const(2.0), g.node("Sub", [e, g.const(float(fmt.man_bits))])])
    rounded = g.node("Mul", [g.node("Round", [g.node("Div", [y, step])]), step])
    return g.node("Clip", [rounded, g.const(-fmt.max_value), g.const(fmt.max_value)])


def _block_activation(g: Graph, x: str, amax: str, fmt: Format, channel_axis: int, name: str) -> str:
    """A block-scaled input: channels last, padded to whole blocks, each block scaled as fliqs scales it (MX: a power
    of two from its amax; NVFP4: its amax over 6 x the tensor scale, rounded to E4M3), rounded, scaled back."""
    conv = channel_axis == 1
    rows = g.node("Transpose", [x], perm=[0, 2, 3, 1]) if conv else x
    size = fmt.block.size
    channels = g.node("Slice", [g.node("Shape", [rows]), g.ints([-1]), g.ints([2**62]), g.ints([0])])
    padding = g.node("Mod", [g.node("Sub", [g.ints([size]), g.node("Mod", [channels, g.ints([size])])]),
                             g.ints([size])])
    rank = 4 if conv else 2
    pads = g.node("Concat", [g.ints([0] * (2 * rank - 1)), padding], axis=0)
    padded = g.node("Pad", [rows, pads])
    blocks = g.node("Reshape", [padded, g.ints([0] * (rank - 1) + [-1, size])])
    block_amax = g.node("ReduceMax", [g.node("Abs", [blocks]), g.ints([-1])], keepdims=1)
    if fmt.block.tensor_scale:  # NVFP4
        tensor_scale = g.node("Div", [amax, g.const(rounding.NVFP4_TENSOR_RANGE)])
        ratio = g.node("Div", [block_amax, g.node("Mul", [g.const(FORMATS["fp4_e2m1"].max_value), tensor_scale])])
        scale = g.node("Mul", [round_emulated(g, ratio, _E4M3), tensor_scale])
    else:  # MX: 2**clamp(floor(log2 amax) - emax, E8M0's range); an all-zero block takes any scale
        safe = g.node("Max", [block_amax, g.const(2.0 ** -126)])
        exponent = g.node("Clip", [g.node("Sub", [floor_log2(g, safe), g.const(float(fmt.emax))]),
                                   g.const(float(E8M0_EXP_RANGE[0])), g.const(float(E8M0_EXP_RANGE[1]))])
        scale = g.node("Pow", [g.const(2.0), exponent])
    zero = g.node("Equal", [scale, g.const(0.0)])
    divisor = g.node("Where", [zero, g.const(1.0), scale])
    rounded = round_emulated(g, g.node("Div", [blocks, divisor]), fmt)
    dequantized = g.node("Mul", [rounded, scale])
    flat = g.node("Reshape", [dequantized, g.ints([0] * (rank - 1) + [-1])])
    out = g.node("Slice", [flat, g.ints([0]), channels, g.ints([rank - 1])])
    return g.node("Transpose", [out], name, perm=[0, 3, 1, 2]) if conv else g.node("Identity", [out], name)

