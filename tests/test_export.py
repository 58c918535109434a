"""`fliqs export`: a finished run's model as a standalone PyTorch folder and as ONNX, checked against the model
`fliqs evaluate` rebuilds, on the whole test split.

One tiny in-process FLIQS search (the formats onnxruntime's CPU provider runs as Q/DQ: int4, int8, fp8 e4m3 / e5m2)
is shared by the module. The standalone folder must reproduce fliqs' logits bit for bit in a fresh interpreter that
never imports fliqs (same code path: the generated model.py replays the traced torch calls and carries a copy of
fliqs' rounding), starting from raw digits images. Other formats (int2/int3, fp4, fp6, bf16, MX, NVFP4) are set on
the same network and exported and run too. ONNX runs other kernels (onnxruntime's convolutions accumulate in another
order, QuantizeLinear divides by the scale where fliqs multiplies by its inverse, DequantizeLinear multiplies codes
by the scale where fliqs scales back by max and amax), so logits agree to float32 rounding, not bit for bit:
`LOGIT_TOLERANCE`, and the predicted class of at least `ARGMAX_AGREEMENT` of the samples (a rounding flip can move
a logit across a tie).
"""

from __future__ import annotations

import ast
import json
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import run_cli
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from fliqs.data.datasets import load_data
from fliqs.export import pytorch
from fliqs.export.errors import ExportError
from fliqs.export.pytorch import export_model, load_export
from fliqs.quant.layers import QuantLayer, quantize_model, set_assignment
from fliqs.run.config import DEFAULT_EXPERIMENT
from fliqs.trainables.saved import evaluate_run, fetch_model

pytestmark = pytest.mark.usefixtures("one_thread")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

QDQ_FORMATS = "[int4,int8,fp8_e4m3,fp8_e5m2]"
LOGIT_TOLERANCE = 1e-3  # max |logit difference|, logits of order 10
ARGMAX_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """`fliqs search` as a user runs it: (output_dir, its printed output)."""
    out = tmp_path_factory.mktemp("export")
    status, stdout, err = run_cli("search", f"output_dir={out}", "name=tiny", "train.num_workers=0", "train.epochs=2",
                                  f"space.candidates={QDQ_FORMATS}", "reward.target_fraction=0.6")
    assert status == 0, err
    return out, stdout


@pytest.fixture(scope="module")
def finished(searched):
    """(output_dir, tracking URI, the model `fliqs evaluate` rebuilds, the test split in fliqs' batches)."""
    out, _ = searched
    uri = json.loads((out / "tiny" / "result.json").read_text())["mlflow_tracking_uri"]
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


def _raw_test_digits(saved) -> tuple[np.ndarray, np.ndarray]:
    """The raw scikit-learn images (0..16 gray levels) and labels of the run's test split."""
    from sklearn.datasets import load_digits

    from fliqs.data.datasets import _split_indices

    cfg, bunch = saved.cfg, load_digits()
    _, _, test = _split_indices(np.asarray(bunch.target), (cfg.data.val_fraction, cfg.data.test_fraction),
                                cfg.data.seed)
    return bunch.images[test], bunch.target[test]


def test_export_runs_in_plain_pytorch_bit_for_bit_from_raw_images(finished, tmp_path):
    """The folder alone, in an interpreter that never imports fliqs: raw digits images through model.preprocess give
    the inputs fliqs evaluates, and the network gives fliqs' logits bit for bit, whatever the batch."""
    out, uri, saved, batches = finished
    folder = tmp_path / "tiny"
    status, stdout, err = run_cli("export", "tiny", f"output_dir={out}", "--to", str(folder))
    assert status == 0, err
    assert "4 quantized layers" in stdout
    assert {p.name for p in folder.iterdir()} == {"model.py", "weights.pt", "assignment.json"}
    spec = json.loads((folder / "assignment.json").read_text())
    assert spec["layers"] == {name: {"kind": "linear" if name == "head" else "conv", "w": f["w"], "a": f["a"],
                                     "act_range": "ema"} for name, f in saved.saved["assignment"].items()}
    assert spec["input"]["preprocessing"]["labels"] == [str(d) for d in range(10)]

    raw, labels = _raw_test_digits(saved)
    np.save(tmp_path / "raw.npy", raw)
    script = textwrap.dedent(f"""
        import importlib.util, json, sys, numpy, torch
        torch.set_num_threads(1)
        spec = importlib.util.spec_from_file_location("model", {str(folder / 'model.py')!r})
        model = importlib.util.module_from_spec(spec); spec.loader.exec_module(model)
        net = model.load()
        x = model.preprocess(numpy.load({str(tmp_path / 'raw.npy')!r}))
        with torch.no_grad():
            logits = net(x)
            alone = torch.cat([net(x[i:i + 1]) for i in range(len(x))])
        torch.save((x, logits, alone), {str(tmp_path / 'out.pt')!r})
        print(json.dumps(model.label_names(logits)))
        assert not [m for m in sys.modules if m.split('.')[0] == 'fliqs'], 'fliqs was imported'
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x, plain, alone = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(x, torch.cat([b for b, _ in batches]))  # preprocess() is fliqs' pipeline, bit for bit
    expected = _logits(saved.network.model, [(x, None)])
    assert torch.equal(plain, expected)  # bit-identical logits on the whole test split
    # Static (calibrated) activation ranges: a sample's logits do not depend on its batch (up to the kernels' order).
    assert torch.allclose(alone, plain, atol=1e-5) and torch.equal(alone.argmax(-1), plain.argmax(-1))
    named = json.loads(proc.stdout)
    reported = evaluate_run(uri, DEFAULT_EXPERIMENT, "tiny")["accuracy"]
    assert np.mean([int(n) == y for n, y in zip(named, labels, strict=True)]) == reported
    assert reported == saved.saved["metrics"]["test_accuracy"]

    exported = load_export(folder)  # fliqs' own loader of the folder
    assert exported.spec["run_id"] == spec["run_id"]
    assert torch.equal(_logits(exported.network, batches), _logits(saved.network.model, batches))


def _initializers(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def test_onnx_stores_low_bit_codes_and_matches_fliqs_at_any_batch(finished, tmp_path):
    out, uri, saved, batches = finished
    folder = tmp_path / "onnx"
    status, stdout, err = run_cli("export", "tiny", f"output_dir={out}", "--to", str(folder), "--onnx")
    assert status == 0, err
    model = onnx.load(str(folder / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    layers = saved.saved["assignment"]
    # Every quantized layer: its input through QuantizeLinear + DequantizeLinear, its weight through DequantizeLinear.
    assert ops.count("QuantizeLinear") == len(layers) and ops.count("DequantizeLinear") == 2 * len(layers)
    types = {"int8": onnx.TensorProto.INT8, "int4": onnx.TensorProto.INT4,
             "fp8_e4m3": onnx.TensorProto.FLOAT8E4M3FN, "fp8_e5m2": onnx.TensorProto.FLOAT8E5M2}
    coded = {name.rsplit("_", 1)[0].replace("_weight_q", ""): init.data_type
             for name, init in _initializers(model).items() if "weight_q" in name}
    assert coded == {name.replace(".", "_"): types[f["w"]] for name, f in layers.items()}
    assert "QuantizeLinear" in stdout and "static scale (calibrated)" in stdout  # the per-layer table
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["fliqs.labels"]) == [str(d) for d in range(10)]
    assert json.loads(props["fliqs.preprocessing"])["divide_by"] == 16

    got = _onnx_logits(folder / "model.onnx", batches)
    expected = _logits(saved.network.model, batches).numpy()
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE
    assert (got.argmax(1) == expected.argmax(1)).mean() >= ARGMAX_AGREEMENT
    alone = _onnx_logits(folder / "model.onnx", [(x[i:i + 1], None) for x, _ in batches for i in range(len(x))])
    assert np.abs(alone - got).max() <= 1e-5  # batch 1 against the batches of 64: static scales
    accuracy = (got.argmax(1) == _labels(batches).numpy()).mean()
    reported = evaluate_run(uri, DEFAULT_EXPERIMENT, "tiny")["accuracy"]
    assert accuracy == pytest.approx(reported, abs=1 - ARGMAX_AGREEMENT)


def _exported_at(saved, batches, tmp_path, assignment: dict, name: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """The run's network at ``assignment`` (BatchNorm and ranges as saved), exported with ONNX: (the spec, ONNX
    logits, fliqs logits); the formats are restored afterwards."""
    model, layers = saved.network.model, saved.network.layers
    before = {layer.name: (layer.w_format, layer.a_format) for layer in layers}
    set_assignment(layers, assignment)
    try:
        spec = export_model(model, tmp_path / name, title=name, input_shape=(1, 8, 8), onnx=True)
        return spec, _onnx_logits(tmp_path / name / "model.onnx", batches), _logits(model, batches).numpy()
    finally:
        for layer in layers:
            layer.set_formats(*before[layer.name])


def test_a_uniform_int4_model_is_about_the_size_fliqs_reports(finished, tmp_path):
    """Done when of issue 25: at most 1.5x fliqs' size figure plus 24 KB of graph."""
    from fliqs.quant.cost import summarize

    _, _, saved, batches = finished
    spec, got, expected = _exported_at(saved, batches, tmp_path, {n: "int4" for n in saved.saved["assignment"]},
                                       "int4")
    size = summarize(saved.network.shapes, {n: "int4" for n in saved.saved["assignment"]},
                     total_params=sum(p.numel() for p in saved.network.model.parameters())).size_mb * 1e6
    onnx_bytes = (tmp_path / "int4" / "model.onnx").stat().st_size
    assert spec["onnx"]["bytes"] == onnx_bytes <= 1.5 * size + 24_000, (onnx_bytes, size)
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE


def test_every_format_exports_as_stated_and_runs(finished, tmp_path):
    """int2/int3 as int4 codes, fp4 as uint4 patterns with a table, fp6 as uint8 patterns, bf16 as bfloat16 values;
    MXFP8 / MXINT8 through blocked DequantizeLinear, MXFP4 / MXFP6 / NVFP4 as patterns times block scales, their
    activations rounded in the graph: each exported and run by onnxruntime, logits against fliqs'. fp4 as float4e2m1
    Q/DQ is valid ONNX (opset 23) that onnxruntime 1.32 cannot run, so it is only checked."""
    _, _, saved, batches = finished
    cases = {"features.0": "fp6_e2m3", "features.3": "int3", "features.6": "fp4_e2m1", "head": ("int2", "bf16")}
    spec, got, expected = _exported_at(saved, batches, tmp_path, cases, "fallback")
    plan = spec["onnx"]["layers"]
    assert "uint8" in plan["features.0"]["w"] and "in float ops" in plan["features.0"]["a"]
    assert "int4 codes in +-3" in plan["features.3"]["w"] and "int4" in plan["features.3"]["a"]
    assert "uint4" in plan["features.6"]["w"] and "int4 codes in +-1" in plan["head"]["w"]
    assert "Cast to bfloat16" in plan["head"]["a"]
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE
    assert (got.argmax(1) == expected.argmax(1)).mean() >= ARGMAX_AGREEMENT

    blocks = {"features.0": "mxfp8_e4m3", "features.3": "nvfp4", "features.6": "mxfp4_e2m1",
              "head": ("mxint8", "mxfp6_e3m2")}
    spec, got, expected = _exported_at(saved, batches, tmp_path, blocks, "blocks")
    plan = spec["onnx"]["layers"]
    assert "blocked DequantizeLinear" in plan["features.0"]["w"] and "blocked" in plan["head"]["w"]
    assert "float8e4m3fn block scales" in plan["features.3"]["w"] and "E8M0" in plan["features.6"]["a"]
    model = onnx.load(str(tmp_path / "blocks" / "model.onnx"))
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == 2
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE
    assert (got.argmax(1) == expected.argmax(1)).mean() >= ARGMAX_AGREEMENT

    # float8 inputs after a ReLU, static ranges: onnxruntime's optimiser would drop the ReLU in front of a float8
    # QuantizeLinear if the export did not saturate the input first.
    _, got, expected = _exported_at(saved, batches, tmp_path, {"features.3": "fp8_e4m3", "features.6": "fp8_e5m2"},
                                    "fp8")
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE

    model, layers = saved.network.model, saved.network.layers
    before = {layer.name: (layer.w_format, layer.a_format) for layer in layers}
    set_assignment(layers, {"features.6": "fp4_e2m1", "features.0": "fp6_e3m2"})
    try:
        native = export_model(model, tmp_path / "fp4", title="fp4", input_shape=(1, 8, 8), onnx=True, float4="qdq")
        assert native["onnx"]["opset"] == 23 and "float4e2m1" in native["onnx"]["layers"]["features.6"]["w"]
        assert "Gather" in native["onnx"]["layers"]["features.0"]["w"]  # fp6 keeps its table with float4 Q/DQ
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


def _commands(text: str, prefix: str = "fliqs ") -> list[list[str]]:
    """The fliqs commands in ``text`` (after "Evaluate:" / "Export:" labels, or indented), as argv lists, with
    DIR given and the optional --onnx taken."""
    found = []
    for line in text.splitlines():
        line = line.split(":", 1)[1] if line.startswith(("Evaluate:", "Export:", "Fronts again:")) else line
        line = line.strip()
        if line.startswith(prefix):
            found.append(shlex.split(line.replace("[--onnx]", "--onnx"))[1:])
    return found


def test_the_commands_a_search_prints_and_logs_run_as_written(searched, finished, tmp_path):
    """Every command the console prints and the run's page shows (its description) runs as written, from any
    directory; `fliqs cost --assignment result.json` needs no --model."""
    out, stdout = searched
    _, uri, _, _ = finished
    printed = _commands(stdout)
    assert [c[0] for c in printed] == ["evaluate", "export"]
    note = MlflowClient(uri).get_run(_run_id(uri)).data.tags["mlflow.note.content"]
    logged = _commands(note)
    assert [c[0] for c in logged] == ["evaluate", "export"] and "result.png" in note
    for i, argv in enumerate(printed + logged):
        argv = [str(tmp_path / f"export{i}") if a == "DIR" else a for a in argv]
        status, _, err = run_cli(*argv)
        assert status == 0, (argv, err)
    result = json.loads((out / "tiny" / "result.json").read_text())
    status, cost, err = run_cli("cost", "--assignment", str(out / "tiny" / "result.json"), "--json")
    assert status == 0, err
    assert json.loads(cost)["gbops"] == pytest.approx(result["gbops"], rel=1e-12)
    status, _, err = run_cli("cost", "--model", "resnet18", "--assignment", str(out / "tiny" / "result.json"))
    assert status == 2 and "fliqs_cnn" in err and len(err.strip().splitlines()) == 1


def _run_id(uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id
    return next(r.info.run_id for r in client.search_runs([experiment]) if r.info.run_name == "tiny")
