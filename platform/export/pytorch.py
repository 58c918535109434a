"""Export a searched model out of fliqs: a standalone PyTorch folder, and optionally an ONNX graph with Q/DQ nodes.

`export_model` writes a folder that needs only PyTorch:

* ``weights.pt``: the state dict, plain tensors (``torch.load(..., weights_only=True)``);
* ``assignment.json``: per quantized layer its kind, weight format, activation format and range mode, plus the
  input the network expects, the run's reported metrics and, with ``onnx``, how each layer is expressed in ONNX;
* ``model.py``: the network as plain torch modules (generated from a ``torch.fx`` trace of fliqs' network: the same
  module names, the same torch calls in the same order) and a copy of fliqs' rounding (`fliqs.quant.rounding`), so its
  output equals fliqs' model bit for bit on the same batches. ``model.load()`` rebuilds it. model.py is the file
  `fliqs.export.model_template` with its placeholders filled (`_model_source`; the template's docstring says how);
* ``model.onnx`` (``onnx=True``): QuantizeLinear/DequantizeLinear at every quantized layer for the formats ONNX
  has, written by `fliqs.export.onnx` (its `onnx_plan` says what each format becomes; formats without an ONNX type
  fall back as it says).

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
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
from torch import nn

from fliqs.errors import BadInput
from fliqs.export.errors import ExportError  # also importable from here, as before the split
from fliqs.export.onnx import ONNX_FILE, export_onnx
from fliqs.quant import rounding as fakequant
from fliqs.quant.formats import FORMATS
from fliqs.quant.layers import QuantLayer

EXPORT_FORMAT = "fliqs-export/1"
# The export folder's files; the fourth, ONNX_FILE (imported above), is named by the ONNX writer.
MODEL_PY, WEIGHTS_FILE, SPEC_FILE = "model.py", "weights.pt", "assignment.json"
PROBE_BATCH = 16


# -- tracing --------------------------------------------------------------------------------------------------------
class _Tracer(torch.fx.Tracer):
    """torch.nn modules and fliqs' QuantLayers are leaves; every other module is traced through."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, name)


ALLOWED_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``model``'s ``torch.fx`` trace, its QuantLayers and torch.nn modules as leaves; one line if it does not trace."""
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
    """Refuse, in one line, a trace that calls non-torch functions or modules model.py cannot rebuild."""
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
_TEMPLATE = Path(__file__).with_name("model_template.py")  # read as text, never imported
# The template's docstring ends with model.py's own, after the line `_DOCSTRING_START`; then come the placeholder
# lines the exporter replaces (model_template.py's docstring says with what).
_DOCSTRING_START = "\nmodel.py's docstring, its {fields} filled by fliqs export:\n"
_FORMATS_LINE = "FORMATS = {}  # filled by fliqs export"
_PREPROCESSING_LINE = "PREPROCESSING = {}  # filled by fliqs export"
_ROUNDING_LINE = ("from fliqs.quant.rounding import E8M0_BLOCKS, NVFP4_BLOCKS, amax_per_channel, amax_per_tensor, "
                  "blocks_last, blocks_restore, fake_quantize  # noqa: E402, E501, I001 # filled by fliqs export")
_MODULES_LINE = "        # filled by fliqs export: the modules"
_FORWARD_LINE = "    # filled by fliqs export: forward"
_FAKEQUANT_FUNCTIONS = ("round_to_format", "amax_per_tensor", "amax_per_channel", "quantize", "quantize_dequantize",
                        "pow2_floor", "block_scale_factors", "block_scales", "blocks_last", "blocks_restore",
                        "fake_quantize")
_FAKEQUANT_CONSTANTS = ("MAX_VALUE", "POW2_MAN_BITS", "POW2_EMIN", "SCALED", "E8M0_BLOCKS", "NVFP4_BLOCKS",
                        "POW2_EMAX", "AMAX_EPS", "_F32_MAX_BINADE", "MX_BLOCK_SIZE", "NVFP4_BLOCK_SIZE", "_E8M0_MIN",
                        "_E8M0_MAX", "_E4M3", "_E2M1_MAX", "NVFP4_TENSOR_RANGE")


def _fakequant_source() -> str:
    """fliqs' rounding functions and the constants they read, as source (`fliqs.quant.rounding`, verbatim)."""
    constants = {name: getattr(fakequant, name) for name in _FAKEQUANT_CONSTANTS}
    lines = [f"{k} = {v!r}" for k, v in constants.items()]
    lines.append(f"_F32_EXP_MASK = {fakequant._F32_EXP_MASK:#x}")
    for name in _FAKEQUANT_FUNCTIONS:
        lines.append("\n\n" + inspect.getsource(getattr(fakequant, name)).rstrip())
    return "\n".join(lines)


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


def _module_lines(gm: torch.fx.GraphModule) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``Network.__init__``'s lines that build ``gm``'s modules and tensors, and the state dict they load."""
    init, state, seen = ["L = layers  # noqa: N806"], {}, set()
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
    return init, state


def _is_parameter(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _fill(text: str, line: str, value: str) -> str:
    """``text`` with its one line ``line`` replaced by ``value``."""
    parts = text.split(f"\n{line}\n")
    if len(parts) != 2:
        raise RuntimeError(f"{_TEMPLATE.name} must have the line {line.strip()!r} once, not {len(parts) - 1} times")
    return f"{parts[0]}\n{value}\n{parts[1]}"


def _model_source(gm: torch.fx.GraphModule, title: str, info: dict,
                  preprocessing: dict) -> tuple[str, dict[str, torch.Tensor]]:
    """model.py's text (the template, filled) and the state dict its Network loads."""
    init, state = _module_lines(gm)
    template_doc, body = _TEMPLATE.read_text(encoding="utf-8").split('\n"""\n', 1)  # the docstring, the code
    docstring = template_doc.split(_DOCSTRING_START, 1)[1].format(
        title=title, export_format=EXPORT_FORMAT, preprocessing=preprocessing.get("steps", "none given"), **info)
    formats = {name: tuple(fakequant.format_tensor(name).tolist()) for name in FORMATS}
    body = _fill(body, _FORMATS_LINE, "FORMATS = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in formats.items())
                 + "}")
    body = _fill(body, _PREPROCESSING_LINE, f"PREPROCESSING = {preprocessing!r}")
    body = _fill(body, _ROUNDING_LINE, _fakequant_source())
    body = _fill(body, _MODULES_LINE, textwrap.indent("\n".join(init), " " * 8))
    body = _fill(body, _FORWARD_LINE, textwrap.indent(gm.graph.python_code(root_module="self").src.strip(), "    "))
    source = f'"""{docstring}\n"""\n{body}'
    return source, {k: v.detach().cpu().clone() for k, v in state.items()}


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
                 float4: str = "emulate", preprocessing: dict | None = None) -> dict:
    """Write ``out`` (see the module docstring) for ``model`` (fliqs' network at its final formats, on the CPU);
    returns assignment.json's content. ``input_shape``: (channels, height, width); ``preprocessing``: what a raw
    input goes through (`fliqs.data.preprocessing.Preprocessing.describe`), carried by model.py and the ONNX graph."""
    if float4 not in ("emulate", "qdq"):
        raise ExportError(f"--onnx-float4 must be 'emulate' or 'qdq', not {float4!r}")
    model = model.cpu().eval()
    gm = trace(model)
    _check_graph(gm)
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ExportError(f"cannot export {title}: it has no quantized layers (not a fliqs network)")
    c, h, w = input_shape
    preprocessing = dict(preprocessing or {})
    source, state = _model_source(gm, title, {"in_chans": c, "size": h, "batch_size": batch_size}, preprocessing)
    spec = {"format": EXPORT_FORMAT, "title": title, "input": {"shape": ["N", c, h, w], "dtype": "float32",
                                                               "preprocessing": preprocessing},
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
            spec["onnx"] = export_onnx(gm, folder / ONNX_FILE, input_shape, list(expected.shape[1:]), float4,
                                       preprocessing)
            (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_PY, WEIGHTS_FILE, SPEC_FILE, ONNX_FILE):
            if (folder / name).exists():
                shutil.copy2(folder / name, out / name)
            elif (out / name).exists():
                (out / name).unlink()  # a stale ONNX file of an earlier export
    return spec
