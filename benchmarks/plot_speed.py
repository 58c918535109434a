"""CPU seconds to draw the policy-evolution plot (`fliqs.analysis.plots.plot_policy_history`) as the decisions grow.

Every FLIQS / FLIQNAS run draws it once at the end, on rank 0 (a study: once per trial). fliqs_cnn has 4 decisions,
the FLIQNAS digits supernet 35, ResNet-50 over 100. The ratio column is the cost per panel against the 4-panel
plot of the same run: about 1 means the drawing cost grows linearly with the panels.

    python benchmarks/plot_speed.py
"""

from __future__ import annotations

import resource
import tempfile
from pathlib import Path

import numpy as np

from fliqs.analysis.plots import plot_policy_history

CANDIDATES = ["int4", "int8", "fp8_e4m3", "fp4_e2m1"]
STEPS = list(range(0, 200, 2))  # 100 logged points


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def draw(panels: int, folder: Path) -> float:
    rng = np.random.default_rng(0)
    probs = [[list(rng.dirichlet(np.ones(len(CANDIDATES)))) for _ in range(panels)] for _ in STEPS]
    start = cpu_s()
    plot_policy_history(STEPS, probs, [f"layer{i}.w" for i in range(panels)], [CANDIDATES] * panels,
                        folder / f"policy_{panels}.png", warmup_steps=50)
    return cpu_s() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        draw(4, Path(tmp))  # the first figure pays for matplotlib's font cache and backend set-up
        rows = [(n, draw(n, Path(tmp))) for n in (4, 35, 100)]
    base = rows[0][1] / rows[0][0]
    print("| panels | CPU s | CPU s per panel / 4-panel plot's |")
    print("|---|---|---|")
    for n, seconds in rows:
        print(f"| {n} | {seconds:.2f} | {seconds / n / base:.2f} |")


if __name__ == "__main__":
    main()
