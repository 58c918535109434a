"""`fliqs search` end to end, in-process (``train.num_workers=0``: no Ray needed) on real digits and a real MLflow
SQLite store: the result and the MLflow record, resumes refused or diverging runs in one line, and bad input.

Multi-worker runs (identical controllers across replicas, resume after a killed worker) are in test_multinode.py,
a killed study driver in test_study_e2e.py; the process boundary (exit status, stderr) in test_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import bad_search_input, run_cli
from mlflow.tracking import MlflowClient

from fliqs.run.loading import load_config
from fliqs.trainables.search import run_search

pytestmark = pytest.mark.usefixtures("one_thread")


def _search(tmp_path: Path, name: str, *overrides: str) -> dict:
    cfg = load_config([f"output_dir={tmp_path}", f"name={name}", "reward.target_fraction=0.4",
                       "reward.beta=-0.5", "train.log_every=5", *overrides])
    return run_search(cfg)


def _metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_in_process_search_records_everything(tmp_path):
    result = _search(tmp_path, "inproc", "train.epochs=3", "train.num_workers=0", "train.finetune_epochs=1")
    on_disk = json.loads(Path(result["result_path"]).read_text())
    for key in ("accuracy", "gbops", "size_mb", "assignment", "mlflow_run_id", "wall_s"):
        assert key in on_disk
    assert 0.2 < on_disk["accuracy"] <= 1.0  # trained, not chance (0.1)
    assert 0.2 < on_disk["accuracy_finetuned"] <= 1.0  # reported apart from the no-retraining accuracy
    assert set(on_disk["assignment"]) == {"features.0", "features.3", "features.6", "head"}
    candidates = set(load_config().space.candidates)
    assert all(v["w"] in candidates and v["a"] == v["w"] for v in on_disk["assignment"].values())

    client = MlflowClient(result["mlflow_tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "fliqs"
    assert run.data.tags["search_space"] == "int_fp"
    assert run.data.tags["model"] == "fliqs_cnn" and run.data.tags["dataset"] == "digits"
    assert run.data.params["train.epochs"] == "3"
    for key in ("train_loss", "val_accuracy", "reward", "baseline", "policy_entropy", "expected_gbops",
                "sampled_gbops", "test_accuracy", "gbops", "size_mb", "search_wall_s"):
        assert key in run.data.metrics, key
    assert run.data.metrics["test_accuracy"] == pytest.approx(on_disk["accuracy"])
    assert run.data.metrics["test_accuracy_finetuned"] == pytest.approx(on_disk["accuracy_finetuned"])
    steps = _metric_steps(client, run.info.run_id, "train_loss")
    total = result["steps"]
    assert steps == sorted(set(list(range(5, total + 1, 5)) + [total]))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"assignment.json", "policy_history.json", "policy_probs.png", "result.json"} <= artifacts
    # The review path: MLflow opens the experiment as a model-training one; the run's page shows the result.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Model training" in experiment.tags["mlflow.note.content"]
    note = run.data.tags["mlflow.note.content"]
    assert f"{on_disk['accuracy']:.4f}" in note and "| features.0 |" in note and "fliqs export inproc" in note
    png = Path(client.download_artifacts(run.info.run_id, "policy_probs.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_checkpoint_is_refused_in_one_line(tmp_path):
    ckpt = tmp_path / "ray" / "broken" / "checkpoint_0000010"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"\x00garbage")
    status, _, err = run_cli("search", f"output_dir={tmp_path}", "name=broken", "train.num_workers=0")
    assert status == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "checkpoint_0000010 is corrupt or not a fliqs checkpoint" in last, last
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0", "1"])
    assert [r.info.status for r in runs] == ["FAILED"], "the run is closed, not left RUNNING"


def test_finished_run_name_is_refused(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "result.json").write_text("{}")
    status, _, err = run_cli("search", f"output_dir={tmp_path}", "name=done")
    assert status == 2
    assert "already finished" in err.strip().splitlines()[-1]


def test_diverging_search_stops_with_one_line_naming_the_step(tmp_path):
    status, _, err = run_cli("search", f"output_dir={tmp_path}", "name=nan", "train.lr=1e30", "train.epochs=2",
                             "train.checkpoint_every=1", "train.num_workers=0")
    assert status == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "non-finite training loss at step" in last and "last good checkpoint" in last, last
    step = int(last.split("at step ")[1].split(";")[0])
    if step > 0:  # the checkpoint before the divergence is kept and named
        assert "checkpoint_" in last
        assert Path(last.rsplit(": ", 1)[1]).is_dir()


@pytest.mark.parametrize("override, message", [
    ("reward.target_gbops=1e-9", "outside what the space can reach"),
    ("reward.target_fraction=50", "outside what the space can reach"),
    ("train.epochz=3", "Did you mean"),
    ("space=nope", "unknown search space"),
    ("model.name=resnet1", "unknown model"),
    ("model.name=fliqs_cn", "did you mean: fliqs_cnn"),  # fliqs' own names are suggested too
    ("data.name=cifar10", "data.path"),
    ("data.name=cifar10 data.path=/nonexistent/cifar", "/nonexistent/cifar' does not exist"),
    ("train.epochs=abc", "could not be converted to Integer"),
    ("space.candidates=[int4,int5]", "unknown format 'int5'"),
])
def test_bad_input_exits_2_before_any_work(tmp_path, override, message):
    assert message in bad_search_input(tmp_path, *override.split())


def test_a_search_lands_within_its_budget_and_reports_the_argmax_beside_it(tmp_path):
    """The result is the most probable assignment within the target; the policy's argmax, over it here (the paper's
    controller with a reward that ignores cost, from the uniform policy that expects 5 x the target), is evaluated
    beside it and named by the console. With ``budget.extraction=argmax`` the result is that argmax, and the console
    says how far over the target it is and which option to use."""
    from fliqs.trainables.search import budget_lines

    paper = ("train.epochs=3", "reward.target_fraction=0.2", "budget.tracking=reward", "reward.beta=0")
    within = _search(tmp_path, "within", *paper)
    assert within["gbops"] <= within["target"] and within["extracted_within_budget"] == 1.0
    assert within["argmax_cost_ratio"] > 1.0
    assert within["argmax_gbops"] == pytest.approx(within["argmax_cost_ratio"] * within["target"], rel=1e-9)
    assert 0.0 < within["argmax_test_accuracy"] <= 1.0
    lines = budget_lines(within)
    assert len(lines) == 1 and "the policy's argmax" in lines[0] and f"{within['argmax_cost_ratio']:.2f} x" in lines[0]
    client = MlflowClient(within["mlflow_tracking_uri"])
    run = client.get_run(within["mlflow_run_id"])
    for key in ("argmax_test_accuracy", "argmax_gbops", "argmax_cost_ratio", "extracted_within_budget"):
        assert key in run.data.metrics, key
    # The argmax left, the 4 most probable assignments within the target were validated with the shared weights; the
    # most accurate is the result, and the result's own evaluation (the same protocol) reproduces its accuracy.
    assert within["extraction_candidates"] == 4 and "4 most probable" in lines[0]
    path = client.download_artifacts(within["mlflow_run_id"], "extraction.json", str(tmp_path / "x"))
    validated = json.loads(Path(path).read_text())["candidates"]
    assert all(c["cost"] <= within["target"] for c in validated)
    assert [c["log_prob"] for c in validated] == sorted((c["log_prob"] for c in validated), reverse=True)
    (chosen,) = [c for c in validated if c.get("chosen")]
    assert chosen["validation_accuracy"] == max(c["validation_accuracy"] for c in validated)
    assert chosen["assignment"] == within["assignment"]
    assert run.data.metrics["validation_accuracy"] == pytest.approx(chosen["validation_accuracy"], abs=1e-12)
    argmax = _search(tmp_path, "argmax", *paper, "budget.extraction=argmax")
    assert argmax["gbops"] == pytest.approx(within["argmax_gbops"], rel=1e-9)  # the same policy, its argmax
    (line,) = budget_lines(argmax)
    assert line.startswith(f"over its target by {argmax['gbops'] / argmax['target'] - 1:.1%}")
    assert "budget.extraction=within" in line


def test_multi_trial_candidates_are_proposed_and_picked_within_the_budget(tmp_path, capfd):
    """With proposals within the budget every trained candidate fits and the result is the most accurate of them on
    validation; without, at a target few random assignments meet, the cheapest is the result and the console says
    that none fitted."""
    common = ("method=random", "train.epochs=3", "multi_trial.trial_epochs=1", "multi_trial.retrain_epochs=0",
              "data.batch_size=256")
    result = _search(tmp_path, "proposed", *common, "reward.target_fraction=0.1")
    client = MlflowClient(result["mlflow_tracking_uri"])
    path = client.download_artifacts(result["mlflow_run_id"], "candidates.json", str(tmp_path / "c1"))
    candidates = json.loads(Path(path).read_text())
    assert len(candidates) == 3 and all(c["within_budget"] and c["gbops"] <= result["target"] for c in candidates)
    assert sum(c["rejected_before"] for c in candidates) > 0  # uniform proposals mostly cost more than 0.1 x int8
    (picked,) = [c for c in candidates if c.get("picked")]
    assert picked["validation_accuracy"] == max(c["validation_accuracy"] for c in candidates)
    assert result["gbops"] == picked["gbops"]
    capfd.readouterr()
    result = _search(tmp_path, "unproposed", *common, "budget.proposals=false", "reward.target_fraction=0.065")
    path = client.download_artifacts(result["mlflow_run_id"], "candidates.json", str(tmp_path / "c2"))
    candidates = json.loads(Path(path).read_text())
    assert not any(c["within_budget"] for c in candidates)
    assert result["gbops"] == min(c["gbops"] for c in candidates) > result["target"]
    assert "none of the 3 candidates is within the target" in capfd.readouterr().out


def test_different_targets_reach_the_rewards_of_a_search(tmp_path):
    """A study's targets are its searches' targets: at 0.18 and 0.22 x uniform int8 the same seed samples the same
    first assignments with the same weights, so the rewards of those steps differ by the cost term alone; a
    multi-trial search's candidates are the same and their rewards (what selects the result) differ."""
    client = None
    rewards, candidates = {}, {}
    for fraction in (0.18, 0.22):
        result = _search(tmp_path, f"t{fraction}", "train.epochs=1", "train.log_every=1", "data.batch_size=256",
                         f"reward.target_fraction={fraction}")
        client = MlflowClient(result["mlflow_tracking_uri"])
        history = sorted(client.get_metric_history(result["mlflow_run_id"], "reward"), key=lambda m: m.step)
        rewards[fraction] = [m.value for m in history]
        assert result["target"] == pytest.approx(fraction * 0.05784, rel=1e-3)
        multi = _search(tmp_path, f"r{fraction}", "method=random", "train.epochs=2", "multi_trial.trial_epochs=1",
                        "data.batch_size=256", "budget.proposals=false",  # proposals within budget differ by target
                        f"reward.target_fraction={fraction}")
        path = client.download_artifacts(multi["mlflow_run_id"], "candidates.json", str(tmp_path / f"c{fraction}"))
        candidates[fraction] = json.loads(Path(path).read_text())
    first = [rewards[f][0] for f in (0.18, 0.22)]
    assert first[0] != first[1], "the target must enter the reward"
    a, b = candidates[0.18], candidates[0.22]
    assert [c["choices"] for c in a] == [c["choices"] for c in b]  # the same seed proposes the same candidates
    assert [c["reward"] for c in a] != [c["reward"] for c in b]


@pytest.mark.parametrize("method, search_epochs", [("random", 2), ("dnas", 3)])
def test_baselines_retrain_what_they_found_and_count_it(tmp_path, method, search_epochs):
    """Their protocols: multi-trial candidates, or a DNAS search (warm-up, 80/20 split), then the found assignment
    trained from scratch to the full schedule; the report is the retrained model (`fliqs evaluate` rebuilds it), the
    search's own result is kept apart, and the budget counts both."""
    result = _search(tmp_path, method, f"method={method}", "train.epochs=3", "multi_trial.trial_epochs=1",
                     "relaxed.arch_warmup_epochs=1", "data.batch_size=128", "multi_trial.budget=0.67")
    assert result["epochs"] == search_epochs + 3
    assert 0.0 < result["accuracy_before_retraining"] <= 1.0
    client = MlflowClient(result["mlflow_tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    retrained = next(c for c in children if c.info.run_name.endswith("/retrain"))
    assert run.data.tags["fliqs.model_run"] == retrained.info.run_id
    assert retrained.data.params["train.epochs"] == "3"
    assert {c.data.tags["role"] for c in children} == ({"candidate", "phase"} if method == "random" else {"phase"})
    assert json.loads(json.dumps(result["assignment"])) == json.loads(
        Path(client.download_artifacts(retrained.info.run_id, "assignment.json", str(tmp_path / "a"))).read_text()
    )["assignment"]
    status, out, err = run_cli("evaluate", method, f"output_dir={tmp_path}", "--json")
    assert status == 0, err
    assert json.loads(out)["accuracy"] == result["accuracy"]
