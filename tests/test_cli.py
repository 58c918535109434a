"""The ``fliqs`` command (``formats`` and ``cost``), run as subprocesses.

Each ``cost`` process imports torch and timm (seconds of CPU), so the module starts its processes at once
in one fixture. ``formats --json``, a ResNet-18 ``cost`` and two bad inputs run as ``python -m fliqs.cli``; the other
calls, and every bad input again, run through ``fliqs.cli.main`` inside one shared driver subprocess (exit status,
stdout and stderr captured per call), which keeps the whole file fast on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FORMATS = ["int2", "int3", "int4", "int8", "fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3",
                    "fp8_e5m2", "bf16", "fp16", "fp32", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2",
                    "mxfp4_e2m1", "mxint8", "nvfp4"]
BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8, "fp4_e2m1": 4, "fp6_e2m3": 6, "fp6_e3m2": 6,
        "fp8_e4m3": 8, "fp8_e5m2": 8, "bf16": 16, "fp16": 16, "fp32": 32}

# fliqs_cnn: features.0 / features.3 / features.6 / head (see fliqs.models.registry.DigitsCNN)
ASSIGNMENT = {"features.0": "int8", "features.3": {"w": "int2", "a": "fp8_e5m2"}, "features.6": "fp4_e2m1"}

BAD_INPUTS = {
    "unknown_model": (["cost", "--model", "resnet81"], ["resnet81", "resnet18"]),
    "unknown_format": (["cost", "--model", "fliqs_cnn", "--format", "fp9"], ["fp9", "fp8_e4m3"]),
    "unknown_key": (["cost", "--model", "fliqs_cnn", "train.epoch=3"], ["epoch", "Did you mean", "epochs"]),
    "bad_type_override": (["cost", "--model", "fliqs_cnn", "model.input_size=abc"],
                          ["model.input_size", "abc"]),
    "bad_type_flag": (["cost", "--model", "fliqs_cnn", "--input-size", "abc"], ["--input-size", "abc"]),
    "missing_assignment": (["cost", "--model", "fliqs_cnn", "--assignment", "{tmp}/missing.json"],
                           ["missing.json"]),
    "format_and_assignment": (["cost", "--model", "fliqs_cnn", "--format", "int8", "--assignment",
                               "{tmp}/assignment.json"], ["--format", "--assignment"]),
    "unknown_layer": (["cost", "--model", "fliqs_cnn", "--assignment", "{tmp}/bad_layer.json"], ["nope"]),
    "unknown_flag": (["cost", "--modle", "resnet18"], ["--modle"]),
}


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fliqs.cli", *args]


# Runs several CLI invocations in one interpreter:
# {key: argv} in argv[1], out {key: [status, stdout, stderr]}.
DRIVER = """
import contextlib, io, json, sys
from fliqs.cli import main
results = {}
for key, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            status = exc.code
    results[key] = [status, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""

# Run as their own `python -m fliqs.cli` process as well as in the driver: one refused by fliqs (BadInput), one by
# argparse. (Each process costs about 5 CPU-seconds of imports.)
REAL_PROCESS_BAD_INPUTS = ["unknown_model", "unknown_flag"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every process concurrently; return {key: CompletedProcess} (driver results: 'driver:<key>')."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "assignment.json").write_text(json.dumps(ASSIGNMENT))
    (tmp / "result.json").write_text(json.dumps({"assignment": ASSIGNMENT, "gbops": 1.0}))
    (tmp / "bad_layer.json").write_text(json.dumps({"nope": "int8"}))
    bad = {key: [a.replace("{tmp}", str(tmp)) for a in args] for key, (args, _) in BAD_INPUTS.items()}
    jobs = {
        "formats_json": _cmd(["formats", "--json"]),
        "cost_resnet18_fp8": _cmd(["cost", "--model", "resnet18", "--format", "fp8_e4m3", "--json"]),
        **{key: _cmd(bad[key]) for key in REAL_PROCESS_BAD_INPUTS},
    }
    driven = {
        **{f"driver:{key}": argv for key, argv in bad.items()},
        "formats_table": ["formats"],
        "cost_assignment": ["cost", "--model", "fliqs_cnn", "--assignment", str(tmp / "assignment.json"), "--json"],
        "cost_result_file": ["cost", "--model", "fliqs_cnn", "--assignment", str(tmp / "result.json"),
                             "--json"],
        "cost_table": ["cost", "--model", "fliqs_cnn", "--format", "int4", "--input-size", "16"],
    }
    jobs["driver"] = [sys.executable, "-c", DRIVER, json.dumps(driven)]
    procs = {key: subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, cmd in jobs.items()}
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[key] = subprocess.CompletedProcess(jobs[key], proc.returncode, out, err)
    driver = results.pop("driver")
    assert driver.returncode == 0, driver.stderr
    for key, (status, out, err) in json.loads(driver.stdout.strip().splitlines()[-1]).items():
        results[key] = subprocess.CompletedProcess(driven[key], status, out, err)
    return results


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    return proc


def test_formats_json(runs):
    rows = json.loads(_ok(runs["formats_json"]).stdout)
    assert [r["name"] for r in rows] == EXPECTED_FORMATS
    by_name = {r["name"]: r for r in rows}
    assert by_name["fp8_e4m3"]["max_value"] == 448.0
    assert by_name["fp4_e2m1"]["bits"] == 4
    assert by_name["int8"]["max_value"] == 127
    assert (by_name["mxfp4_e2m1"]["block_size"], by_name["mxfp4_e2m1"]["scale_format"]) == (32, "e8m0")
    assert (by_name["nvfp4"]["effective_bits"], by_name["int8"]["block_size"]) == (4.5, None)


def test_formats_table(runs):
    out = _ok(runs["formats_table"]).stdout
    for name in EXPECTED_FORMATS:
        assert name in out


def test_cost_resnet18_fp8_json(runs):
    data = json.loads(_ok(runs["cost_resnet18_fp8"]).stdout)
    assert {"gmacs", "gbops", "size_mb", "layers"} <= set(data)
    assert data["gmacs"] == pytest.approx(1.814, rel=0.005)
    assert data["gbops"] == pytest.approx(64 * data["gmacs"], rel=1e-9)
    assert data["layers"]
    for layer in data["layers"]:
        assert {"name", "macs", "w_format", "a_format", "bops"} <= set(layer)
        assert layer["w_format"] == layer["a_format"] == "fp8_e4m3"
        assert layer["bops"] == 64 * layer["macs"]
    assert data["layers"][0]["name"] == "conv1" and data["layers"][-1]["name"] == "fc"
    params = 11_689_512  # resnet18 parameter count; conv/linear weights at 8 bits, the rest at 32
    assert data["size_mb"] < params * 4 / 1e6


@pytest.mark.parametrize("key", ["cost_assignment", "cost_result_file"])
def test_cost_with_assignment_file(runs, key):
    data = json.loads(_ok(runs[key]).stdout)
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert list(layers) == ["features.0", "features.3", "features.6", "head"]
    expected = {"features.0": ("int8", "int8"), "features.3": ("int2", "fp8_e5m2"),
                "features.6": ("fp4_e2m1", "fp4_e2m1"), "head": ("fp32", "fp32")}
    for name, (w, a) in expected.items():
        assert (layers[name]["w_format"], layers[name]["a_format"]) == (w, a)
        assert layers[name]["bops"] == layers[name]["macs"] * BITS[w] * BITS[a]
    assert data["gbops"] == pytest.approx(sum(x["bops"] for x in data["layers"]) / 1e9, rel=1e-12)


def test_cost_table(runs):
    out = _ok(runs["cost_table"]).stdout
    assert "features.0" in out and "int4" in out and "GBOPs" in out and "16px" in out


def _check_bad_input(proc: subprocess.CompletedProcess, fragments: list[str]) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert proc.stdout == ""


@pytest.mark.parametrize("key", REAL_PROCESS_BAD_INPUTS)
def test_bad_input_process_exits_2_with_one_line(runs, key):
    _check_bad_input(runs[key], BAD_INPUTS[key][1])


@pytest.mark.parametrize("key", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(runs, key):
    _check_bad_input(runs[f"driver:{key}"], BAD_INPUTS[key][1])


def test_successful_runs_write_nothing_on_stderr(runs):
    for key in ("formats_json", "formats_table", "cost_resnet18_fp8", "cost_assignment", "cost_table"):
        assert runs[key].stderr == "", (key, runs[key].stderr)
