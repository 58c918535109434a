"""One compiled graph for every assignment (issue 6): formats are data, so a search never recompiles.

A quantized fliqs_cnn is compiled with ``fullgraph=True`` (a graph break fails the test) through a backend that
counts the graphs dynamo hands it: after warm-up (the first FLIQS step: one training graph, one evaluation graph
under ``no_grad``) fresh random int_fp assignments must add none. The compiled model must also equal the eager one
bit for bit, and the fused fake-quant kernel (inductor) must equal the eager routine, which tests/test_fakequant.py
checks against ml_dtypes. A control test reads a Python attribute in ``forward`` and must see recompilations: the
counter can fail.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import batches

from fliqs.models.registry import create_model
from fliqs.quant.cost import measure_layers
from fliqs.quant.formats import FORMATS
from fliqs.quant.layers import FormatQuantizer, quantize_model, set_assignment
from fliqs.quant.rounding import amax_per_tensor, format_tensor, quantize_dequantize
from fliqs.searchers.reinforce import fliqs_step, make_search
from fliqs.searchers.space import assignment_cost, build_space

pytestmark = pytest.mark.usefixtures("one_thread")

INT_FP = ["int2", "int3", "int4", "int8", "fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2"]


class CountingBackend:
    """A backend that counts the graphs it compiles (every recompilation is one more) and hands them on: by default
    to aot_eager (forward and backward through AOTAutograd, as inductor gets them, but no code generation)."""

    def __init__(self, inner: str = "aot_eager"):
        self.graphs = 0
        self._inner = torch._dynamo.lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._inner(gm, example_inputs)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _search_setup(steps: int, autocast: torch.autocast | None = None):
    torch.manual_seed(0)
    model = create_model("fliqs_cnn", num_classes=10, in_chans=1)
    layers = quantize_model(model)
    model.to(memory_format=torch.channels_last)  # as on GPUs (fliqs.trainables.loop.memory_format)
    shapes = measure_layers(model, 8, 1)
    total_params = sum(p.numel() for p in model.parameters())
    space = build_space([layer.name for layer in layers], INT_FP)
    target = assignment_cost(shapes, space.uniform("int4"), total_params)
    search = make_search(space, layers, shapes, total_params, total_steps=steps, target=target, autocast=autocast)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, layers, search, optimizer


def _run_steps(compiled, search, optimizer, data, steps: int, backend: CountingBackend) -> list[int]:
    """FLIQS steps (random assignment, train, evaluate, controller update); the graph count after each."""
    train, val = data
    generator = torch.Generator().manual_seed(0)
    counts = []
    for step, batch in zip(range(steps), batches(train, 64), strict=False):
        fliqs_step(compiled, search, optimizer, batch, val, step, generator)
        counts.append(backend.graphs)
    return counts


def test_random_assignments_never_recompile_and_match_eager(fresh_dynamo, digits_tensors):
    """In the GPU configuration of `fliqs search` (bf16 autocast, channels_last), on the CPU."""
    steps = 8
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    model, layers, search, optimizer = _search_setup(steps, autocast)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    train, (vx, vy) = digits_tensors
    counts = _run_steps(compiled, search, optimizer, (train, (vx[:128], vy[:128])), steps, backend)
    # One training graph and one for the quality (batch statistics: stateless BatchNorm), no graph break.
    assert counts[0] == 2, counts
    assert counts == [counts[0]] * steps, f"recompiled after warm-up: graphs after each step {counts}"
    assert len(search.controller.policy.probs()) == len(layers)

    # Bit for bit against the eager model, for a few more random assignments (same graphs: still no recompile).
    rng = random.Random(1)
    x, y = train[0][:64], train[1][:64]
    for _ in range(3):
        set_assignment(layers, {layer.name: rng.choice(INT_FP) for layer in layers})
        model.eval()
        with torch.no_grad(), autocast:
            assert torch.equal(compiled(x), model(x))
        model.train()
        grads = []
        for net in (compiled, model):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert backend.graphs == counts[0] + 1  # the evaluation-mode graph, compiled once for every assignment


def test_a_python_attribute_read_in_forward_is_caught(fresh_dynamo, digits_tensors, monkeypatch):
    """Control: a quantizer that branches on its Python ``format`` object makes dynamo guard on it, and every new
    assignment recompiles. The counter of the test above must see that."""
    plain_forward = FormatQuantizer.forward

    def branching_forward(self, x):
        if self.format.kind == "int":  # a Python branch on the format: the kind of change this file guards against
            x = x * 1.0
        return plain_forward(self, x)

    monkeypatch.setattr(FormatQuantizer, "forward", branching_forward)
    steps = 4
    model, _, search, optimizer = _search_setup(steps)
    backend = CountingBackend("eager")  # dynamo's guards alone decide recompilation: skip AOTAutograd (faster)
    compiled = torch.compile(model, backend=backend)
    train, (vx, vy) = digits_tensors
    counts = _run_steps(compiled, search, optimizer, (train, (vx[:128], vy[:128])), steps, backend)
    assert counts[-1] > counts[0], counts


def test_fused_fake_quant_kernel_is_bit_exact_for_every_format(fresh_dynamo):
    """quantize_dequantize compiled by inductor (one C++ kernel on CPUs) equals the eager routine bit for bit, for
    every registered format from one compilation (the format is a tensor argument), with and without the block-scale
    path: NaN, infinities, signed zeros, subnormals and values spread over 35 decades included."""
    torch.manual_seed(0)
    n = 1 << 14
    x = torch.randn(n) * torch.logspace(-30, 5, n)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-40, 3.0, -3.0])
    x = torch.cat([x, specials])
    amax = amax_per_tensor(x[x.isfinite()])
    compiled = torch.compile(quantize_dequantize, backend="inductor", dynamic=False, fullgraph=True)
    # The block-scale path (rows of 41: blocks of 32 and 16 with a short last one) serves every format too.
    blocked = torch.compile(partial(quantize_dequantize, blocked=True), backend="inductor", dynamic=False,
                            fullgraph=True)
    rows = x[:41 * 200].reshape(200, 41)
    for name in FORMATS:
        fmt = format_tensor(name)
        for got, want in ((compiled(x, amax, fmt), quantize_dequantize(x, amax, fmt)),
                          (blocked(rows, amax, fmt), quantize_dequantize(rows, amax, fmt, blocked=True))):
            same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
            assert bool(same.all()), f"{name}: {int((~same).sum())} values differ"


def test_gpu_benchmark_quick_mode_runs_on_cpu(fresh_dynamo, capsys, monkeypatch):
    """benchmarks/gpu_speed.py in its CPU smoke mode (tiny sizes, dynamo without a compiler backend): every code
    path of the GPU benchmark runs, the table has its rows, and the compiled steps compile nothing after warm-up."""
    path = Path(__file__).parents[1] / "benchmarks" / "gpu_speed.py"
    spec = importlib.util.spec_from_file_location("gpu_speed", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_speed", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--device", "cpu", "--backend", "eager", "--model", "fliqs_cnn", "--size", "8",
                       "--warmup", "1", "--steps", "1"])
    names = [row.name for row in rows]
    assert [n for n in names if n.startswith("fake-quant")] == [f"fake-quant {f}" for f in INT_FP + ["bf16"]]
    assert {"plain, compiled (baseline)", "search step, compiled", "search step, eager"} <= set(names)
    assert [row.recompiles for row in rows if row.recompiles is not None] == [0, 0]
    assert all(row.exact for row in rows if row.name.startswith("fake-quant"))
    assert "| search step, compiled |" in capsys.readouterr().out
