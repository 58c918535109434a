"""Do different cost targets give different searches? (The "different targets, same answer" finding.)

    python benchmarks/target_response.py [--targets 0.18 0.22] [--epochs 60] [--betas -0.1 -0.5]

For each controller (``new``: the defaults; ``old``: the earlier Adam lr 0.1 constant rate and an entropy weight of
0.125 per decision on the sum, i.e. 0.5 on the mean over fliqs_cnn's 4 decisions) and each reward beta, FLIQS runs
in-process on digits at every target with the same seed, logging every step. Per pair of targets it reports the
mean |reward difference| of the same step, the fraction of RL steps whose advantages have the same sign at both
targets (Adam with beta1 = 0 moves each logit by about its rate in the direction of the gradient's sign, so equal
signs mean nearly equal updates), how long the samples stayed identical (the warm-up samples uniformly from the
same generator at every target), and the chosen assignments and costs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch

CONTROLLERS = {"new": [], "old": ["controller.lr=0.1", "controller.lr_rise=1", "controller.entropy_max=0.125"]}


def search(out: Path, name: str, target: float, beta: float, extra: list[str], epochs: int) -> dict:
    from mlflow.tracking import MlflowClient

    from fliqs.run.loading import load_config
    from fliqs.trainables.search import run_search

    cfg = load_config([f"output_dir={out}", f"name={name}", f"reward.target_fraction={target}", f"reward.beta={beta}",
                       f"train.epochs={epochs}", "train.log_every=1", f"train.checkpoint_every={10**6}", *extra])
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_search(cfg)
    client = MlflowClient(result["mlflow_tracking_uri"])
    history = {key: np.array([m.value for m in sorted(client.get_metric_history(result["mlflow_run_id"], key),
                                                      key=lambda m: m.step)])
               for key in ("reward", "baseline", "sampled_gbops")}
    return {**result, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.18, 0.22])
    parser.add_argument("--betas", type=float, nargs="+", default=[-0.1, -0.5])
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| controller | beta | targets | mean abs reward diff | same advantage sign | identical samples | chosen "
          "(GBOPs, accuracy) per target |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for (label, extra), beta in itertools.product(CONTROLLERS.items(), args.betas):
            runs = {t: search(Path(tmp), f"{label}{beta}t{t}", t, beta, extra, args.epochs) for t in args.targets}
            for a, b in itertools.combinations(args.targets, 2):
                ha, hb = runs[a]["history"], runs[b]["history"]
                n = min(len(ha["reward"]), len(hb["reward"]))
                rl = slice(n // 4, n)  # after the warm-up
                # the logged baseline is after the step's update: the advantage used the previous one
                adv_a = ha["reward"][1:n] - ha["baseline"][:n - 1]
                adv_b = hb["reward"][1:n] - hb["baseline"][:n - 1]
                same_sign = float(np.mean(np.sign(adv_a[rl]) == np.sign(adv_b[rl])))
                differ = np.nonzero(ha["sampled_gbops"][:n] != hb["sampled_gbops"][:n])[0]
                same_samples = f"all {n}" if not len(differ) else f"first {differ[0]} of {n}"
                diff = float(np.mean(np.abs(ha["reward"][:n] - hb["reward"][:n])))
                chosen = "; ".join(f"{t}: {runs[t]['gbops']:.4g}, {runs[t]['accuracy']:.4f} "
                                   f"{'/'.join(d['choice'] for d in runs[t]['decisions'])}" for t in (a, b))
                print(f"| {label} | {beta} | {a} / {b} | {diff:.4f} | {same_sign:.0%} | {same_samples} | {chosen} |",
                      flush=True)


if __name__ == "__main__":
    main()
