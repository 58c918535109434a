"""Plots people look at: the policy's per-layer format probabilities over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MAX_COLUMNS = 4
PANEL_IN = (3.4, 2.4)  # width, height of one decision's panel (inches)
MARGIN_IN = {"left": 0.45, "right": 0.15, "top": 0.55, "bottom": 0.75}  # room for the title, tick labels, legend


def plot_policy_history(steps: Sequence[int], probs: Sequence[Sequence[Sequence[float]]],
                        decisions: Sequence[str], candidates: Sequence[Sequence[str]], path: str | Path,
                        warmup_steps: int | None = None, title: str = "") -> Path:
    """One panel per decision: stacked probability of each candidate format against the training step."""
    # Drawing cost grows with the number of tick and text artists: ResNet-50 has over 100 decisions. So the panels do
    # not share axes (matplotlib propagates every limit change to all sharing axes: quadratic in the panels), ticks
    # are fixed and few, tick labels are drawn on the outer panels only, and the layout is computed from fixed
    # margins rather than by tight_layout (one extra draw). plot_speed.py: 100 panels in 5.9 CPU-s (was 25.6).
    n = len(decisions)
    cols = min(MAX_COLUMNS, n)
    rows = (n + cols - 1) // cols
    width, height = PANEL_IN[0] * cols, PANEL_IN[1] * rows + MARGIN_IN["top"] + MARGIN_IN["bottom"]
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=MARGIN_IN["left"] / width, right=1 - MARGIN_IN["right"] / width,
                        top=1 - MARGIN_IN["top"] / height, bottom=MARGIN_IN["bottom"] / height,
                        wspace=0.15, hspace=0.45)
    all_formats = sorted({c for cs in candidates for c in cs})
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(all_formats)}
    for i, (name, cands) in enumerate(zip(decisions, candidates, strict=True)):
        ax = axes[i // cols][i % cols]
        series = [[p[i][k] for p in probs] for k in range(len(cands))]
        ax.stackplot(steps, series, colors=[colors[c] for c in cands], labels=list(cands))
        if warmup_steps:
            ax.axvline(warmup_steps, color="k", lw=0.8, ls="--")
        ax.set_title(name, fontsize=8)
        if len(steps) > 1:
            ax.set_xlim(steps[0], steps[-1])
        ax.set_ylim(0, 1)
        ax.set_yticks([0, 0.5, 1])
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        ax.tick_params(labelsize=7, labelleft=i % cols == 0, labelbottom=i + cols >= n)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[f]) for f in all_formats]
    fig.legend(handles, all_formats, loc="lower center", ncol=min(len(all_formats), 9), fontsize=7)
    fig.suptitle(title or "format probability per decision (dashed: end of warm-up)", fontsize=9,
                 y=1 - 0.12 / height, va="top")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
