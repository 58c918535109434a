"""Speed of the search on a GPU (issue 6), as ratios against baselines measured in the same run on the same card.

One markdown table:
* fake quantization (`fliqs.quant.rounding.quantize_dequantize`, compiled, per-tensor scale given) of a large bf16
  tensor for every format of the ``int_fp`` space plus bf16: GB/s (bytes read + written) and its fraction of an
  in-place tensor copy's bandwidth (``copy_``: the same bytes). One compiled kernel serves every format;
* a ResNet-18 training step (timm ``resnet18``, bf16 autocast, channels_last, SGD): plain compiled (the baseline),
  plain eager, and the FLIQS search step (a fresh random assignment over ``int_fp`` before every step, as
  `fliqs.searchers.reinforce.fliqs_step` samples one) compiled and eager: ms/step, images/s, peak memory, and the
  number of graphs dynamo compiled after warm-up (recompilations: must be 0). Every step reads its loss
  (``loss.item()``) as the training loop does.

Targets (issue 6): search step <= 1.15x the plain compiled step with 0 recompilations; fake quantization >= 70 % of
copy bandwidth for every format; search-step peak memory <= 1.15x plain. Under 5 minutes on one H100:

    python benchmarks/gpu_speed.py                      # cuda, 2**28 values, ResNet-18 224 px batch 256
    python benchmarks/gpu_speed.py --quick --device cpu # smoke run of every code path with tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fliqs.models.registry import create_model
from fliqs.quant.layers import quantize_model, set_assignment
from fliqs.quant.rounding import amax_per_tensor, format_tensor, quantize_dequantize
from fliqs.run.loading import load_config


@dataclass
class Row:
    name: str
    ms: float
    rate: str  # GB/s or images/s, formatted
    ratio: float  # fraction of copy bandwidth, or step time relative to plain compiled
    peak_mib: float | None = None
    peak_ratio: float | None = None  # peak memory relative to the plain compiled step
    recompiles: int | None = None
    exact: bool | None = None  # compiled fake quantization equals the eager routine bit for bit


class Timer:
    """Wall time of ``fn()`` repeated: CUDA events on a GPU (no host sync inside the loop), perf_counter on CPUs."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def per_call(self, fn: Callable[[], object], repeat: int) -> float:
        """Seconds per call (median of three blocks of ``repeat`` calls on CPUs, where load drifts)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / repeat
        blocks = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(repeat):
                fn()
            blocks.append((time.perf_counter() - t) / repeat)
        return statistics.median(blocks)


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    """Forget earlier variants: dynamo's caches hold their models (through guards) until reset."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------- fake quantization
def fakequant_rows(formats: list[str], numel: int, device: torch.device, timer: Timer, repeat: int,
                   backend: str) -> list[Row]:
    x = torch.randn(numel, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()  # read + write, the same for the copy and for fake quantization
    out.copy_(x)
    copy_s = timer.per_call(lambda: out.copy_(x), repeat)
    rows = [Row("copy_ (baseline)", copy_s * 1e3, f"{nbytes / copy_s / 1e9:.3g} GB/s", 1.0)]
    amax = amax_per_tensor(x)
    compiled = torch.compile(quantize_dequantize, backend=backend, dynamic=False, fullgraph=True)
    for name in formats:
        fmt = format_tensor(name, device)
        # The first format compiles; the others reuse the kernel (the format is data). The eager routine is the
        # one tests/test_fakequant.py checks against ml_dtypes: equal bits here carry that over to this card.
        exact = torch.equal(compiled(x, amax, fmt), quantize_dequantize(x, amax, fmt))
        s = timer.per_call(lambda fmt=fmt: compiled(x, amax, fmt), repeat)
        rows.append(Row(f"fake-quant {name}", s * 1e3, f"{nbytes / s / 1e9:.3g} GB/s", copy_s / s, exact=exact))
    return rows


# ------------------------------------------------------------------------------------------------ train steps
def make_step(model_name: str, batch: int, size: int, device: torch.device, quantized: bool, compiled: bool,
              formats: list[str], backend: str, seed: int = 0) -> Callable[[], float]:
    """A closure running one training step as `fliqs search` does on this device; quantized: a fresh random
    assignment over ``formats`` first."""
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=1000, in_chans=3)
    layers = quantize_model(model) if quantized else []
    channels_last = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model.to(device, memory_format=channels_last).train()
    net = torch.compile(model, backend=backend) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rng = random.Random(seed)

    def step() -> float:
        if layers:
            set_assignment(layers, {layer.name: rng.choice(formats) for layer in layers})
        with autocast:
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def step_rows(args, formats: list[str], device: torch.device, timer: Timer) -> list[Row]:
    variants = [("plain, compiled (baseline)", False, True), ("plain, eager", False, False),
                ("search step, compiled", True, True), ("search step, eager", True, False)]
    rows, base = [], None
    for name, quantized, compiled in variants:
        reset_memory(device)  # also resets dynamo: each variant compiles from scratch
        step = make_step(args.model, args.batch, args.size, device, quantized, compiled, formats, args.backend)
        for _ in range(args.warmup):
            step()
        timer.sync()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # steady state: compilation's own allocations excluded
        graphs = graphs_compiled()
        s = timer.per_call(step, args.steps)
        peak = peak_mib(device)
        base = base or (s, peak)
        rows.append(Row(name, s * 1e3, f"{args.batch / s:.0f} img/s", s / base[0], peak,
                        peak / base[1] if peak is not None else None,
                        graphs_compiled() - graphs if compiled else None))
        del step
    return rows


# ------------------------------------------------------------------------------------------------------ report
def table(rows: list[Row]) -> list[str]:
    lines = ["| variant | ms | throughput | ratio | peak MiB | peak x plain | graphs compiled after warm-up "
             "| bit-exact vs eager |", "|---|---|---|---|---|---|---|---|"]

    def show(value, fmt: str = "") -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        lines.append(f"| {r.name} | {r.ms:.3f} | {r.rate} | {r.ratio:.2f} | {show(r.peak_mib, '.0f')} "
                     f"| {show(r.peak_ratio, '.2f')} | {show(r.recompiles)} | {show(r.exact)} |")
    return lines


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every code path")
    parser.add_argument("--numel", type=int, help="values in the fake-quant tensor (default 2**28; quick 2**16)")
    parser.add_argument("--model", help="timm model (default resnet18; quick test_resnet)")
    parser.add_argument("--batch", type=int, help="default 256; quick 4")
    parser.add_argument("--size", type=int, help="image size (default 224; quick 32)")
    parser.add_argument("--warmup", type=int, help="steps before timing (default 20; quick 2)")
    parser.add_argument("--steps", type=int, help="timed steps (default 50; quick 3)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = parser.parse_args(argv)
    full = {"numel": 2**28, "model": "resnet18", "batch": 256, "size": 224, "warmup": 20, "steps": 50}
    quick = {"numel": 2**16, "model": "test_resnet", "batch": 4, "size": 32, "warmup": 2, "steps": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU, {torch.get_num_threads()} threads"
    formats = list(load_config(["space=int_fp"]).space.candidates) + ["bf16"]
    timer = Timer(device)
    start = time.monotonic()
    fq = fakequant_rows(formats, args.numel, device, timer, args.steps, args.backend)
    steps = step_rows(args, formats[:-1], device, timer)
    print(f"device: {card}; torch {torch.__version__}; backend {args.backend}; fake quantization of "
          f"{args.numel:,} bf16 values; {args.model} {args.size} px batch {args.batch}, bf16 autocast "
          f"{'on' if device.type == 'cuda' else 'off (CPU)'}, {args.warmup} warm-up + {args.steps} timed steps; "
          f"{time.monotonic() - start:.0f} s\n")
    print("ratio: fake-quant rows, the fraction of the copy's bandwidth (target >= 0.70); step rows, the time "
          "per step relative to the plain compiled step (target for the compiled search step <= 1.15, peak "
          "memory <= 1.15x, 0 graphs after warm-up)\n")
    print("\n".join(table(fq + steps)))
    return fq + steps


if __name__ == "__main__":
    main()
