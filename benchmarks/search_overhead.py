"""What one-shot search costs over plain quantization-aware training: wall time and peak memory.

Same model, data, epochs and batch size, in-process (num_workers=0, one process each, run one after the other):
* uniform QAT: every layer int8, one forward/backward/update per batch;
* FLIQS search: the full one-shot step (sample an int_fp assignment, train, quality, reward, controller
  update), with quality measured on a validation batch (TuNAS, the default: one extra forward) and as minus the
  training loss (the public FLIQS code: no extra forward).
Each variant runs in a fresh subprocess so peak RSS is its own. Targets (issue 3): wall <= 1.2x, memory <= 1.1x.
Usage: python benchmarks/search_overhead.py [--epochs N] [--model fliqs_cnn|test_resnet]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def run_variant(variant: str, epochs: int, model: str) -> dict:
    from torch.utils.data import DataLoader

    from fliqs.data.datasets import load_configured
    from fliqs.quant.layers import set_assignment
    from fliqs.run.loading import load_config
    from fliqs.searchers.reinforce import fliqs_step, make_search
    from fliqs.trainables.plan import build_network

    cfg = load_config([f"model={model}", f"train.epochs={epochs}"])
    splits = load_configured(cfg.data, cfg.model.input_size)
    network = build_network(cfg, splits.info)  # what every worker of a run builds
    net, layers, shapes, space = network.model, network.layers, network.shapes, network.space
    loader = DataLoader(splits.train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    val = DataLoader(splits.val, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    total = epochs * len(loader)
    params = sum(p.numel() for p in net.parameters())
    quality = "neg_train_loss" if variant == "fliqs_loss" else "val_accuracy"
    search = make_search(space, layers, shapes, params, total_steps=total, target=1e9, quality=quality)
    set_assignment(layers, space.uniform("int8"))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, step = time.perf_counter(), 0
    val_it = iter(val)
    for _ in range(epochs):
        for x, y in loader:
            if variant.startswith("fliqs"):
                try:
                    vb = next(val_it)
                except StopIteration:
                    val_it = iter(val)
                    vb = next(val_it)
                fliqs_step(net, search, opt, (x, y), vb, step)
            else:
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step += 1
    wall = time.perf_counter() - start
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "wall_s": wall, "steps": step, "peak_rss_mb": rss1 / 1024,
            "train_rss_growth_mb": (rss1 - rss0) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="fliqs_cnn")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.epochs, args.model)))
        return
    rows = {}
    variants = ("uniform", "fliqs", "fliqs_loss")
    for variant in variants * 2:  # twice, interleaved; keep the faster run of each
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--epochs", str(args.epochs),
                              "--model", args.model], check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        if variant not in rows or r["wall_s"] < rows[variant]["wall_s"]:
            rows[variant] = r
    u = rows["uniform"]
    labels = {"uniform": "uniform int8 QAT", "fliqs": "FLIQS search, quality = validation batch",
              "fliqs_loss": "FLIQS search, quality = -training loss"}
    print(f"model {args.model}, digits, {args.epochs} epochs, {u['steps']} steps, in-process\n")
    print("| variant | wall s | peak RSS MB | ratio wall | ratio peak RSS |\n|---|---|---|---|---|")
    for variant in variants:
        r = rows[variant]
        print(f"| {labels[variant]} | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['wall_s'] / u['wall_s']:.2f} | "
              f"{r['peak_rss_mb'] / u['peak_rss_mb']:.2f} |")


if __name__ == "__main__":
    main()
