"""The ONNX graph of `fliqs export --onnx`: fliqs' traced network with QuantizeLinear/DequantizeLinear nodes.

`export_onnx` writes ``model.onnx`` from the ``torch.fx`` trace `fliqs.export.pytorch` makes: every quantized layer's
input goes through QuantizeLinear + DequantizeLinear and its weight is stored as codes in the format's ONNX type
with a per-channel DequantizeLinear, for the formats ONNX has. `onnx_plan` says what each format becomes; formats
without an ONNX type (or without an onnxruntime kernel) fall back as it says: int2/int3 as int8 codes clipped to
their range, bf16/fp16 as casts, fp6 and float4 as fliqs' rounding emulated in float ops (`_emulate_rounding`).
The other modules and functions of the trace become their ONNX ops (`_onnx_module`, `_onnx_function`,
`_onnx_method`); anything else is refused in one line. The ``onnx`` package is imported only when a graph is
written (``pip install 'fliqs[onnx]'``).
"""

from __future__ import annotations

import math
import operator
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fliqs.export.errors import ExportError
from fliqs.quant import rounding as fakequant
from fliqs.quant.formats import Format
from fliqs.quant.layers import QuantLayer

ONNX_FILE = "model.onnx"  # in the export folder, beside `fliqs.export.pytorch`'s files
ONNX_OPSET = 21  # int4 and float8 Q/DQ; 23 for float4 (``float4="qdq"``)
ONNX_OPSET_FLOAT4 = 23
PRODUCER = "fliqs-export"  # the ONNX graph's producer and name


def _onnx():
    """The onnx package, imported on first use (it is an optional dependency)."""
    try:
        import onnx
    except ImportError:
        raise ExportError("--onnx needs the onnx package: pip install 'fliqs[onnx]'") from None
    return onnx


# What each format becomes in ONNX. The integer codes of int2 and int3 fit int8; fp6 has no ONNX type; onnxruntime
# (CPU, 1.32) has no float4 QuantizeLinear kernel, so float4 is emulated unless ``float4="qdq"``.
def onnx_plan(fmt: Format, float4: str = "emulate") -> dict:
    """How ``fmt`` is expressed: {"type": the ONNX element type of its codes (None: float), "weight": ...,
    "activation": ...} (short descriptions, for assignment.json and the console)."""
    if fmt.name == "fp32":
        return {"type": None, "weight": "float", "activation": "float (not quantized)"}
    constants = "float constants holding the quantized weights"
    if not fmt.scaled:  # bf16, fp16: casts
        return {"type": {"bf16": "BFLOAT16", "fp16": "FLOAT16"}[fmt.name], "cast": True, "weight": constants,
                "activation": f"Cast to {fmt.name} and back"}
    if fmt.kind == "int":
        if fmt.bits in (8, 4):
            kind = f"int{fmt.bits}"
            return {"type": f"INT{fmt.bits}", "weight": f"{kind} codes, DequantizeLinear per channel",
                    "activation": f"QuantizeLinear/DequantizeLinear {kind} (clipped to +-{int(fmt.max_value)})"}
        return {"type": "INT8", "weight": f"int8 codes in +-{int(fmt.max_value)}, DequantizeLinear per channel",
                "activation": f"QuantizeLinear/DequantizeLinear int8 clipped to +-{int(fmt.max_value)} "
                              f"(no int{fmt.bits} type)"}
    native = {"fp8_e4m3": "FLOAT8E4M3FN", "fp8_e5m2": "FLOAT8E5M2"}
    if fmt.name == "fp4_e2m1" and float4 == "qdq":
        native[fmt.name] = "FLOAT4E2M1"
    if fmt.name in native:
        kind = native[fmt.name].lower()
        return {"type": native[fmt.name], "weight": f"{kind} codes, DequantizeLinear per channel",
                "activation": f"QuantizeLinear/DequantizeLinear {kind}"}
    why = "no ONNX type" if fmt.name.startswith("fp6") else "no onnxruntime Q/DQ kernel; --onnx-float4 qdq for one"
    return {"type": None, "weight": constants,
            "activation": f"{fmt.name} rounding emulated in float ops ({why})"}


class _Graph:
    """A small ONNX graph builder: unique names, constants as initializers."""

    def __init__(self, onnx):
        self.onnx, self.helper, self.T = onnx, onnx.helper, onnx.TensorProto
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint.replace('.', '_')}_{self._n}"

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value, hint: str = "c", dtype: int | None = None) -> str:
        name = self.name(hint)
        if isinstance(value, torch.Tensor):
            array = value.detach().cpu().float().numpy()
            self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        else:
            values = value if isinstance(value, list | tuple) else [value]
            dims = [] if not isinstance(value, list | tuple) else [len(values)]
            self.inits.append(self.helper.make_tensor(name, dtype or self.T.FLOAT, dims, list(values)))
        return name


def export_onnx(gm: torch.fx.GraphModule, path: Path, input_shape: tuple[int, int, int], output_shape: list[int],
                float4: str = "emulate") -> dict:
    """Write ``gm`` (fliqs' traced network) as ONNX; returns {"opset", "layers": {name: {"w", "a"}}}."""
    onnx = _onnx()
    g = _Graph(onnx)
    env: dict[str, str] = {}
    report: dict[str, dict] = {}

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return env[a.name]
        if isinstance(a, int | float):
            return g.const(float(a))
        raise ExportError(f"ONNX export: argument {a!r} is not supported")

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = "input"
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node):
                raise ExportError("ONNX export: the network must return one tensor")
            env["__output__"] = env[out.name]
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            env[node.name] = _onnx_module(g, m, node.target, env[node.args[0].name], report, float4)
        elif node.op == "call_function":
            env[node.name] = _onnx_function(g, node, arg)
        elif node.op == "call_method":
            env[node.name] = _onnx_method(g, node, arg)
        else:
            raise ExportError(f"ONNX export: {node.op} {node.target} is not supported")
    h, T = g.helper, g.T
    c, hh, ww = input_shape
    g.nodes.append(h.make_node("Identity", [env["__output__"]], ["logits"], name="logits"))
    used = {i for n in g.nodes for i in n.input}
    g.inits = [t for t in g.inits if t.name in used]  # constants of ops a pass-through (Identity) skipped
    graph = h.make_graph(g.nodes, PRODUCER, [h.make_tensor_value_info("input", T.FLOAT, ["N", c, hh, ww])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", *output_shape])], g.inits)
    opset = ONNX_OPSET_FLOAT4 if any("FLOAT4E2M1" in r["types"] for r in report.values()) else ONNX_OPSET
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name=PRODUCER)
    model.ir_version = 10 if opset <= 21 else 11
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return {"opset": opset, "file": ONNX_FILE,
            "layers": {k: {"w": v["w"], "a": v["a"]} for k, v in report.items()}}


def _onnx_module(g: _Graph, m: nn.Module, target: str, x: str, report: dict, float4: str) -> str:
    if isinstance(m, QuantLayer):
        layer = m.layer
        w_plan, a_plan = onnx_plan(m.w_format, float4), onnx_plan(m.a_format, float4)
        xq = _quantize_activation(g, x, m, a_plan)
        weight = _quantized_weight(g, m, w_plan)
        report[m.name] = {"w": f"{m.w_format.name}: {w_plan['weight']}", "a": f"{m.a_format.name}: "
                          f"{a_plan['activation']}", "types": {w_plan["type"], a_plan["type"]}}
        if isinstance(layer, nn.Conv2d):
            return _conv(g, layer, xq, weight, target)
        bias = [g.const(layer.bias, f"{target}.bias")] if layer.bias is not None else []
        return g.node("Gemm", [xq, weight, *bias], target, transB=1)
    if isinstance(m, nn.Conv2d):
        return _conv(g, m, x, g.const(m.weight, f"{target}.weight"), target)
    if isinstance(m, nn.Linear):
        bias = [g.const(m.bias, f"{target}.bias")] if m.bias is not None else []
        return g.node("Gemm", [x, g.const(m.weight, f"{target}.weight"), *bias], target, transB=1)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.running_mean is None:
            raise ExportError(f"ONNX export: {target} is a BatchNorm without running statistics")
        n = m.num_features
        scale = m.weight if m.weight is not None else torch.ones(n)
        shift = m.bias if m.bias is not None else torch.zeros(n)
        return g.node("BatchNormalization", [x, g.const(scale), g.const(shift), g.const(m.running_mean),
                                             g.const(m.running_var)], target, epsilon=float(m.eps))
    if isinstance(m, nn.ReLU):
        return g.node("Relu", [x], target)
    if isinstance(m, nn.ReLU6):
        return g.node("Clip", [x, g.const(0.0), g.const(6.0)], target)
    if isinstance(m, nn.SiLU):
        return g.node("Mul", [x, g.node("Sigmoid", [x])], target)
    if isinstance(m, nn.Sigmoid):
        return g.node("Sigmoid", [x], target)
    if isinstance(m, nn.Hardswish):
        return g.node("HardSwish", [x], target)
    if isinstance(m, nn.Hardsigmoid):
        return g.node("HardSigmoid", [x], target, alpha=1 / 6, beta=0.5)
    if isinstance(m, nn.GELU) and m.approximate == "none":
        return g.node("Mul", [g.node("Mul", [x, g.const(0.5)]), g.node(
            "Add", [g.const(1.0), g.node("Erf", [g.node("Div", [x, g.const(math.sqrt(2.0))])])])], target)
    if isinstance(m, nn.Identity | nn.Dropout):
        return x
    if isinstance(m, nn.Flatten) and m.end_dim == -1:
        return g.node("Flatten", [x], target, axis=m.start_dim)
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        return g.node("GlobalAveragePool", [x], target)
    if isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
        k, s, p = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
        attrs = {"kernel_shape": k, "strides": s, "pads": p + p, "ceil_mode": int(m.ceil_mode)}
        if isinstance(m, nn.MaxPool2d):
            return g.node("MaxPool", [x], target, dilations=_pair(m.dilation), **attrs)
        if m.divisor_override is not None:
            raise ExportError(f"ONNX export: {target} has a divisor_override")
        return g.node("AveragePool", [x], target, count_include_pad=int(m.count_include_pad), **attrs)
    raise ExportError(f"ONNX export: module {target} ({type(m).__name__}) is not supported")


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _conv(g: _Graph, layer: nn.Conv2d, x: str, weight: str, target: str) -> str:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ExportError(f"ONNX export: {target} uses padding {layer.padding!r} / {layer.padding_mode!r}")
    p = _pair(layer.padding)
    bias = [g.const(layer.bias, f"{target}.bias")] if layer.bias is not None else []
    return g.node("Conv", [x, weight, *bias], target, strides=_pair(layer.stride), pads=p + p,
                  dilations=_pair(layer.dilation), group=layer.groups, kernel_shape=list(layer.kernel_size))


def _zero(g: _Graph, type_name: str, n: int | None = None) -> str:
    """A zero point of ONNX type ``type_name``: a scalar, or ``n`` zeros (per channel)."""
    return g.const([0] * n if n else 0, "zero_point", getattr(g.T, type_name))


def _quantized_weight(g: _Graph, q: QuantLayer, plan: dict) -> str:
    """The layer's weight as ONNX sees it: codes in the format's type and a per-channel DequantizeLinear, or (no
    type) float constants holding exactly what fliqs computes."""
    fmt, weight = q.w_format, q.source_weight().detach().float()
    if plan["type"] is None or not fmt.scaled:
        with torch.no_grad():
            return g.const(q.weight_quant(q.source_weight()), f"{q.name}.weight")
    amax = torch.clamp_min(fakequant.amax_per_channel(weight, 0), fakequant.AMAX_EPS)
    codes = fakequant.round_to_format(weight * (fmt.max_value / amax), fmt.max_value, 2.0**fmt.man_bits,
                                      2.0**fmt.emin)
    n = weight.shape[0]
    dtype = getattr(g.T, plan["type"])
    name = g.name(f"{q.name}.weight_q")
    values = [int(v) for v in codes.flatten().tolist()] if fmt.kind == "int" else codes.flatten().tolist()
    g.inits.append(g.helper.make_tensor(name, dtype, list(codes.shape), values))
    scale = g.const((amax / fmt.max_value).flatten(), f"{q.name}.weight_scale")
    return g.node("DequantizeLinear", [name, scale, _zero(g, plan["type"], n)], f"{q.name}.weight", axis=0)


def _quantize_activation(g: _Graph, x: str, q: QuantLayer, plan: dict) -> str:
    fmt = q.a_format
    if fmt.name == "fp32":
        return x
    if plan.get("cast"):
        return g.node("Cast", [g.node("Cast", [x], to=getattr(g.T, plan["type"]))], f"{q.name}.input",
                      to=g.T.FLOAT)
    if q.act_quant.range_mode.value == "ema":
        amax = g.const(max(float(q.act_quant.running_amax), fakequant.AMAX_EPS), f"{q.name}.input_amax")
    else:
        amax = g.node("Max", [g.node("ReduceMax", [g.node("Abs", [x])], keepdims=0), g.const(fakequant.AMAX_EPS)],
                      f"{q.name}.input_amax")
    if plan["type"] is None:
        return _emulate_rounding(g, x, amax, fmt, q.name)
    scale = g.node("Div", [amax, g.const(fmt.max_value)], f"{q.name}.input_scale")
    if fmt.kind == "int":  # symmetric: ONNX's int range has one more negative code
        x = g.node("Clip", [x, g.node("Neg", [amax]), amax])
    zero = _zero(g, plan["type"])
    quantized = g.node("QuantizeLinear", [x, scale, zero], f"{q.name}.input_q")
    return g.node("DequantizeLinear", [quantized, scale, zero], f"{q.name}.input")


def _emulate_rounding(g: _Graph, x: str, amax: str, fmt: Format, name: str) -> str:
    """fliqs' rounding of ``x`` into ``fmt`` in float ops: E = floor(log2|y|) from Log (corrected by one either way
    where Log rounds across a power of two), E = max(E, emin), round y to a multiple of 2**(E - man_bits) (Round:
    half to even), saturate, scale back. Every scaling is by a power of two, so this is fliqs' arithmetic."""
    top, two = g.const(fmt.max_value), g.const(2.0)
    y = g.node("Mul", [x, g.node("Div", [top, amax])])
    a = g.node("Abs", [y])
    e = g.node("Floor", [g.node("Div", [g.node("Log", [a]), g.const(math.log(2.0))])])
    too_big = g.node("Cast", [g.node("Greater", [g.node("Pow", [two, e]), a])], to=g.T.FLOAT)
    e = g.node("Sub", [e, too_big])
    too_small = g.node("Cast", [g.node("LessOrEqual", [g.node("Pow", [two, g.node("Add", [e, g.const(1.0)])]), a])],
                       to=g.T.FLOAT)
    e = g.node("Max", [g.node("Add", [e, too_small]), g.const(float(fmt.emin))])
    step = g.node("Pow", [two, g.node("Sub", [e, g.const(float(fmt.man_bits))])])
    rounded = g.node("Mul", [g.node("Round", [g.node("Div", [y, step])]), step])
    saturated = g.node("Clip", [rounded, g.const(-fmt.max_value), top])
    return g.node("Mul", [g.node("Div", [saturated, top]), amax], f"{name}.input")


_BINARY = {operator.add: "Add", torch.add: "Add", operator.mul: "Mul", torch.mul: "Mul", operator.sub: "Sub",
           torch.sub: "Sub", operator.truediv: "Div", torch.div: "Div"}
_UNARY = {F.relu: "Relu", torch.relu: "Relu", torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid"}


def _onnx_function(g: _Graph, node: torch.fx.Node, arg) -> str:
    fn, args, kwargs = node.target, node.args, node.kwargs
    if fn in _BINARY and not kwargs:
        return g.node(_BINARY[fn], [arg(args[0]), arg(args[1])])
    if fn in _UNARY:
        return g.node(_UNARY[fn], [arg(args[0])])
    if fn is F.relu6:
        return g.node("Clip", [arg(args[0]), g.const(0.0), g.const(6.0)])
    if fn is F.silu:
        x = arg(args[0])
        return g.node("Mul", [x, g.node("Sigmoid", [x])])
    if fn is torch.flatten:
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if end == -1:
            return g.node("Flatten", [arg(args[0])], axis=int(start))
    if fn is F.adaptive_avg_pool2d and (args[1] if len(args) > 1 else kwargs.get("output_size")) in (1, (1, 1)):
        return g.node("GlobalAveragePool", [arg(args[0])])
    if fn is torch.cat:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return g.node("Concat", [arg(a) for a in args[0]], axis=int(dim))
    raise ExportError(f"ONNX export: function {getattr(fn, '__name__', fn)} is not supported")


def _onnx_method(g: _Graph, node: torch.fx.Node, arg) -> str:
    name, args, kwargs = node.target, node.args, node.kwargs
    if name == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        if (args[2] if len(args) > 2 else kwargs.get("end_dim", -1)) == -1:
            return g.node("Flatten", [arg(args[0])], axis=int(start))
    if name == "mean":
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if dims is not None:
            dims = [dims] if isinstance(dims, int) else list(dims)
            axes = g.const(dims, "axes", g.T.INT64)
            return g.node("ReduceMean", [arg(args[0]), axes], keepdims=int(bool(keep)))
    if name in ("relu", "sigmoid"):
        return g.node(name.capitalize(), [arg(args[0])])
    raise ExportError(f"ONNX export: method .{name}() is not supported")
