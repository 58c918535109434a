"""Plots people look at: the policy's per-layer format probabilities over training (`plot_policy_history`) and a
study's Pareto fronts with its budgets (`plot_fronts`), and a search run's result against its target
(`plot_search_result`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fliqs.analysis.budgets import budgets  # noqa: E402
from fliqs.analysis.fronts import pareto_front  # noqa: E402
from fliqs.analysis.points import Point, by_method, finite  # noqa: E402
from fliqs.searchers.methods import DIFFERENTIABLE, MULTI_TRIAL, ONE_SHOT, SENSITIVITY, UNIFORM  # noqa: E402

MAX_COLUMNS = 4
LOG_SCALE_SPAN = 10.0  # the study plot's cost axis is logarithmic when max cost / min cost exceeds this
PALETTE = "tab10"
FAMILY_MARKERS = {ONE_SHOT: "*", MULTI_TRIAL: "o", DIFFERENTIABLE: "s", SENSITIVITY: "P", UNIFORM: "D"}
PANEL_IN = (3.4, 2.4)  # width, height of one decision's panel (inches)
MARGIN_IN = {"left": 0.45, "right": 0.15, "top": 0.55, "bottom": 0.75}  # room for the title, tick labels, legend


def plot_policy_history(steps: Sequence[int], probs: Sequence[Sequence[Sequence[float]]],
                        decisions: Sequence[str], candidates: Sequence[Sequence[str]], path: str | Path,
                        warmup_steps: int | None = None, title: str = "") -> Path:
    """One panel per decision: stacked probability of each candidate format against the training step."""
    # Drawing cost grows with the number of tick and text artists: ResNet-50 has over 100 decisions. So the panels do
    # not share axes (matplotlib propagates every limit change to all sharing axes: quadratic in the panels), ticks
    # are fixed and few, tick labels are drawn on the outer panels only, and the layout is computed from fixed
    # margins rather than by tight_layout (one extra draw). benchmarks/plot_speed.py measures it (RESULTS.md).
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


def _log_x(costs: Sequence[float]) -> bool:
    positive = [c for c in costs if c > 0]
    return bool(positive) and len(positive) == len(costs) and max(positive) / min(positive) > LOG_SCALE_SPAN


def _steps(front: Sequence[Point]) -> list[tuple[float, float]]:
    """The attainment staircase of a front: right from each point, then up to the next one."""
    xy: list[tuple[float, float]] = []
    for i, p in enumerate(front):
        if i:
            xy.append((p.cost, front[i - 1].accuracy))
        xy.append((p.cost, p.accuracy))
    return xy


def plot_fronts(points: Iterable[Point], path: str | Path, title: str = "") -> Path:
    """PNG: every point coloured by method (marker by family), each method's front as a step line, each budget of
    the study (`fliqs.analysis.budgets.budgets`) a thin dotted grey vertical line labelled with its fraction.

    Cost on x (logarithmic when the costs span more than 10x), accuracy on y.
    """
    points = finite(points)
    groups = by_method(points)
    cmap = plt.get_cmap(PALETTE)
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, ps in groups.items():
        color = colors[method]
        for family in sorted({p.family for p in ps}):
            fam = [p for p in ps if p.family == family]
            ax.scatter([p.cost for p in fam], [p.accuracy for p in fam], color=color, alpha=0.55, s=28,
                       marker=FAMILY_MARKERS.get(family, "o"), edgecolors="none")
        seeds = {p.seed for p in ps}
        if len(seeds) > 1:  # every seed's own front, thin, under the front of all its seeds
            for seed in seeds:
                sxy = _steps(pareto_front([p for p in ps if p.seed == seed]))
                ax.plot([x for x, _ in sxy], [y for _, y in sxy], color=color, lw=0.7, alpha=0.45, ls="--")
        front = pareto_front(ps)
        xy = _steps(front)
        family = ps[0].family
        ax.plot([x for x, _ in xy], [y for _, y in xy], color=color, lw=1.6, marker=FAMILY_MARKERS.get(family, "o"),
                markevery=list(range(0, len(xy), 2)), ms=6, label=f"{method} ({family})")
        for p in front:
            if p.label:
                ax.annotate(p.label, (p.cost, p.accuracy), fontsize=6, xytext=(3, -8), textcoords="offset points")
    for budget in budgets(points):
        ax.axvline(budget.gbops, color="grey", lw=0.8, ls=":", zorder=0)
        # y in axes coordinates: the label stays at the top whatever the accuracies
        ax.text(budget.gbops, 0.98, budget.label, transform=ax.get_xaxis_transform(), rotation=90, fontsize=6,
                color="grey", ha="right", va="top")
    if _log_x([p.cost for p in points]):
        ax.set_xscale("log")
    ax.set_xlabel("cost (GBOPs, lower is better)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3, which="both")
    if groups:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "accuracy against cost: every trial, each method's front (dashed: per seed)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_search_result(result: tuple[float, float], target: float, unit: str, path: str | Path, *,
                       references: Sequence[tuple[str, float, float]] = (),
                       alternatives: Sequence[tuple[str, float, float]] = (),
                       history: Mapping[str, Sequence[tuple[int, float]]] | None = None, title: str = "") -> Path:
    """PNG for a search run's page, its result first. Left: test accuracy against cost, the result (a star), the
    target (a dotted line), other assignments evaluated beside it (``alternatives``: the policy's argmax) and the
    uniform formats' runs of the same model and data when the store has them (``references``: (format, cost,
    accuracy)). Right, when ``history`` has them: the expected cost under the policy over the steps (with the
    target) and the accuracy the search measured while it trained."""
    history = {k: v for k, v in (history or {}).items() if v}
    fig, axes = plt.subplots(1, 2 if history else 1, figsize=(10, 3.6) if history else (5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    for label, cost, accuracy in references:
        ax.scatter([cost], [accuracy], marker=FAMILY_MARKERS[UNIFORM], color="grey", s=22)
        ax.annotate(label, (cost, accuracy), fontsize=6, xytext=(3, -8), textcoords="offset points", color="grey")
    for label, cost, accuracy in alternatives:
        ax.scatter([cost], [accuracy], marker="o", facecolors="none", edgecolors="tab:blue", s=40, label=label)
    ax.scatter([result[0]], [result[1]], marker="*", color="tab:red", s=140, zorder=3, label="result")
    ax.axvline(target, color="tab:red", lw=0.9, ls=":", label="target")
    ax.set_xlabel(f"cost ({unit}, lower is better)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "the result against its target", fontsize=9)
    if history:
        right = axes[0][1]
        cost_key = next((k for k in history if k.startswith("expected_")), None)
        if cost_key:
            steps, values = zip(*history[cost_key], strict=True)
            right.plot(steps, values, color="tab:red", lw=1.2, label=cost_key)
            right.axhline(target, color="tab:red", lw=0.9, ls=":")
            right.set_ylabel(f"expected cost ({unit})")
        right.set_xlabel("step")
        twin = right.twinx() if cost_key else right
        for key in (k for k in history if k != cost_key):
            steps, values = zip(*history[key], strict=True)
            twin.plot(steps, values, lw=1.0, alpha=0.8, label=key)
        twin.set_ylabel("accuracy while training")
        right.set_title("over the steps", fontsize=9)
        handles = [h for a in {right, twin} for h in a.get_legend_handles_labels()[0]]
        right.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
