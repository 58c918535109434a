"""The study's grid and its validation (`fliqs.trainables.study.check_study`), without Ray: every study file of
conf/study checks out against its data (tiny folders in the layouts of CIFAR-10, ImageNet and Fashion-MNIST's IDX
files), and bad grids are refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_tiny_cifar10, write_tiny_fashion_mnist, write_tiny_imagefolder
from omegaconf import OmegaConf

from fliqs.errors import BadInput
from fliqs.run.loading import conf_dir, load_config
from fliqs.searchers import methods
from fliqs.trainables.study import check_study, trial_grid, trial_key

STUDIES = sorted(p.stem for p in (conf_dir() / "study").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"cifar10": write_tiny_cifar10(root / "cifar"), "imagenet": write_tiny_imagefolder(root / "imagenet"),
            "fashion_mnist": write_tiny_fashion_mnist(root / "fashion")}


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_file_checks_out(study, data_paths, tmp_path):
    cfg = load_config([f"study={study}", f"output_dir={tmp_path}"], study=True)
    if cfg.data.name in data_paths:  # the tiny folders hold too few images for a study's training subset
        subset = ["data.train_subset=100"] if cfg.data.train_subset else []
        cfg = load_config([f"study={study}", f"output_dir={tmp_path}", f"data.path={data_paths[cfg.data.name]}",
                           *subset], study=True)
    trials, _ = check_study(cfg)
    keys = [trial_key(t) for t in trials]
    assert len(keys) == len(set(keys)), "one trial per (method, target or format, seed)"
    families = {methods.get(t["method"]).family for t in trials}
    assert methods.ONE_SHOT in families and methods.UNIFORM in families
    assert not any(tmp_path.iterdir()), "checking writes nothing"


def test_the_embedded_study_separates_what_it_should():
    """Targets between uniform int2 and int4 and above int4, three seeds, every family but architecture search
    (sensitivity when registered), on a network deep enough for mixed precision to matter."""
    cfg = load_config(["study=digits"], study=True)
    assert {methods.get(m).family for m in cfg.study.methods} >= {methods.ONE_SHOT, methods.MULTI_TRIAL,
                                                                 methods.DIFFERENTIABLE, methods.UNIFORM}
    assert any(1 / 16 < t < 1 / 4 for t in cfg.study.target_fractions)
    assert any(t > 1 / 4 for t in cfg.study.target_fractions)
    assert len(cfg.study.seeds) >= 3
    from fliqs.data.datasets import describe
    from fliqs.trainables.plan import build_network

    assert len(build_network(cfg, describe("digits")).layers) >= 10


@pytest.mark.parametrize("override, message", [
    ("study.methods=[darts]", "unknown method 'darts'"),
    ("study.target_fractions=[0.001]", "outside what the space can reach"),
    ("study.uniform_formats=[int5]", "unknown format 'int5'"),
    ("study.methods=[fliqnas]", "search a supernet's architecture"),
])
def test_bad_grids_are_refused_before_any_work(override, message, tmp_path):
    with pytest.raises(BadInput, match=message):
        check_study(load_config([override, f"output_dir={tmp_path}"], study=True))


def test_grid_has_one_trial_per_method_target_seed():
    cfg = load_config(["study.methods=[uniform,fliqs,random]", "study.uniform_formats=[]",
                       "study.target_fractions=[0.3,0.5]", "study.seeds=[0,1]"], study=True)
    grid = trial_grid(cfg)
    uniform = [t for t in grid if t["method"] == "uniform"]
    assert len(uniform) == 2 * (len(cfg.space.candidates) + 1)  # every candidate plus bf16, per seed
    assert {t["quant"]["uniform_format"] for t in uniform} == {*cfg.space.candidates, "bf16"}
    fliqs = [t for t in grid if t["method"] == "fliqs"]
    assert sorted((t["seed"], t["reward"]["target_fraction"]) for t in fliqs) == [(0, 0.3), (0, 0.5), (1, 0.3),
                                                                                   (1, 0.5)]
    # Every trial is a config override a `fliqs search` would accept as it is.
    for trial in grid:
        merged = OmegaConf.merge(cfg, trial)
        assert load_config([f"method={merged.method}", f"seed={merged.seed}",
                            *([f"quant.uniform_format={merged.quant.uniform_format}"]
                              if merged.quant.uniform_format else [])]).method == trial["method"]


def test_print_study_shows_the_accuracy_at_budget_and_landed_cost(capsys):
    """The console after a study: the trial table, the hypervolumes, then accuracy at budget and landed cost /
    target (a method with no point within a budget says so)."""
    from fliqs.analysis.budgets import budget_report
    from fliqs.analysis.points import Point
    from fliqs.trainables.study import print_study

    points = [Point("fliqs", "one-shot", 0.90, 9.0, run_id="a", target_fraction=0.25, seed=0, target=10.0),
              Point("fliqs", "one-shot", 0.80, 11.0, run_id="b", target_fraction=0.25, seed=1, target=10.0),
              Point("uniform", "uniform", 0.95, 40.0, run_id="c", seed=0, label="int8")]
    trial = {"epochs": 1.0, "worker_s": 2.0, "peak_memory_mb": 3.0}
    summary = {"trials": [{"trial": "fliqs_t0.25_s0", "family": "one-shot", "test_accuracy": 0.9, "gbops": 9.0,
                           **trial}],
               "hypervolume": {"fliqs": 1.0, "uniform": 0.5},
               "hypervolume_seeds": {m: {"hypervolume_mean": 1.0, "hypervolume_std": 0.0,
                                         "hypervolume_by_seed": {"0": 1.0}} for m in ("fliqs", "uniform")},
               "paired": {}, "accuracy_at_budget": budget_report(points), "errors": [], "parent_run_id": "p",
               "experiment_id": "1", "tracking_uri": "http://127.0.0.1:5000", "output_dir": "/tmp/out",
               "experiment": "mine"}
    print_study(summary)
    out = capsys.readouterr().out
    # the command to see the fronts again names the store as evaluate and export do
    assert "fliqs pareto tracking.uri=http://127.0.0.1:5000 tracking.experiment=mine --parent p" in out
    assert "accuracy at budget (best test accuracy with cost <= budget, mean +- std over seeds; seeds within " \
           "budget)" in out
    # at 10 GBOPs: fliqs seed 0 0.90 (9 GBOPs), seed 1 none (11 GBOPs): 1 of 2 seeds; uniform (40 GBOPs) none
    at_budget = out.split("accuracy at budget (")[1].split("landed cost")[0].splitlines()
    fliqs = next(line for line in at_budget if line.startswith("fliqs "))
    uniform = next(line for line in at_budget if line.startswith("uniform "))
    assert "0.900 +- 0.000 (1/2)" in fliqs and "none within budget" in uniform
    # landed: 9 / 10 and 11 / 10: mean 1.0, std 0.1 sqrt(2) = 0.141, max 1.1, 1 of 2 over
    assert "landed cost / target" in out and "1.000 +- 0.141, max 1.100, 1/2 over" in out
