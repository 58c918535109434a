"""torch modules and functions of a traced network as ONNX ops: the part of the ONNX export that knows nothing of
quantization (`fliqs.export.onnx` puts the quantized layers in; `fliqs.export.onnx_formats` says how).

`Graph` builds the graph (unique names, constants as initializers); `onnx_module`, `onnx_function` and
`onnx_method` translate the trace's nodes, and refuse anything else in one line.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fliqs.export.errors import ExportError


class Graph:
    """A small ONNX graph builder: unique names, constants as initializers (float32 unless told)."""

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

    def initializer(self, hint: str, type_name: str, values) -> str:
        """A constant of ONNX type ``type_name`` (e.g. "INT4") holding ``values`` (an array or tensor of exactly
        representable values), stored raw: INT4 / UINT4 / FLOAT4E2M1 packed two to a byte, the others one value
        per element of their width (onnx's own typed fields would store an int8 code as a varint of up to 10
        bytes)."""
        import ml_dtypes

        dtypes = {"INT8": np.int8, "UINT8": np.uint8, "INT4": ml_dtypes.int4, "UINT4": ml_dtypes.uint4,
                  "FLOAT8E4M3FN": ml_dtypes.float8_e4m3fn, "FLOAT8E5M2": ml_dtypes.float8_e5m2,
                  "FLOAT4E2M1": ml_dtypes.float4_e2m1fn, "BFLOAT16": ml_dtypes.bfloat16, "FLOAT16": np.float16,
                  "FLOAT": np.float32, "INT64": np.int64}
        array = values.detach().cpu().float().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        name = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(array.astype(np.float32).astype(dtypes[type_name])
                                                            if type_name != "INT64" else array.astype(np.int64), name))
        return name

    def ints(self, values: list[int], hint: str = "shape") -> str:
        return self.const(list(values), hint, self.T.INT64)


def onnx_module(g: Graph, m: nn.Module, target: str, x: str) -> str:
    """A torch.nn module of the trace as ONNX ops on ``x``; anything else is refused in one line."""
    if isinstance(m, nn.Conv2d):
        return conv(g, m, x, g.const(m.weight, f"{target}.weight"), target)
    if isinstance(m, nn.Linear):
        return linear(g, m, x, g.const(m.weight, f"{target}.weight"), target)
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
        k, s, p = (pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
        attrs = {"kernel_shape": k, "strides": s, "pads": p + p, "ceil_mode": int(m.ceil_mode)}
        if isinstance(m, nn.MaxPool2d):
            return g.node("MaxPool", [x], target, dilations=pair(m.dilation), **attrs)
        if m.divisor_override is not None:
            raise ExportError(f"ONNX export: {target} has a divisor_override")
        return g.node("AveragePool", [x], target, count_include_pad=int(m.count_include_pad), **attrs)
    raise ExportError(f"ONNX export: module {target} ({type(m).__name__}) is not supported")


def pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def conv(g: Graph, layer: nn.Conv2d, x: str, weight: str, target: str) -> str:
    """``layer`` as an ONNX Conv on ``x`` with ``weight`` (a tensor name: a constant or a dequantized weight)."""
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ExportError(f"ONNX export: {target} uses padding {layer.padding!r} / {layer.padding_mode!r}")
    p = pair(layer.padding)
    bias = [g.const(layer.bias, f"{target}.bias")] if layer.bias is not None else []
    return g.node("Conv", [x, weight, *bias], target, strides=pair(layer.stride), pads=p + p,
                  dilations=pair(layer.dilation), group=layer.groups, kernel_shape=list(layer.kernel_size))


def linear(g: Graph, layer: nn.Linear, x: str, weight: str, target: str) -> str:
    bias = [g.const(layer.bias, f"{target}.bias")] if layer.bias is not None else []
    return g.node("Gemm", [x, weight, *bias], target, transB=1)


_BINARY = {operator.add: "Add", torch.add: "Add", operator.mul: "Mul", torch.mul: "Mul", operator.sub: "Sub",
           torch.sub: "Sub", operator.truediv: "Div", torch.div: "Div"}
_UNARY = {F.relu: "Relu", torch.relu: "Relu", torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid"}


def onnx_function(g: Graph, node: torch.fx.Node, arg) -> str:
    """A torch function call of the trace as ONNX ops; ``arg`` maps an argument to a tensor name."""
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


def onnx_method(g: Graph, node: torch.fx.Node, arg) -> str:
    """A tensor method call of the trace as ONNX ops."""
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
