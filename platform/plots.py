"""Plots people look at: the policy's per-layer format probabilities over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAX_COLUMNS = 4


def plot_policy_history(steps: Sequence[int], probs: Sequence[Sequence[Sequence[float]]],
                        decisions: Sequence[str], candidates: Sequence[Sequence[str]], path: str | Path,
                        warmup_steps: int | None = None, title: str = "") -> Path:
    """One panel per decision: stacked probability of each candidate format against the training step."""
    n = len(decisions)
    cols = min(MAX_COLUMNS, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.4 * rows), squeeze=False, sharex=True)
    all_formats = sorted({c for cs in candidates for c in cs})
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(all_formats)}
    for i, (name, cands) in enumerate(zip(decisions, candidates, strict=True)):
        ax = axes[i // cols][i % cols]
        series = [[p[i][k] for p in probs] for k in range(len(cands))]
        ax.stackplot(steps, series, colors=[colors[c] for c in cands], labels=list(cands))
        if warmup_steps:
            ax.axvline(warmup_steps, color="k", lw=0.8, ls="--")
        ax.set_title(name, fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[f]) for f in all_formats]
    fig.legend(handles, all_formats, loc="lower center", ncol=min(len(all_formats), 9), fontsize=7)
    fig.suptitle(title or "format probability per decision (dashed: end of warm-up)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
