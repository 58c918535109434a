"""Does the FLIQS controller converge when its schedule says, whatever the run length?

    python benchmarks/controller_convergence.py [--steps 300 3000 30000] [--seeds 20] [--digits] [--out DIR]

1. Bandits with a known best arm per decision: D = 4 decisions of K = 9 candidates (the size of the int_fp space on
   fliqs_cnn). Each candidate has a mean quality (the best 1.0, the others uniform in [0.3, 0.7]); the reward of a
   sample is the mean over decisions of its candidates' qualities plus Gaussian noise (sd 0.02). The real
   `fliqs.searchers.controller.Controller` with its defaults (warm-up, scaled and rising learning rate, cosine
   entropy penalty) runs ``--steps`` updates per seed. Targets per run length: mean entropy at half the steps
   >= half its maximum (log K), final entropy <= 0.1 nats, and the argmax equal to the best arm of every decision
   in >= 95 % of the seeds.
2. ``--digits``: the real FLIQS search on the embedded digits data (in-process, fliqs_cnn, int_fp space, target
   0.35 x uniform int8, beta -0.5) for the same run lengths: its policy entropy at half and at the end.

Prints one table per part and writes ``controller_convergence.png`` (entropy trajectories: every seed of the bandit,
the digits searches) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

D, K, SIGMA = 4, 9, 0.02


def bandit_run(steps: int, seed: int) -> tuple[list[float], bool]:
    """One controller on one bandit: its mean entropy per step, and whether its argmax is every best arm."""
    from fliqs.searchers.controller import Controller

    rng = np.random.default_rng(seed)
    quality = rng.uniform(0.3, 0.7, size=(D, K))
    best = rng.integers(K, size=D)
    quality[np.arange(D), best] = 1.0
    controller = Controller([K] * D, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    entropy = []
    for step in range(steps):
        choices = controller.sample(step, generator)
        reward = float(quality[np.arange(D), choices.numpy()].mean() + SIGMA * rng.standard_normal())
        entropy.append(controller.update(choices, reward, step)["entropy"])
    return entropy, bool((controller.policy.argmax().numpy() == best).all())


def digits_run(steps: int, out: Path) -> list[tuple[int, float]]:
    """A FLIQS search of about ``steps`` steps on digits; its (step, policy entropy) history."""
    from mlflow.tracking import MlflowClient

    from fliqs.run.loading import load_config
    from fliqs.trainables.search import run_search

    per_epoch = 19  # digits' 1,257 training images in batches of 64
    epochs = max(1, round(steps / per_epoch))
    cfg = load_config([f"output_dir={out}", f"name=d{steps}", f"train.epochs={epochs}", "reward.target_fraction=0.35",
                       "reward.beta=-0.5", f"train.log_every={max(1, epochs * per_epoch // 100)}",
                       f"train.checkpoint_every={10 * epochs * per_epoch}"])
    result = run_search(cfg)
    history = MlflowClient(result["mlflow_tracking_uri"]).get_metric_history(result["mlflow_run_id"], "policy_entropy")
    return sorted((m.step, m.value) for m in history)


def at(history: list[tuple[int, float]], step: int) -> float:
    return min(history, key=lambda sv: abs(sv[0] - step))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 3000, 30000])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--digits", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    h_max = math.log(K)
    curves: dict[int, list[list[float]]] = {}
    print(f"bandit: {D} decisions x {K} candidates, reward noise sd {SIGMA}, {args.seeds} seeds; max entropy "
          f"{h_max:.3f}\n")
    print("| steps | entropy at half (mean, min) | final entropy (mean, max) | argmax = best arms | targets |")
    print("|---|---|---|---|---|")
    for steps in args.steps:
        runs = [bandit_run(steps, seed) for seed in range(args.seeds)]
        curves[steps] = [r[0] for r in runs]
        half = np.array([r[0][steps // 2] for r in runs])
        final = np.array([r[0][-1] for r in runs])
        right = np.mean([r[1] for r in runs])
        met = half.mean() >= h_max / 2 and final.mean() <= 0.1 and right >= 0.95
        print(f"| {steps} | {half.mean():.3f}, {half.min():.3f} | {final.mean():.3f}, {final.max():.3f} | "
              f"{right:.0%} | {'met' if met else 'NOT met'} |", flush=True)
    digits: dict[int, list[tuple[int, float]]] = {}
    if args.digits:
        print("\ndigits FLIQS search (fliqs_cnn, int_fp, target 0.35 x int8, beta -0.5), one seed\n")
        print("| steps | entropy at half | final entropy |")
        print("|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for steps in args.steps:
                history = digits_run(steps, Path(tmp))
                digits[steps] = history
                total = history[-1][0]
                print(f"| {total} | {at(history, total // 2):.3f} | {history[-1][1]:.3f} |", flush=True)
    plot(curves, digits, h_max, out / "controller_convergence.png")
    print(f"\nplot: {out / 'controller_convergence.png'}")


def plot(curves, digits, h_max: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for steps, runs in curves.items():
        x = np.linspace(0, 1, steps)
        for i, entropy in enumerate(runs):
            axes[0].plot(x, entropy, lw=0.6, alpha=0.35, color=f"C{list(curves).index(steps)}",
                         label=f"{steps} steps" if i == 0 else None)
    for i, history in enumerate(digits.values()):
        total = history[-1][0]
        axes[1].plot([s / total for s, _ in history], [h for _, h in history], color=f"C{i}", label=f"{total} steps")
    for ax, title in zip(axes, ("bandit, every seed", "digits FLIQS search"), strict=True):
        ax.axhline(h_max / 2, color="k", lw=0.6, ls=":")
        ax.axhline(0.1, color="k", lw=0.6, ls="--")
        ax.axvline(0.5, color="k", lw=0.4)
        ax.set_xlabel("fraction of the run")
        ax.set_ylabel("mean policy entropy (nats)")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
