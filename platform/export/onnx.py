"""The ONNX graph of `fliqs export --onnx`: fliqs' traced network with its quantized layers in low-bit types.

`export_onnx` writes ``model.onnx`` from the ``torch.fx`` trace `fliqs.export.pytorch` makes. Each quantized layer's
weight is stored as codes in the narrowest type onnxruntime decodes and its input is quantized as fliqs does,
both as `fliqs.export.onnx_formats` says (its module docstring has the table); the other modules and functions of
the trace become their ONNX ops (`fliqs.export.onnx_graph`), and anything else is refused in one line. The graph
carries the input's preprocessing and the label names in its metadata (``metadata_props``, keys `METADATA_KEYS`).
The ``onnx`` package is imported only when a graph is written (``pip install 'fliqs[onnx]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.fx
from torch import nn

from fliqs.export.errors import ExportError
from fliqs.export.onnx_formats import activation_plan, encode_weight, quantize_activation, weight_plan
from fliqs.export.onnx_graph import Graph, conv, linear, onnx_function, onnx_method, onnx_module
from fliqs.quant.layers import QuantLayer

ONNX_FILE = "model.onnx"  # in the export folder, beside `fliqs.export.pytorch`'s files
ONNX_OPSET = 21  # int4 / uint4, float8 and blocked Q/DQ; 23 for float4 (``float4="qdq"``)
ONNX_OPSET_FLOAT4 = 23
PRODUCER = "fliqs-export"  # the ONNX graph's producer and name
METADATA_KEYS = ("fliqs.preprocessing", "fliqs.labels", "fliqs.layers")


def _onnx():
    """The onnx package, imported on first use (it is an optional dependency)."""
    try:
        import onnx
    except ImportError:
        raise ExportError("--onnx needs the onnx package: pip install 'fliqs[onnx]'") from None
    return onnx


def layer_plan(q: QuantLayer, float4: str = "emulate") -> dict:
    """What the layer becomes in ONNX: {"w": ..., "a": ..., "types": the ONNX types it uses}."""
    w, a = weight_plan(q.w_format, float4), activation_plan(q.a_format, q.act_quant.range_mode.value == "ema")
    return {"w": f"{q.w_format.name}: {w['how']}", "a": f"{q.a_format.name}: {a['how']}",
            "types": sorted(t for t in {w["type"], a["type"]} if t)}


def export_onnx(gm: torch.fx.GraphModule, path: Path, input_shape: tuple[int, int, int], output_shape: list[int],
                float4: str = "emulate", preprocessing: dict | None = None) -> dict:
    """Write ``gm`` (fliqs' traced network) as ONNX; returns {"opset", "file", "bytes", "layers": {name: {"w",
    "a"}}}. ``preprocessing``: what the input expects (`fliqs.data.datasets.Preprocessing.describe`), kept in the
    graph's metadata with the label names."""
    onnx = _onnx()
    g = Graph(onnx)
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
            m, x = gm.get_submodule(node.target), env[node.args[0].name]
            if isinstance(m, QuantLayer):
                report[m.name] = layer_plan(m, float4)
                env[node.name] = _quantized_layer(g, m, node.target, x, float4)
            else:
                env[node.name] = onnx_module(g, m, node.target, x)
        elif node.op == "call_function":
            env[node.name] = onnx_function(g, node, arg)
        elif node.op == "call_method":
            env[node.name] = onnx_method(g, node, arg)
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
    layers = {k: {"w": v["w"], "a": v["a"]} for k, v in report.items()}
    preprocessing = dict(preprocessing or {})
    metadata = {"fliqs.preprocessing": json.dumps({k: v for k, v in preprocessing.items() if k != "labels"}),
                "fliqs.labels": json.dumps(preprocessing.get("labels")), "fliqs.layers": json.dumps(layers)}
    h.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return {"opset": opset, "file": ONNX_FILE, "bytes": path.stat().st_size, "layers": layers}


def _quantized_layer(g: Graph, m: QuantLayer, target: str, x: str, float4: str) -> str:
    xq = quantize_activation(g, x, m)
    weight = encode_weight(g, m, float4)
    if isinstance(m.layer, nn.Conv2d):
        return conv(g, m.layer, xq, weight, target)
    return linear(g, m.layer, xq, weight, target)
