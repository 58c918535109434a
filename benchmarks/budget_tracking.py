"""Does a one-shot FLIQS search land on the cost target its user set, and why not?

    python benchmarks/budget_tracking.py [--variants paper reward dual] [--targets 0.12 0.2 0.3] [--seeds 11 12]
        [--epochs 24] [--model fliqs_resnet] [--jobs 2] [--out DIR] [--set key=value ...]

Each variant is a set of config overrides (`VARIANTS`; ``--set`` adds overrides to every run). Every (variant, target,
seed) is one in-process FLIQS search on the embedded digits data, logging every step; ``--jobs`` of them run at a time,
each in its own process with one torch thread. Per run it reports, from the MLflow metric history:

* the policy's expected cost / target (``expected_gbops``, exact under the policy's probabilities) at the end of the
  warm-up, at 50 % and 75 % of the steps, and at the end;
* the share of the RL steps' samples that cost more than the target, per half of the RL phase;
* the final policy entropy (nats per decision) and the multiplier's last value (dual variants);
* the argmax's cost / target, the result's cost / target and test accuracy, and the argmax's test accuracy when the
  result is another assignment (``budget.extraction=within``).

Prints a markdown table (and a summary per variant: the landed cost / target over every target and seed, and how
many runs land in [0.85, 1.00]), writes ``budget_tracking.json`` and ``budget_tracking.png`` (expected cost / target
over the steps, one panel per target) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

VARIANTS = {  # the paper: a uniform start, the reward alone, the argmax
    "paper": ["budget.tracking=reward", "budget.extraction=argmax"],
    "paper_b05": ["budget.tracking=reward", "budget.extraction=argmax", "reward.beta=-0.5"],
    "paper_b2": ["budget.tracking=reward", "budget.extraction=argmax", "reward.beta=-2"],
    "paper_h0": ["budget.tracking=reward", "budget.extraction=argmax", "controller.entropy_max=0"],
    "prior": ["budget.prior=target", "budget.tracking=reward", "budget.extraction=argmax"],  # start at the target
    "dual": ["budget.prior=target", "budget.tracking=dual", "budget.extraction=argmax"],  # ... and a multiplier
    "dual_s32": ["budget.prior=target", "budget.tracking=dual", "budget.dual_scale=32", "budget.extraction=argmax"],
    "uniform_dual": ["budget.tracking=dual", "budget.extraction=argmax"],  # a multiplier from a uniform start
    "projection_prior": ["budget.prior=target", "budget.extraction=argmax"],  # the policy held at E[C] = T
    "projection_argmax": ["budget.extraction=argmax"],  # ... from a uniform start, its argmax
    "projection_within": ["budget.extraction_floor=0"],  # ... the most probable assignment within the target
    "default": [],  # projection from a uniform start, the most probable assignment in [0.9 T, T]
}
BAND = (0.85, 1.00)


def run_one(job: dict) -> dict:
    """One search in this (pool) process; its result and the metric histories the table needs."""
    import torch
    from mlflow.tracking import MlflowClient

    from fliqs.run.loading import load_config
    from fliqs.trainables.search import run_search

    torch.set_num_threads(1)
    out = Path(job["out"])
    name = f"{job['variant']}-t{job['target']}-s{job['seed']}"
    cfg = load_config([f"output_dir={out / name}", f"name={name}", f"model={job['model']}",
                       f"train.epochs={job['epochs']}", f"reward.target_fraction={job['target']}",
                       f"seed={job['seed']}", "train.log_every=1", "train.checkpoint_every=1000000",
                       *VARIANTS[job["variant"]], *job["extra"]])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = run_search(cfg)
    client = MlflowClient(result["mlflow_tracking_uri"])

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(result["mlflow_run_id"], key), key=lambda m: m.step)]

    warmup = int(round(cfg.controller.warmup_fraction * result["steps"]))
    return {**job, "name": name, "steps": result["steps"], "warmup": warmup, "target_gbops": result["target"],
            "expected": history("expected_gbops"), "sampled": history("sampled_gbops"),
            "entropy": history("policy_entropy"), "multiplier": history("cost_multiplier"),
            "gbops": result["gbops"], "accuracy": result["accuracy"], "argmax_ratio": result["argmax_cost_ratio"],
            "argmax_accuracy": result.get("argmax_test_accuracy"), "final_entropy": result["final_entropy"]}


def describe(run: dict) -> dict:
    """The table's numbers for one run."""
    t, n, w = run["target_gbops"], run["steps"], run["warmup"]
    expected = np.array(run["expected"]) / t
    sampled = np.array(run["sampled"]) / t
    rl = sampled[w:]
    half = len(rl) // 2
    return {"warmup_end": expected[max(0, w - 1)], "half": expected[n // 2 - 1],
            "three_quarters": expected[3 * n // 4 - 1], "end": expected[-1],
            "over_first": float(np.mean(rl[:half] > 1)), "over_second": float(np.mean(rl[half:] > 1)),
            "ratio": run["gbops"] / t, "argmax_ratio": run["argmax_ratio"], "accuracy": run["accuracy"],
            "argmax_accuracy": run["argmax_accuracy"], "entropy": run["final_entropy"],
            "multiplier": run["multiplier"][-1] if run["multiplier"] else None}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in runs})
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    colors = {v: plt.get_cmap("tab10")(i) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        for r in (r for r in runs if r["target"] == target):
            ratio = np.array(r["expected"]) / r["target_gbops"]
            ax.plot(np.arange(1, len(ratio) + 1), ratio, color=colors[r["variant"]], lw=0.9, alpha=0.8,
                    label=r["variant"] if r["seed"] == min(x["seed"] for x in runs) else None)
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.axhspan(*BAND, color="green", alpha=0.08)
        ax.set_title(f"target {target} x int8", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expected cost / target")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["paper", "reward", "dual"], choices=list(VARIANTS))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.12, 0.2, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--model", default="fliqs_resnet")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [{"variant": v, "target": t, "seed": s, "epochs": args.epochs, "model": args.model, "out": tmp,
                 "extra": args.set} for v in args.variants for t in args.targets for s in args.seeds]
        with ProcessPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(run_one, jobs))
    print(f"{args.model}, {args.epochs} epochs, overrides {args.set or 'none'}; E[C]/T: the policy's expected cost / "
          f"target; over: share of the RL samples above the target (first / second half of the RL phase)\n")
    print("| variant | target | seed | E[C]/T end of warm-up | 50 % | 75 % | end | over (1st / 2nd half) | final "
          "entropy | multiplier | argmax / T | result / T | test accuracy | argmax accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        d = describe(r)
        mult = "" if d["multiplier"] is None else f"{d['multiplier']:.3f}"
        arg_acc = "" if d["argmax_accuracy"] is None else f"{d['argmax_accuracy']:.4f}"
        print(f"| {r['variant']} | {r['target']} | {r['seed']} | {d['warmup_end']:.2f} | {d['half']:.2f} | "
              f"{d['three_quarters']:.2f} | {d['end']:.2f} | {d['over_first']:.0%} / {d['over_second']:.0%} | "
              f"{d['entropy']:.3f} | {mult} | {d['argmax_ratio']:.2f} | {d['ratio']:.2f} | {d['accuracy']:.4f} | "
              f"{arg_acc} |")
    print("\n| variant | result / T (mean, min, max) | in [0.85, 1.00] | test accuracy (mean) |")
    print("|---|---|---|---|")
    for v in args.variants:
        ds = [describe(r) for r in runs if r["variant"] == v]
        ratios = np.array([d["ratio"] for d in ds])
        inside = int(np.sum((ratios >= BAND[0]) & (ratios <= BAND[1])))
        print(f"| {v} | {ratios.mean():.2f}, {ratios.min():.2f}, {ratios.max():.2f} | {inside} of {len(ds)} | "
              f"{np.mean([d['accuracy'] for d in ds]):.4f} |")
    (args.out / "budget_tracking.json").write_text(json.dumps(runs))
    plot(runs, args.out / "budget_tracking.png")


if __name__ == "__main__":
    main()
