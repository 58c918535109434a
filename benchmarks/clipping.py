"""Uniform QAT with and without range clipping: does INT lose to FP because it is quantized at its weakest?

    python benchmarks/clipping.py [--model fliqs_cnn] [--formats int3 int4 fp4_e2m1] [--seeds 0 1 2] [--epochs 15]

Every (format, clip setting, seed) is one `fliqs search method=uniform` run in-process on the embedded digits data
(clipping applied to every format here: ``quant.clip_formats=['*']``). Settings: ranges at the max (``max``), the
MSE-optimal per-channel weight clip (``mse``), the 99.99th percentile of each activation tensor (``pct``), both
(``mse+pct``), each with dynamic and EMA-calibrated activation ranges. Prints test accuracy mean +- std over the
seeds; this is how the defaults of ``quant.weight_clip``, ``quant.act_clip`` and ``quant.clip_formats`` were chosen
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

SETTINGS = {"max": [], "mse": ["quant.weight_clip=mse"], "pct": ["quant.act_clip=percentile"],
            "mse+pct": ["quant.weight_clip=mse", "quant.act_clip=percentile"]}


def run(model: str, fmt: str, setting: list[str], act_range: str, seed: int, epochs: int, out: Path) -> float:
    from fliqs.run.loading import load_config
    from fliqs.trainables.search import run_search

    name = f"{model}-{fmt}-{'-'.join(s.split('=')[-1] for s in setting) or 'max'}-{act_range}-s{seed}"
    cfg = load_config([f"output_dir={out}", f"name={name}", f"model={model}", "method=uniform",
                       f"quant.uniform_format={fmt}", "quant.clip_formats=['*']", f"quant.act_range={act_range}",
                       f"seed={seed}", f"train.epochs={epochs}", "train.log_every=1000", *setting])
    return run_search(cfg)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fliqs_cnn")
    parser.add_argument("--formats", nargs="+", default=["int3", "int4", "fp4_e2m1"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--act-ranges", nargs="+", default=["dynamic", "ema"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = [f"{s} ({r})" for r in args.act_ranges for s in SETTINGS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            cells = []
            for act_range in args.act_ranges:
                for setting in SETTINGS.values():
                    accs = [run(args.model, fmt, setting, act_range, seed, args.epochs, Path(tmp))
                            for seed in args.seeds]
                    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                    cells.append(f"{statistics.mean(accs):.4f} +- {sd:.4f}")
            rows.append([fmt, *cells])
            print(f"{fmt}: done", flush=True)
    print(f"\nuniform QAT, {args.model} on digits, {args.epochs} epochs, seeds {args.seeds}: test accuracy mean +- "
          f"std\n")
    print("| format | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
