"""The sensitivity + integer program method (`fliqs.searchers.sensitivity`, `fliqs.trainables.sensitivity`).

The Hutchinson traces against exact Hessians, the solution's cost against the target (the integer program itself:
test_program.py), the scores on a trained network, and end to end on digits in-process: the MLflow record, `fliqs
evaluate`, and one scoring shared by two targets (and by concurrent runs, through the file lock). The same sharing
across a study's concurrent Ray Tune trials: test_study_e2e.py.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SENSITIVITY_FAST, SENSITIVITY_METHOD, bad_search_input, run_cli
from mlflow.tracking import MlflowClient
from torch import nn

from fliqs.data.datasets import load_digits
from fliqs.errors import BadInput
from fliqs.quant.layers import quantize_model
from fliqs.run import schema
from fliqs.run.config import ConfigError, derive
from fliqs.run.loading import load_config
from fliqs.searchers import methods
from fliqs.searchers.program import linear_costs, program_cost, solve
from fliqs.searchers.sensitivity import hessian_scores, hutchinson_traces, scores
from fliqs.searchers.space import assignment_cost, build_space
from fliqs.trainables import sensitivity as runner
from fliqs.trainables.fit import RunContext
from fliqs.trainables.fixed import load_saved_state
from fliqs.trainables.plan import build_network, make_plan
from fliqs.trainables.result import RunResult
from fliqs.trainables.search import run_search

pytestmark = pytest.mark.usefixtures("one_thread")


# -- (b) Hutchinson against the exact Hessian ----------------------------------------------------------------------
def _tiny_problem():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    w1, w2 = torch.randn(4, 3) * 1.5, torch.randn(3, 4) * 1.5
    return x, y, w1, w2


def _tiny_loss(x, y, w1, w2):
    return F.cross_entropy(F.softplus(x @ w1.T) @ w2.T, y)


def _exact_blocks(x, y, w1, w2):
    """The full Hessian of the tiny loss over (W1, W2), and the estimator's per-sample standard deviation per block:
    for a joint Rademacher v, Var(v_t . (Hv)_t) = 4 sum_{i<j in t} H_ij^2 + sum_{i in t, j not in t} H_ij^2."""
    n1 = w1.numel()
    flat = torch.cat([w1.reshape(-1), w2.reshape(-1)]).double()
    h = torch.autograd.functional.hessian(
        lambda p: _tiny_loss(x.double(), y, p[:n1].reshape(w1.shape), p[n1:].reshape(w2.shape)), flat)
    blocks = [slice(0, n1), slice(n1, flat.numel())]
    traces, stds = [], []
    for b in blocks:
        inner = h[b, b]
        off = torch.triu(inner, diagonal=1)
        outer = torch.cat([h[b, :b.start], h[b, b.stop:]], dim=1)
        traces.append(float(inner.diagonal().sum()))
        stds.append(float((4 * off.square().sum() + outer.square().sum()).sqrt()))
    return traces, stds


def test_hutchinson_matches_the_exact_hessian_trace_of_each_block():
    """6,000 samples: the estimate's standard error is std / sqrt(6000) (std from the exact Hessian, cross-block terms
    included: the first block's trace is small next to them); 5 standard errors bound a Gaussian mean's error with
    probability 1 - 6e-7 (the seed is fixed), and are below 15 % of each trace."""
    x, y, w1, w2 = _tiny_problem()
    exact, stds = _exact_blocks(x, y, w1, w2)
    p1, p2 = w1.clone().double().requires_grad_(), w2.clone().double().requires_grad_()
    samples = 6000
    estimate = hutchinson_traces(_tiny_loss(x.double(), y, p1, p2), [p1, p2], samples, torch.Generator().manual_seed(1))
    for est, tr, std in zip(estimate.tolist(), exact, stds, strict=True):
        tolerance = 5 * std / samples**0.5
        assert tolerance < 0.15 * abs(tr), "the test must be able to tell a wrong trace"
        assert est == pytest.approx(tr, abs=tolerance)


def test_hessian_scores_use_the_trace_of_each_quantized_layer_weight():
    """Weight-only search on a two-layer QuantLayer model: s_w(l, f) = 1/2 Tr(H_l) / n_l ||Q_f(W_l) - W_l||^2 with the
    exact trace, within 5 standard errors of 2,000 samples."""
    x, y, w1, w2 = _tiny_problem()
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Softplus(), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[2].weight.copy_(w2)
    layers = quantize_model(model)
    space = build_space([q.name for q in layers], ["int2", "int4", "fp32"], weight_only=True)
    exact, stds = _exact_blocks(x, y, w1, w2)
    samples = 2000
    table = hessian_scores(model, layers, space, [(x, y)], samples, torch.Generator().manual_seed(2))
    for layer, row, tr, std in zip(layers, table, exact, stds, strict=True):
        w = layer.layer.weight.detach()
        for fmt, got in zip(("int2", "int4", "fp32"), row, strict=True):
            layer.weight_quant.set_format(fmt)
            err = float((layer.weight_quant(w) - w).double().square().sum())
            layer.weight_quant.set_format("fp32")
            factor = 0.5 / w.numel() * err
            assert got == pytest.approx(factor * tr, abs=factor * 5 * std / samples**0.5 + 1e-15)
        assert row[2] == 0.0 and row[0] > row[1] > 0


# -- (c) costs: linear, exact, never above the target --------------------------------------------------------------
@pytest.mark.parametrize("overrides", [["space=int_fp"], ["space=int_wide", "space.weight_only=true"],
                                       ["space=int_wide", "reward.cost=size"],
                                       ["space=int_wide", "space.shared_wa=false", "reward.cost=size"],
                                       ["space=int_fp", "space.groups={features.3: mid, features.6: mid}",
                                        "quant.pinned={head: int8}"]])
def test_solutions_never_cost_more_than_the_target(overrides):
    cfg = load_config([f"method={SENSITIVITY_METHOD}", *overrides])
    plan = make_plan(cfg)
    net = plan.network
    const, costs = linear_costs(net.space, net.shapes, net.total_params, cfg.reward.cost)
    rng = random.Random(1)
    for _ in range(20):  # the linear costs are the reported cost (fliqs.quant.cost.summarize)
        choices = [rng.randrange(len(d.candidates)) for d in net.space.decisions]
        reported = assignment_cost(net.shapes, net.space.assignment(choices), net.total_params, cfg.reward.cost)
        assert program_cost(costs, choices, const) == pytest.approx(reported, rel=1e-12)
    for _ in range(25):
        target = rng.uniform(plan.cheapest, plan.most_expensive)
        table = [[rng.random() for _ in d.candidates] for d in net.space.decisions]
        choices = solve(table, costs, target, const)
        assert assignment_cost(net.shapes, net.space.assignment(choices), net.total_params,
                               cfg.reward.cost) <= target


def test_bilinear_bops_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="bilinear"):
        load_config([f"method={SENSITIVITY_METHOD}", "space.shared_wa=false"])
    cfg = load_config(["space.shared_wa=false"])  # another method: the program's own check
    net = make_plan(cfg).network
    with pytest.raises(BadInput, match="bilinear"):
        linear_costs(net.space, net.shapes, net.total_params, "bops")
    assert "bilinear" in bad_search_input(tmp_path, f"method={SENSITIVITY_METHOD}", "space.shared_wa=false")


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochs=1", "none is left for the QAT"), ("sensitivity.pretrain_fraction=1.0", "must be in (0, 1)"),
    ("sensitivity.batches=0", "must be in [1, inf)"),
    ("sensitivity.pretrain_format=int7", "sensitivity.pretrain_format"),
    ("sensitivity.score=fisher", "sensitivity.score"), ("sensitivity.qat_epochs=0", "must be in [1, inf)")])
def test_bad_sensitivity_config_is_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config([f"method={SENSITIVITY_METHOD}", override])
    assert message in str(info.value)


def _epochs(cfg) -> tuple[int, int]:
    return cfg.sensitivity.pretrain_epochs, cfg.sensitivity.qat_epochs


def test_epochs_split_within_the_budget():
    """Resolved at load: the pre-training takes its fraction of train.epochs (at least 1), the QAT the rest."""
    assert _epochs(load_config(["train.epochs=10"])) == (5, 5)
    assert _epochs(load_config(["train.epochs=3", "sensitivity.pretrain_fraction=0.3"])) == (1, 2)
    assert _epochs(load_config(["sensitivity.pretrain_epochs=2", "sensitivity.qat_epochs=7"])) == (2, 7)


# -- (d) the scores on a trained network ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_cnn():
    """fliqs_cnn trained at full precision on digits (plain SGD, 60 steps) with an {int2, int8, fp32} space."""
    cfg = load_config([f"method={SENSITIVITY_METHOD}", "space.candidates=[int2,int8,fp32]"])
    splits = load_digits(seed=0)
    net = build_network(cfg, splits.info)
    x, y = splits.train.tensors
    opt = torch.optim.SGD(net.model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    net.model.train()
    for _ in range(60):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = F.cross_entropy(net.model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    return net, data


@pytest.mark.parametrize("kind", ["hessian", "gradient", "kl"])
def test_scores_rank_int2_above_int8_and_fp32_at_zero(trained_cnn, kind):
    net, data = trained_cnn
    before = [(q.w_format.name, q.a_format.name) for q in net.layers]
    table = scores(kind, net.model, net.layers, net.space, data, samples=8)
    assert len(table) == len(net.space.decisions) == 4
    for decision, (int2, int8, fp32) in zip(net.space.decisions, table, strict=True):
        assert int2 > int8 > 0, (kind, decision.name, int2, int8)
        assert fp32 == 0.0
    assert [(q.w_format.name, q.a_format.name) for q in net.layers] == before, "formats restored"
    assert net.model.training, "mode restored"


# -- (e, f) end to end: the record, evaluate, one scoring for two targets -----------------------------------------


def _search(tmp_path: Path, name: str, fraction: float, *overrides: str) -> dict:
    return run_search(load_config([f"output_dir={tmp_path}", f"name={name}", f"method={SENSITIVITY_METHOD}",
                                   f"reward.target_fraction={fraction}", *SENSITIVITY_FAST, *overrides]))


def _children(client: MlflowClient, run_id: str) -> dict:
    exp = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    return {r.info.run_name.rsplit("/", 1)[-1]: r for r in runs}


@pytest.fixture(scope="module")
def two_targets(tmp_path_factory):
    out = tmp_path_factory.mktemp("hawq")
    first = _search(out, "a", 0.45)
    second = _search(out, "b", 0.3)
    return out, first, second


def test_search_records_two_phases_and_evaluate_reproduces_it(two_targets):
    out, result, _ = two_targets
    assert result["gbops"] <= result["target"]
    assert result["epochs"] == 2 and result["family"] == methods.SENSITIVITY
    client = MlflowClient(result["mlflow_tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    phases = _children(client, run.info.run_id)
    assert set(phases) == {"pretrain", "qat"}
    assert {r.data.tags["role"] for r in phases.values()} == {schema.PHASE}
    assert run.data.tags[schema.MODEL_RUN] == phases["qat"].info.run_id
    assert run.data.tags[schema.SCORING_RUN] == phases["pretrain"].info.run_id
    assert phases["pretrain"].data.params["quant.uniform_format"] == "int8"
    assert phases["pretrain"].data.params["train.epochs"] == "1" == phases["qat"].data.params["train.epochs"]
    assert run.data.metrics[schema.SCORING_REUSED] == 0 and run.data.metrics[schema.SHARED_EPOCHS] == 1
    assert run.data.metrics[schema.SOLVE_S] > 0 and run.data.metrics[schema.SCORING_WALL_S] > 0
    scored = json.loads(Path(client.download_artifacts(phases["pretrain"].info.run_id, schema.SCORES_FILE,
                                                       str(out / "s"))).read_text())
    record = json.loads(Path(client.download_artifacts(run.info.run_id, schema.SENSITIVITY_FILE,
                                                       str(out / "r"))).read_text())
    assert record["scores"] == scored["scores"] and record["kind"] == "hessian"
    assert record["cost"] <= record["target"] == pytest.approx(result["target"])
    chosen = {d: record["candidates"][i][c] for i, (d, c) in enumerate(zip(record["decisions"], record["choices"],
                                                                            strict=True))}
    assert chosen == {k: v["w"] for k, v in result["assignment"].items()}
    # the whole cost: pre-training + scoring + QAT, the shared part also apart
    qat = phases["qat"].data.metrics
    assert result["worker_s"] == pytest.approx(run.data.metrics[schema.SHARED_WORKER_S] + qat["worker_s"])
    status, stdout, err = run_cli("evaluate", "a", f"output_dir={out}", "--json")
    assert status == 0, err
    evaluated = json.loads(stdout)
    assert evaluated["model_run_id"] == phases["qat"].info.run_id
    assert evaluated["accuracy"] == result["accuracy"]


def test_a_second_target_reuses_the_scoring(two_targets):
    out, first, second = two_targets
    assert second["gbops"] <= second["target"] < first["target"]
    client = MlflowClient(second["mlflow_tracking_uri"])
    a, b = client.get_run(first["mlflow_run_id"]), client.get_run(second["mlflow_run_id"])
    assert set(_children(client, b.info.run_id)) == {"qat"}, "no second pre-training"
    assert b.data.tags[schema.SCORING_RUN] == a.data.tags[schema.SCORING_RUN]
    assert b.data.metrics[schema.SCORING_REUSED] == 1
    for key in (schema.SHARED_EPOCHS, schema.SHARED_WORKER_S, schema.SCORING_WALL_S):
        assert b.data.metrics[key] == a.data.metrics[key]
    assert second["epochs"] == first["epochs"] == 2  # every target is charged the shared part too
    entries = [p for p in (out / "ray" / runner.CACHE).iterdir() if p.is_dir()]
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {runner.RECORD, runner.PRETRAINED}
    record = json.loads((entries[0] / runner.RECORD).read_text())
    assert record["run_id"] == a.data.tags[schema.SCORING_RUN]
    assert set(load_saved_state(entries[0] / runner.PRETRAINED)) == set(
        build_network(load_config(SENSITIVITY_FAST), load_digits().info).model.state_dict())
    ra = json.loads(Path(client.download_artifacts(a.info.run_id, schema.SENSITIVITY_FILE, str(out / "a"))).read_text())
    rb = json.loads(Path(client.download_artifacts(b.info.run_id, schema.SENSITIVITY_FILE, str(out / "b"))).read_text())
    assert ra["scores"] == rb["scores"] and ra["scoring_key"] == rb["scoring_key"]


def test_the_scoring_key_ignores_targets_and_names_only():
    base = load_config([f"method={SENSITIVITY_METHOD}", "reward.target_fraction=0.3", "name=x"])
    same = load_config([f"method={SENSITIVITY_METHOD}", "reward.target_gbops=0.01", "name=y", "output_dir=/elsewhere",
                        "sensitivity.qat_epochs=3"])
    other = load_config([f"method={SENSITIVITY_METHOD}", "seed=1"])
    assert runner.scoring_key(base) == runner.scoring_key(same) != runner.scoring_key(other)


def test_concurrent_runs_wait_for_one_scoring(tmp_path, monkeypatch):
    """Three runs of one config at once: one pre-trains (slowly), the others wait on the lock and reuse it."""
    calls = []

    def fake_fit_child(run, label, role, method, cfg=None, params=False, **args):
        calls.append(run.run_name)
        time.sleep(0.5)
        return RunResult(0.9, 0.9, 1.0, 1.0, 1.0, 0.1, 10, {}, [], {"epochs": 1, "train_wall_s": 0.5,
                                                                     "worker_s": 0.5, "peak_memory_mb": 1.0},
                         model_run_id=f"phase-{run.run_name}",
                         extras={runner.SCORES_METRIC: json.dumps({"kind": "kl", "decisions": [], "candidates": [],
                                                                   "scores": []}), runner.SCORING_S: 0.1})

    class FakeClient:
        def download_artifacts(self, run_id, path, dst):
            target = Path(dst) / path
            target.write_text(run_id)
            return str(target)

    monkeypatch.setattr(runner, "fit_child", fake_fit_child)
    monkeypatch.setattr(runner, "client", lambda uri: FakeClient())
    cfg = load_config([f"method={SENSITIVITY_METHOD}"])
    plan = make_plan(cfg)
    found = {}

    def trial(i):
        trial_cfg = derive(cfg, {"reward.target_fraction": 0.2 + 0.1 * i})  # as a study sets it
        run = RunContext("sqlite://", "0", f"run{i}", f"run{i}", f"run{i}", tmp_path, plan.derive(trial_cfg))
        found[i] = runner.shared_scoring(trial_cfg, run)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(reused for _, reused in found.values()) == [False, True, True]
    assert {record["run_id"] for record, _ in found.values()} == {f"phase-{calls[0]}"}
