"""Export a searched model out of fliqs: a standalone PyTorch folder, and optionally an ONNX graph with Q/DQ nodes.

`export_model` writes a folder that needs only PyTorch:

* ``weights.pt``: the state dict, plain tensors (``torch.load(..., weights_only=True)``);
* ``assignment.json``: per quantized layer its kind, weight format, activation format and range mode, plus the
  input the network expects, the run's reported metrics and, with ``onnx``, how each layer is expressed in ONNX;
* ``model.py``: the network as plain torch modules (generated from a ``torch.fx`` trace of fliqs' network: the same
  module names, the same torch calls in the same order) and a copy of fliqs' rounding (`fliqs.fakequant`), so its
  output equals fliqs' model bit for bit on the same batches. ``model.load()`` rebuilds it;
* ``model.onnx`` (``onnx=True``): QuantizeLinear/DequantizeLinear at every quantized layer for the formats ONNX
  has (`onnx_plan` says what each format becomes; formats without an ONNX type fall back as it says).

The export checks itself: the generated model runs next to fliqs' on a probe batch and must give identical logits,
or nothing is exported. `load_export` is fliqs' own loader of such a folder.

Supported: networks whose quantized layers are plain ``nn.Conv2d`` / ``nn.Linear`` inside fliqs' `QuantLayer`,
whose other modules are ``torch.nn`` modules and whose forward traces with ``torch.fx`` into torch calls only:
fliqs_cnn, timm's ResNets and similar CNNs, the standalone network of a FLIQNAS search (after extraction it is a
plain network). A model with other code in its forward (timm's ``Conv2dSame`` / ``StdConv2d`` layers, data-
dependent control flow, non-torch functions) is refused in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import math
import operator
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fliqs import fakequant
from fliqs.errors import BadInput
from fliqs.formats import FORMATS, Format
from fliqs.layers import QuantLayer

EXPORT_FORMAT = "fliqs-export/1"
MODEL_PY, WEIGHTS_FILE, SPEC_FILE, ONNX_FILE = "model.py", "weights.pt", "assignment.json", "model.onnx"
PROBE_BATCH = 16
ONNX_OPSET = 21  # int4 and float8 Q/DQ; 23 for float4 (``float4="qdq"``)
ONNX_OPSET_FLOAT4 = 23
PRODUCER = "fliqs-export"  # the ONNX graph's producer and name


class ExportError(BadInput):
    """A model or an option the exporter cannot express: one line."""


# -- tracing --------------------------------------------------------------------------------------------------------
class _Tracer(torch.fx.Tracer):
    """torch.nn modules and fliqs' QuantLayers are leaves; every other module is traced through."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, name)


ALLOWED_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: not expressible as plain torch code
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"cannot export {type(model).__name__}: its forward does not trace with torch.fx "
                          f"({first[:200]})") from None
    return torch.fx.GraphModule(model, graph)


def _function_module(fn) -> str:
    return getattr(fn, "__module__", None) or type(fn).__module__ or ""


def _check_graph(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and _function_module(node.target).split(".")[0] not in ALLOWED_MODULES:
            raise ExportError(f"cannot export: the forward calls {_function_module(node.target)}."
                              f"{getattr(node.target, '__name__', node.target)}, which is not a torch function")
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, QuantLayer):
                if type(m.layer) not in (nn.Conv2d, nn.Linear):
                    raise ExportError(f"cannot export layer {m.name!r}: it wraps {type(m.layer).__module__}."
                                      f"{type(m.layer).__name__}, whose forward is not plain torch (only nn.Conv2d "
                                      f"and nn.Linear are exported)")
            elif not type(m).__module__.startswith("torch.nn") or any(True for _ in m.children()):
                raise ExportError(f"cannot export module {node.target!r} ({type(m).__name__})")


# -- model.py -------------------------------------------------------------------------------------------------------
_FAKEQUANT_FUNCTIONS = ("round_to_format", "amax_per_tensor", "amax_per_channel", "quantize_dequantize",
                        "fake_quantize")
_MODEL_HEADER = '''\
"""{title}: exported by fliqs ({export_format}); needs only PyTorch.

    import importlib.util
    spec = importlib.util.spec_from_file_location("model", "{folder_hint}/model.py")
    model = importlib.util.module_from_spec(spec); spec.loader.exec_module(model)
    net = model.load()            # weights.pt and assignment.json beside this file; evaluation mode, CPU
    logits = net(x)               # x: N x {in_chans} x {size} x {size} float32, normalised as fliqs' data pipeline does

Every quantized conv / linear fake-quantizes its weight per output channel and its input per tensor in its format
(assignment.json) with fliqs' own rounding, copied below from fliqs.fakequant: round to nearest, ties to even,
saturate, amax mapped to the format's largest value for formats of at most 8 bits. The output equals fliqs' model
bit for bit on the same batches. With act_range "dynamic" an input's range is the batch's own amax: a sample's
logits depend on the batch it is in (fliqs evaluates in batches of {batch_size}, in order).
"""

from __future__ import annotations

import json
from math import inf, nan  # noqa: F401  (names the traced code may use)
from pathlib import Path

import torch
from torch import nn

NoneType = type(None)
device = torch.device
_torch_Tensor_ = torch.Tensor

# name: (max_value, 2**man_bits, 2**emin, scaled)
FORMATS = {formats}
'''

_MODEL_CLASSES = '''

def format_tensor(name: str) -> torch.Tensor:
    return torch.tensor(FORMATS[name], dtype=torch.float32)


class _Quantized:
    """Weight (per output channel) and input (per tensor) fake quantization of a conv / linear layer."""

    def _setup(self, w: str, a: str, act_range: str) -> None:
        self.w_format, self.a_format, self.act_range = w, a, act_range
        self.register_buffer("w_fmt", format_tensor(w), persistent=False)
        self.register_buffer("a_fmt", format_tensor(a), persistent=False)
        self.register_buffer("act_amax", torch.zeros((), dtype=torch.float32))  # the calibrated range ("ema")

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, amax_per_channel(self.weight, 0), self.w_fmt)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        amax = self.act_amax if self.act_range == "ema" else amax_per_tensor(x)
        return fake_quantize(x, amax, self.a_fmt)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w={self.w_format}, a={self.a_format}, range={self.act_range}"


class QuantConv2d(_Quantized, nn.Conv2d):
    def __init__(self, *args, w: str, a: str, act_range: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(w, a, act_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return self._conv_forward(self.quantized_input(x), weight, self.bias)


class QuantLinear(_Quantized, nn.Linear):
    def __init__(self, *args, w: str, a: str, act_range: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(w, a, act_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return torch.nn.functional.linear(self.quantized_input(x), weight, self.bias)


class Network(nn.Module):
    """The exported network; ``layers``: assignment.json's {layer: {"w", "a", "act_range"}}."""

    def __init__(self, layers: dict):
        super().__init__()
        L = layers  # noqa: N806
{init}

    def _put(self, path: str, module: nn.Module) -> None:
        parent = self
        *outer, last = path.split(".")
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, module)

    def _put_tensor(self, path: str, shape: tuple, parameter: bool) -> None:
        parent = self
        *outer, last = path.split(".")
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        tensor = torch.zeros(shape)
        if parameter:
            parent.register_parameter(last, nn.Parameter(tensor))
        else:
            parent.register_buffer(last, tensor)

{forward}


def load(folder: str | Path | None = None, map_location: str | torch.device = "cpu") -> Network:
    """The exported network from ``folder`` (default: this file's folder), in evaluation mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    spec = json.loads((folder / "assignment.json").read_text())
    net = Network(spec["layers"])
    net.load_state_dict(torch.load(folder / "weights.pt", map_location=map_location, weights_only=True))
    return net.eval()
'''


def _fakequant_source() -> str:
    constants = {name: getattr(fakequant, name) for name in
                 ("MAX_VALUE", "POW2_MAN_BITS", "POW2_EMIN", "SCALED", "AMAX_EPS", "_F32_MAX_BINADE")}
    lines = ["\n# -- fliqs' rounding (fliqs.fakequant), copied verbatim ----------------------------------------------"]
    lines += [f"{k} = {v!r}" for k, v in constants.items()]
    lines.append(f"_F32_EXP_MASK = {fakequant._F32_EXP_MASK:#x}")
    for name in _FAKEQUANT_FUNCTIONS:
        lines.append("\n\n" + inspect.getsource(getattr(fakequant, name)).rstrip())
    return "\n".join(lines) + "\n"


def _constructor(m: nn.Module) -> str:
    """Source that builds a module like ``m`` (a torch.nn module: its one-line repr is its constructor call)."""
    text = repr(m)
    if "\n" in text:
        raise ExportError(f"cannot export {type(m).__name__}: no one-line constructor")
    return f"nn.{text}"


def _quant_constructor(q: QuantLayer) -> str:
    layer, name = q.layer, json.dumps(q.name)
    fmt = f"w=L[{name}]['w'], a=L[{name}]['a'], act_range=L[{name}]['act_range']"
    if isinstance(layer, nn.Conv2d):
        return (f"QuantConv2d({layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, "
                f"stride={layer.stride}, padding={layer.padding!r}, dilation={layer.dilation}, groups={layer.groups}, "
                f"bias={layer.bias is not None}, padding_mode={layer.padding_mode!r}, {fmt})")
    return f"QuantLinear({layer.in_features}, {layer.out_features}, bias={layer.bias is not None}, {fmt})"


def _model_source(gm: torch.fx.GraphModule, title: str, info: dict) -> tuple[str, dict[str, torch.Tensor]]:
    """model.py's text and the state dict its Network loads."""
    init, state, seen = [], {}, set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen:
            seen.add(node.target)
            m = gm.get_submodule(node.target)
            if isinstance(m, QuantLayer):
                init.append(f"self._put({node.target!r}, {_quant_constructor(m)})")
                state[f"{node.target}.weight"] = m.layer.weight
                if m.layer.bias is not None:
                    state[f"{node.target}.bias"] = m.layer.bias
                state[f"{node.target}.act_amax"] = m.act_quant.running_amax
            else:
                init.append(f"self._put({node.target!r}, {_constructor(m)})")
                state.update({f"{node.target}.{k}": v for k, v in m.state_dict().items()})
        elif node.op == "get_attr" and node.target not in seen:
            seen.add(node.target)
            value = gm.get_parameter(node.target) if _is_parameter(gm, node.target) else gm.get_buffer(node.target)
            init.append(f"self._put_tensor({node.target!r}, {tuple(value.shape)}, "
                        f"parameter={isinstance(value, nn.Parameter)})")
            state[node.target] = value
    code = gm.graph.python_code(root_module="self")
    forward = textwrap.indent(code.src.strip(), "    ")
    formats = {f.name: (f.max_value, 2.0**f.man_bits, 2.0**f.emin, float(f.scaled)) for f in FORMATS.values()}
    header = _MODEL_HEADER.format(title=title, export_format=EXPORT_FORMAT, folder_hint="<export folder>",
                                  formats="{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in formats.items()) + "}",
                                  **info)
    body = _MODEL_CLASSES.replace("{init}", textwrap.indent("\n".join(init), " " * 8)).replace("{forward}", forward)
    source = header + _fakequant_source() + body
    return source, {k: v.detach().cpu().clone() for k, v in state.items()}


def _is_parameter(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


# -- the export -----------------------------------------------------------------------------------------------------
@dataclass
class ExportedModel:
    network: nn.Module  # model.py's Network, in evaluation mode
    spec: dict  # assignment.json
    folder: Path


def load_module(folder: str | Path):
    """Import ``folder/model.py`` under a name of its own (several exports can be loaded side by side)."""
    path = Path(folder).resolve() / MODEL_PY
    if not path.exists():
        raise BadInput(f"{folder} is not a fliqs export (no {MODEL_PY})")
    name = "fliqs_export_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_export(folder: str | Path, map_location: str | torch.device = "cpu") -> ExportedModel:
    """fliqs' loader of an export folder: the network of its model.py with its weights, and assignment.json."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / SPEC_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BadInput(f"{folder} is not a fliqs export: {err}") from None
    if spec.get("format") != EXPORT_FORMAT:
        raise BadInput(f"{folder} is not a {EXPORT_FORMAT} export")
    return ExportedModel(load_module(folder).load(folder, map_location), spec, folder)


def _layer_spec(q: QuantLayer) -> dict:
    return {"kind": q.kind, "w": q.w_format.name, "a": q.a_format.name, "act_range": q.act_quant.range_mode.value}


def export_model(model: nn.Module, out: str | Path, *, title: str, input_shape: tuple[int, int, int],
                 metadata: dict | None = None, batch_size: int = 64, onnx: bool = False,
                 float4: str = "emulate") -> dict:
    """Write ``out`` (see the module docstring) for ``model`` (fliqs' network at its final formats, on the CPU);
    returns assignment.json's content. ``input_shape``: (channels, height, width)."""
    if float4 not in ("emulate", "qdq"):
        raise ExportError(f"--onnx-float4 must be 'emulate' or 'qdq', not {float4!r}")
    model = model.cpu().eval()
    gm = trace(model)
    _check_graph(gm)
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ExportError(f"cannot export {title}: it has no quantized layers (not a fliqs network)")
    c, h, w = input_shape
    source, state = _model_source(gm, title, {"in_chans": c, "size": h, "batch_size": batch_size})
    spec = {"format": EXPORT_FORMAT, "title": title, "input": {"shape": ["N", c, h, w], "dtype": "float32"},
            "layers": {q.name: _layer_spec(q) for q in layers}, **(metadata or {})}
    probe = torch.randn(PROBE_BATCH, c, h, w, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        folder = Path(tmp)
        (folder / MODEL_PY).write_text(source)
        torch.save(state, folder / WEIGHTS_FILE)
        (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        exported = load_module(folder).load(folder)
        with torch.no_grad():
            expected, got = model(probe), exported(probe)
        if not torch.equal(expected, got):
            raise ExportError(f"cannot export {title}: the generated model.py does not reproduce fliqs' logits bit "
                              f"for bit (max difference {(expected - got).abs().max().item():.3g})")
        if onnx:
            spec["onnx"] = export_onnx(gm, folder / ONNX_FILE, input_shape, list(expected.shape[1:]), float4)
            (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_PY, WEIGHTS_FILE, SPEC_FILE, ONNX_FILE):
            if (folder / name).exists():
                shutil.copy2(folder / name, out / name)
            elif (out / name).exists():
                (out / name).unlink()  # a stale ONNX file of an earlier export
    return spec


# -- ONNX -----------------------------------------------------------------------------------------------------------
def _onnx():
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
