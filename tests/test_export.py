"""`fliqs export`: a finished run's model as a standalone PyTorch folder and as ONNX, checked against the model
`fliqs evaluate` rebuilds, on the whole test split.

One tiny in-process FLIQS search (the formats onnxruntime's CPU provider runs as Q/DQ: int4, int8, fp8 e4m3 / e5m2)
is shared by the module. The standalone folder must reproduce fliqs' logits bit for bit in a fresh interpreter that
never imports fliqs (same code path: the generated model.py replays the traced torch calls and carries a copy of
fliqs' rounding). ONNX runs other kernels (onnxruntime's convolutions accumulate in another order, QuantizeLinear
divides by the scale where fliqs multiplies by its inverse, DequantizeLinear multiplies codes by the scale where
fliqs scales back by max and amax), so logits agree to float32 rounding, not bit for bit: `LOGIT_TOLERANCE`, and
the predicted class of at least `ARGMAX_AGREEMENT` of the samples (a rounding flip can move a logit across a tie).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import run_cli
from torch.utils.data import DataLoader

from fliqs.data.datasets import load_data
from fliqs.export import pytorch
from fliqs.export.errors import ExportError
from fliqs.export.pytorch import export_model, load_export
from fliqs.quant.layers import QuantLayer, quantize_model, set_assignment
from fliqs.run.config import DEFAULT_EXPERIMENT
from fliqs.run.loading import load_config
from fliqs.trainables.saved import evaluate_run, fetch_model
from fliqs.trainables.search import run_search

pytestmark = pytest.mark.usefixtures("one_thread")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

QDQ_FORMATS = "[int4,int8,fp8_e4m3,fp8_e5m2]"
LOGIT_TOLERANCE = 1e-3  # max |logit difference|, logits of order 10
ARGMAX_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(output_dir, tracking URI, the model `fliqs evaluate` rebuilds, the test split in fliqs' batches)."""
    out = tmp_path_factory.mktemp("export")
    result = run_search(load_config([f"output_dir={out}", "name=tiny", "train.num_workers=0", "train.epochs=2",
                                     f"space.candidates={QDQ_FORMATS}", "reward.target_fraction=0.6"]))
    uri = result["mlflow_tracking_uri"]
    _, _, saved = fetch_model(uri, DEFAULT_EXPERIMENT, "tiny")
    cfg = saved.cfg
    splits = load_data(cfg.data.name, cfg.data.path, cfg.model.input_size, cfg.data.val_fraction,
                       cfg.data.test_fraction, cfg.data.seed)
    batches = list(DataLoader(splits.test, batch_size=cfg.data.batch_size))  # as fliqs evaluates: in order
    return out, uri, saved, batches


def _logits(model, batches) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches])


def _onnx_logits(path, batches) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x.numpy()})[0] for x, _ in batches])


def _labels(batches) -> torch.Tensor:
    return torch.cat([y for _, y in batches])


def test_export_runs_in_plain_pytorch_bit_for_bit(finished, tmp_path):
    out, uri, saved, batches = finished
    folder = tmp_path / "tiny"
    status, stdout, err = run_cli("export", "tiny", f"output_dir={out}", "--to", str(folder))
    assert status == 0, err
    assert "4 quantized layers" in stdout
    assert {p.name for p in folder.iterdir()} == {"model.py", "weights.pt", "assignment.json"}
    spec = json.loads((folder / "assignment.json").read_text())
    assert spec["layers"] == {name: {"kind": "linear" if name == "head" else "conv", "w": f["w"], "a": f["a"],
                                     "act_range": "dynamic"} for name, f in saved.saved["assignment"].items()}

    inputs = tmp_path / "inputs.pt"
    torch.save([x for x, _ in batches], inputs)
    script = textwrap.dedent(f"""
        import importlib.util, sys, torch
        torch.set_num_threads(1)
        spec = importlib.util.spec_from_file_location("model", {str(folder / 'model.py')!r})
        model = importlib.util.module_from_spec(spec); spec.loader.exec_module(model)
        net = model.load()
        with torch.no_grad():
            logits = torch.cat([net(x) for x in torch.load({str(inputs)!r}, weights_only=True)])
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        assert not [m for m in sys.modules if m.split('.')[0] == 'fliqs'], 'fliqs was imported'
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(tmp_path / "logits.pt", weights_only=True)
    expected = _logits(saved.network.model, batches)
    assert torch.equal(plain, expected)  # bit-identical logits on the whole test split
    labels = _labels(batches)
    reported = evaluate_run(uri, DEFAULT_EXPERIMENT, "tiny")["accuracy"]
    assert int((plain.argmax(-1) == labels).sum()) / len(labels) == reported

    exported = load_export(folder)  # fliqs' own loader of the folder
    assert exported.spec["run_id"] == spec["run_id"]
    assert torch.equal(_logits(exported.network, batches), expected)


def test_onnx_has_qdq_per_layer_and_matches_fliqs_evaluate(finished, tmp_path):
    out, uri, saved, batches = finished
    folder = tmp_path / "onnx"
    status, stdout, err = run_cli("export", "tiny", f"output_dir={out}", "--to", str(folder), "--onnx")
    assert status == 0, err
    graph = onnx.load(str(folder / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    layers = saved.saved["assignment"]
    # Every quantized layer: its input through QuantizeLinear + DequantizeLinear, its weight through DequantizeLinear.
    assert ops.count("QuantizeLinear") == len(layers) and ops.count("DequantizeLinear") == 2 * len(layers)
    types = {"int8": onnx.TensorProto.INT8, "int4": onnx.TensorProto.INT4,
             "fp8_e4m3": onnx.TensorProto.FLOAT8E4M3FN, "fp8_e5m2": onnx.TensorProto.FLOAT8E5M2}
    coded = {init.name.rsplit("_", 1)[0].replace("_weight_q", ""): init.data_type for init in graph.initializer
             if "weight_q" in init.name}
    assert coded == {name.replace(".", "_"): types[f["w"]] for name, f in layers.items()}
    assert "QuantizeLinear" in stdout

    got = _onnx_logits(folder / "model.onnx", batches)
    expected = _logits(saved.network.model, batches).numpy()
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE
    assert (got.argmax(1) == expected.argmax(1)).mean() >= ARGMAX_AGREEMENT
    accuracy = (got.argmax(1) == _labels(batches).numpy()).mean()
    reported = evaluate_run(uri, DEFAULT_EXPERIMENT, "tiny")["accuracy"]
    assert accuracy == pytest.approx(reported, abs=1 - ARGMAX_AGREEMENT)


def test_formats_without_onnx_qdq_fall_back_as_stated(finished, tmp_path):
    """int2/int3 as int8 codes clipped to their range, fp6 and (onnxruntime) fp4 as emulated rounding, bf16 as a
    cast: the same network at those formats, exported and compared like the Q/DQ formats; fp4 as float4e2m1 Q/DQ
    is valid ONNX (opset 23) that onnxruntime 1.32 cannot run, so it is only checked."""
    _, _, saved, batches = finished
    model = saved.network.model
    layers = saved.network.layers
    before = {layer.name: (layer.w_format, layer.a_format) for layer in layers}
    set_assignment(layers, {"features.0": "fp6_e2m3", "features.3": "int3", "features.6": "fp4_e2m1",
                            "head": ("int2", "bf16")})
    try:
        spec = export_model(model, tmp_path / "fallback", title="fallback", input_shape=(1, 8, 8), onnx=True)
        layer_plan = spec["onnx"]["layers"]
        assert "emulated" in layer_plan["features.0"]["a"] and "emulated" in layer_plan["features.6"]["a"]
        assert "clipped to +-3" in layer_plan["features.3"]["a"] and "int8 codes in +-1" in layer_plan["head"]["w"]
        got = _onnx_logits(tmp_path / "fallback" / "model.onnx", batches)
        expected = _logits(model, batches).numpy()
        assert np.abs(got - expected).max() <= LOGIT_TOLERANCE
        assert (got.argmax(1) == expected.argmax(1)).mean() >= ARGMAX_AGREEMENT
        native = export_model(model, tmp_path / "fp4", title="fp4", input_shape=(1, 8, 8), onnx=True, float4="qdq")
        assert native["onnx"]["opset"] == 23 and "float4e2m1" in native["onnx"]["layers"]["features.6"]["a"]
        onnx.checker.check_model(onnx.load(str(tmp_path / "fp4" / "model.onnx")), full_check=True)
    finally:
        for layer in layers:
            layer.set_formats(*before[layer.name])


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)  # control flow on data: no static graph


class _CustomConv(torch.nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_unsupported_models_are_refused_in_one_line(tmp_path):
    branchy = _Branchy()
    quantize_model(branchy, default="int8")
    with pytest.raises(ExportError, match="does not trace with torch.fx"):
        export_model(branchy, tmp_path / "a", title="branchy", input_shape=(1, 2, 2))
    custom = torch.nn.Sequential(_CustomConv(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    custom(torch.zeros(1, 1, 4, 4))
    quantize_model(custom, default="int8")
    assert isinstance(custom[0], QuantLayer)
    with pytest.raises(ExportError, match="wraps .*_CustomConv, whose forward is not plain torch") as err:
        export_model(custom, tmp_path / "b", title="custom", input_shape=(1, 4, 4))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_model_py_is_the_template_filled(tmp_path, monkeypatch):
    """model.py is model_template.py with its placeholders filled: every class and function of the template
    verbatim, no placeholder and no fliqs import left, the template's docstring replaced by model.py's; and a change
    to the template shows in the next export."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    quantize_model(net, default="int8")
    template = pytorch._TEMPLATE.read_text()
    export_model(net, tmp_path / "a", title="small", input_shape=(1, 4, 4))
    source = (tmp_path / "a" / "model.py").read_text()
    tree = ast.parse(template)
    definitions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                   or isinstance(n, ast.ClassDef) and n.name != "Network"]  # Network's __init__ is filled
    assert {"_Quantized", "QuantConv2d", "QuantLinear", "_put_tensor", "load"} <= {n.name for n in definitions}
    missing = [n.name for n in definitions if ast.get_source_segment(template, n) not in source]
    assert not missing, missing
    assert "filled by fliqs export" in template and "filled by fliqs export" not in source
    assert "from fliqs" in template and "fliqs.quant.rounding import" not in source
    exported = ast.parse(source)
    assert ast.get_docstring(exported).startswith("small: exported by fliqs (fliqs-export/1)")
    network = next(n for n in exported.body if isinstance(n, ast.ClassDef) and n.name == "Network")
    assert "forward" in {n.name for n in network.body if isinstance(n, ast.FunctionDef)}
    assert "def fake_quantize(" in source and "self._put('0', QuantConv2d(1, 2, kernel_size=(3, 3)" in source

    extra = "\n\ndef from_the_template() -> str:\n    return 'yes'\n"
    changed = tmp_path / "model_template.py"
    changed.write_text(template + extra)
    monkeypatch.setattr(pytorch, "_TEMPLATE", changed)
    export_model(net, tmp_path / "b", title="small", input_shape=(1, 4, 4))
    assert (tmp_path / "b" / "model.py").read_text() == source + extra


def test_export_of_an_unknown_run_is_one_line(finished, tmp_path):
    out, *_ = finished
    status, _, err = run_cli("export", "nope", f"output_dir={out}", "--to", str(tmp_path / "x"))
    assert status == 2 and len(err.strip().splitlines()) == 1 and "no run named 'nope'" in err
