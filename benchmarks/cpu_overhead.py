"""CPU cost of fake quantization, as ratios against a baseline measured in the same run.

(a) quantize-dequantize throughput of each format relative to a plain tensor copy of the same size;
(b) a training step of timm's ``test_resnet`` with a fresh random per-layer format assignment (int_fp space)
    relative to the same model unquantized, eager and compiled (inductor: one graph for every assignment);
(c) block-scaled fake quantization (MX, NVFP4) of a 4096 x 4096 weight beside per-channel fake quantization of the
    same weight, compiled, relative to a copy, and the per-channel formats through the block-capable graph (what
    a quantizer that may hold a block-scaled format costs when it holds another).

Targets (issue 2): (a) within 4x of a copy, (b) within 1.5x; issue 6: (b) within 1.3x; issue 26: (c) block-scaled
within 1.5x of per-channel, compiled.
Usage: python benchmarks/cpu_overhead.py [--quick] [--threads N]
Prints a markdown table to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F

from fliqs.models.registry import create_model
from fliqs.quant.layers import quantize_model, set_assignment
from fliqs.quant.rounding import amax_per_channel, amax_per_tensor, format_tensor, quantize_dequantize

INT_FP = ["int2", "int3", "int4", "int8", "fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2"]


def timeit(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fakequant_table(numel: int, repeat: int) -> tuple[float, list[tuple[str, float, float, float, float]]]:
    """Time of an in-place copy, and rows (format, eager s, eager x copy, compiled s, compiled x copy) where
    "copy" is an out-of-place copy (``clone``): fake quantization returns a new tensor too, and on this kind of
    machine a fresh full-size tensor costs several in-place copies in page faults. One compiled kernel serves
    every format: the format is a tensor argument."""
    x = torch.randn(numel)
    out = torch.empty_like(x)
    copy_in_place = timeit(lambda: out.copy_(x), repeat)
    copy = timeit(lambda: x.clone(), repeat)
    rows = [("copy (clone)", copy, 1.0, copy, 1.0)]
    amax = amax_per_tensor(x)
    compiled = torch.compile(quantize_dequantize, dynamic=False)
    for name in INT_FP + ["bf16"]:
        fmt = format_tensor(name)
        assert torch.equal(compiled(x, amax, fmt), quantize_dequantize(x, amax, fmt)), name
        t = timeit(lambda fmt=fmt: quantize_dequantize(x, amax, fmt), repeat)
        tc = timeit(lambda fmt=fmt: compiled(x, amax, fmt), repeat)
        rows.append((name, t, t / copy, tc, tc / copy))
    return copy_in_place, rows


PER_CHANNEL = ["int4", "int8", "fp4_e2m1", "fp8_e4m3"]
BLOCK = ["mxfp4_e2m1", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8", "nvfp4"]


def block_table(rows: int, repeat: int) -> list[tuple[str, float, float]]:
    """(variant, compiled s, x copy) for a rows x 4096 weight: per-channel formats (one scale per output row), the
    block-scaled ones (blocks of 32 / 16 along the row), and per-channel formats through the block-capable graph.
    Every compiled result is checked against the eager routine first."""
    w = torch.randn(rows, 4096)
    amax = amax_per_channel(w, 0)
    copy = timeit(lambda: w.clone(), repeat)
    plain = torch.compile(quantize_dequantize, dynamic=False)
    blocked = torch.compile(lambda x, a, f: quantize_dequantize(x, a, f, blocked=True), dynamic=False)
    out = [("copy (clone)", copy, 1.0)]
    variants = [(f"{n}, per channel", plain, n) for n in PER_CHANNEL] + \
        [(f"{n}, blocks", blocked, n) for n in BLOCK] + [(f"{n}, per channel in the block graph", blocked, n)
                                                          for n in ("int4", "fp8_e4m3")]
    for label, fn, name in variants:
        fmt = format_tensor(name)
        eager = quantize_dequantize(w, amax, fmt, blocked=fn is blocked)
        assert torch.equal(fn(w, amax, fmt), eager), label
        t = timeit(lambda fn=fn, fmt=fmt: fn(w, amax, fmt), repeat)
        out.append((label, t, t / copy))
    return out


STEP_VARIANTS = {  # name: (quantized, compiled)
    "unquantized": (False, False),
    "quantized, random assignment": (True, False),
    "unquantized, compiled": (False, True),
    "quantized, random assignment, compiled": (True, True),
}


def train_step_times(steps: int, batch: int, size: int, compiled: bool) -> dict[str, float]:
    """Median seconds per training step of each variant (the compiled ones only if ``compiled``: inductor takes
    a minute or two per model on this machine). The compiled quantized model is one graph for every assignment."""
    torch.manual_seed(0)
    data = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def make(quantized: bool, compile_: bool):
        torch.manual_seed(0)
        model = create_model("test_resnet", num_classes=10)
        layers = quantize_model(model) if quantized else []
        net = torch.compile(model) if compile_ else model
        return net, layers, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(model, layers, opt):
        if layers:
            set_assignment(layers, {layer.name: random.choice(INT_FP) for layer in layers})
        loss = F.cross_entropy(model(data[0]), data[1])
        opt.zero_grad()
        loss.backward()
        opt.step()

    runs = {name: make(*flags) for name, flags in STEP_VARIANTS.items() if compiled or not flags[1]}
    for run in runs.values():  # compile (and warm up) every variant before any timing
        step(*run)
    # Interleave the variants so that drift in machine load hits all alike.
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            times[name].append(timeit(lambda run=run: step(*run), steps))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no compiled train steps (smoke run)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's; 1 avoids OpenMP stalls "
                        "when other processes load the cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    numel = 1 << (20 if args.quick else 24)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    copy_in_place, rows = fakequant_table(numel, 5 if args.quick else 20)
    print(f"(a) fake-quant of {numel:,} float32 values (median of runs), relative to an out-of-place copy; "
          f"an in-place copy_ takes {copy_in_place * 1e3:.2f} ms\n")
    print("| format | eager ms | eager x copy | compiled ms | compiled x copy |\n|---|---|---|---|---|")
    for name, t, r, tc, rc in rows:
        print(f"| {name} | {t * 1e3:.2f} | {r:.2f} | {tc * 1e3:.2f} | {rc:.2f} |")
    block_rows = block_table(256 if args.quick else 4096, 5 if args.quick else 20)
    per_channel = statistics.mean(t for label, t, _ in block_rows if label.endswith(", per channel"))
    print("\n(c) a rows x 4096 float32 weight, compiled; last column: x the mean per-channel format\n")
    print("| variant | compiled ms | x copy | x per-channel |\n|---|---|---|---|")
    for label, t, r in block_rows:
        print(f"| {label} | {t * 1e3:.2f} | {r:.2f} | {t / per_channel:.2f} |")
    size = 32
    times = train_step_times(5 if args.quick else 20, 32, size, compiled=not args.quick)
    print(f"\n(b) test_resnet train step, batch 32, {size}px, random int_fp assignment every step; ratio: to the "
          f"unquantized step of the same mode (eager or compiled)\n")
    print("| variant | ms/step | ratio | x unquantized eager |\n|---|---|---|---|")
    for name, t in times.items():
        base = times["unquantized, compiled" if "compiled" in name else "unquantized"]
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} | {t / times['unquantized']:.2f} |")


if __name__ == "__main__":
    main()
