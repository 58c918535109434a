"""The red-team cases (issue 15): every one refused in one line with exit status 2 before any work starts: no
MLflow run left RUNNING, no folder created. In-process through ``fliqs.cli.run`` (the CLI's own error path)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fliqs import cli

TINY = ["train.epochs=1", "train.num_workers=0", "train.log_every=1000"]


def _run(argv, capsys) -> tuple[int, str]:
    rc = cli.run(argv)
    err = capsys.readouterr().err
    return rc, err


def _refused(rc: int, err: str, *expected: str) -> None:
    # MLflow's INFO lines: the real CLI sets MLFLOW_LOGGING_LEVEL=WARNING before importing MLflow; in-process,
    # MLflow was imported by this module first.
    lines = [line for line in err.splitlines() if line.strip() and " INFO mlflow." not in line]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in expected:
        assert word in lines[0], lines[0]


def _running(store: Path) -> list[str]:
    if not store.exists():
        return []
    c = MlflowClient(f"sqlite:///{store}")
    return [r.info.run_name for e in c.search_experiments() for r in c.search_runs([e.experiment_id])
            if r.info.status == "RUNNING"]


CASES = {  # case: (overrides, words the one line must hold)
    "ray_address_pointing_at_nothing": (["ray_address=127.0.0.1:1", "train.num_workers=1"], ["ray_address",
                                                                                             "nothing answers"]),
    "ray_address_garbage": (["ray_address=not an address", "train.num_workers=1"], ["ray_address", "HOST:PORT"]),
    "name_with_a_quote": (["name=x' or tags.role != '"], ["name=", "a name may hold"]),
    "name_with_a_slash": (["name=../../etc"], ["name=", "a name may hold"]),
    "name_dot_dot": (["name=.."], ["a name may hold"]),
    "study_name_with_a_slash": (["study.name=a/b"], ["study.name"]),
    "positive_beta": (["reward.beta=0.5"], ["reward.beta", "rewards cost"]),
    "negative_entropy_max": (["controller.entropy_max=-0.1"], ["controller.entropy_max"]),
    "duplicate_format": (["space.candidates=[int4,int8,int4]"], ["int4", "more than once"]),
    "mnas_with_negative_quality": (["reward.kind=mnas_soft", "reward.quality=neg_train_loss"],
                                   ["mnas_soft", "positive quality"]),
    "val_fraction_zero": (["data.val_fraction=0"], ["data.val_fraction"]),
    "fractions_past_one": (["data.val_fraction=0.6", "data.test_fraction=0.6"], ["data.test_fraction"]),
    "fractions_leave_no_training": (["data.val_fraction=0.45", "data.test_fraction=0.45"], ["training split"]),
    "val_split_smaller_than_the_classes": (["data.val_fraction=0.004"], ["data.val_fraction", "classes"]),
    "unsupported_tracking_scheme": (["tracking.uri=ftp://example.org/store"], ["tracking.uri", "ftp"]),
    "num_classes_below_the_labels": (["model.num_classes=5"], ["model.num_classes", "10 classes"]),
    "nan_learning_rate": (["train.lr=nan"], ["train.lr", "finite"]),
    "negative_seed": (["seed=-1"], ["seed"]),
    "input_size_too_large": (["model.input_size=100000"], ["model.input_size"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_search_refuses_in_one_line(case, tmp_path, capsys):
    overrides, words = CASES[case]
    out = tmp_path / "out"
    start = time.monotonic()
    rc, err = _run(["search", f"output_dir={out}", *TINY, *overrides], capsys)
    _refused(rc, err, *words)
    assert time.monotonic() - start < 30
    assert not out.exists(), "nothing is written before the input is judged"


def test_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    rc, err = _run(["search", f"output_dir={target}", *TINY], capsys)
    _refused(rc, err, "is a file")
    rc, err = _run(["search", f"output_dir={target}/below", *TINY], capsys)
    _refused(rc, err, "is a file")
    assert target.read_text() == "keep me"


def test_output_dir_that_is_not_writable(capsys):
    # /proc refuses new files even to root (a chmod'ed folder would not stop root, which CI may be).
    rc, err = _run(["search", "output_dir=/proc/fliqs-out", *TINY], capsys)
    _refused(rc, err, "not writable")


def test_study_refuses_like_search(tmp_path, capsys):
    rc, err = _run(["study", f"output_dir={tmp_path / 'out'}", "study.seeds=[-3]"], capsys)
    _refused(rc, err, "study.seeds")
    rc, err = _run(["study", f"output_dir={tmp_path / 'out'}", "name=bad/name"], capsys)
    _refused(rc, err, "name=")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("run", ["x' or '1'='1", "../secret", "a/../b", "a//b"])
def test_evaluate_and_export_refuse_hostile_run_names(run, tmp_path, capsys):
    """A run name from the command line goes into an MLflow filter: only the documented set passes."""
    (tmp_path / "mlflow.db").touch()
    for argv in (["evaluate", run, f"output_dir={tmp_path}"],
                 ["export", run, f"output_dir={tmp_path}", "--to", str(tmp_path / "x")]):
        rc, err = _run(argv, capsys)
        _refused(rc, err, "run ")
    assert not (tmp_path / "x").exists()


def test_pareto_refuses_a_parent_that_is_not_a_run_id(capsys):
    rc, err = _run(["pareto", "--experiment", "fliqs", "--tracking-uri", "sqlite:////tmp/none.db",
                    "--parent", "x' or '1'='1"], capsys)
    _refused(rc, err, "--parent")


def test_a_changed_configuration_does_not_resume_silently(tmp_path, capsys):
    """A rerun of a name compares the stored configuration: a changed learning rate or space is refused naming the
    keys (nothing logged to the run); ``allow_resume_changes=true`` resumes and records what differed."""
    out, store = tmp_path / "out", tmp_path / "out" / "mlflow.db"
    base = ["search", f"output_dir={out}", "name=same", "train.epochs=3", "train.num_workers=0",
            "train.checkpoint_every=5", "train.log_every=5"]
    from fliqs.run.config import to_flat_dict
    from fliqs.run.loading import load_config
    from fliqs.run.tracking import client, open_experiment, start_run, tracking_uri

    # The run as a first attempt left it: created with train.lr=0.05, then died.
    cfg = load_config(base[1:] + ["train.lr=0.05"])
    uri = tracking_uri(None, str(out))
    exp = open_experiment(uri, cfg.tracking, out)
    run_id, _ = start_run(uri, exp, "same", to_flat_dict(cfg), {})
    client(uri).set_terminated(run_id, "FAILED")  # as a run that died
    params_before = client(uri).get_run(run_id).data.params

    rc, err = _run([*base, "train.lr=0.1"], capsys)
    _refused(rc, err, "train.lr: 0.05 -> 0.1", "allow_resume_changes=true")
    rc, err = _run([*base, "train.lr=0.05", "space=int"], capsys)
    _refused(rc, err, "space.")
    assert client(uri).get_run(run_id).data.params == params_before
    assert client(uri).get_run(run_id).info.status == "FAILED" and not _running(store)

    rc, err = _run([*base, "train.lr=0.1", "allow_resume_changes=true"], capsys)
    assert rc == 0, err
    run = client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "train.lr: 0.05 -> 0.1" in run.data.tags["fliqs.resumed_with_changes"]


def test_a_resume_may_change_only_where_and_how_often_it_logs():
    """The resume-free keys (`fliqs.run.config.RESUME_FREE_KEYS`): output and services, logging, retries, a study's
    grid; anything else is a change."""
    from fliqs.run.tracking import changed_params

    stored = {"train.lr": "0.05", "train.log_every": "5", "output_dir": "/a", "tracking.uri": "None",
              "study.seeds": "[0]", "space.candidates": "['int4', 'int8']"}
    same = {"train.lr": 0.05, "train.log_every": 7, "output_dir": "/b", "tracking.uri": "http://h:5000",
            "study.seeds": [0, 1], "space.candidates": ["int4", "int8"]}
    assert changed_params(stored, same) == []
    assert changed_params(stored, {**same, "train.lr": 0.1, "space.candidates": ["int4"]}) == ["space.candidates",
                                                                                                "train.lr"]
    assert changed_params(stored, {**same, "train.momentum": 0.5}) == ["train.momentum"]  # a key the run lacked


def test_a_checkpoint_of_another_space_is_one_line(tmp_path):
    """With allow_resume_changes=true and a changed space the checkpoint cannot load: one line, not a state_dict
    traceback."""
    from fliqs.errors import BadInput
    from fliqs.run.loading import load_config
    from fliqs.trainables.search import run_search

    out = tmp_path / "out"
    common = [f"output_dir={out}", "name=space", "train.epochs=2", "train.num_workers=0", "train.checkpoint_every=5",
              "train.log_every=50"]
    run_search(load_config([*common, "space=int"]))
    (out / "space" / "result.json").unlink()  # as if it had died after its last checkpoint
    with pytest.raises(BadInput, match="does not fit this configuration"):
        run_search(load_config([*common, "space=int_fp", "allow_resume_changes=true"]))
    store = out / "mlflow.db"
    assert not _running(store)


class _Payload:
    """Unpickling this calls ``Path.touch`` on a marker: what a hostile data folder could make a loader run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_cifar10_batch_runs_no_code(tmp_path):
    """CIFAR-10's python batches are pickles: only their arrays may be unpickled (SECURITY.md)."""
    import pickle

    from helpers import write_tiny_cifar10

    from fliqs.data.datasets import DataError, load_data

    root = write_tiny_cifar10(tmp_path / "cifar", per_batch=4)
    load_data("cifar10", path=str(root))  # the genuine format loads
    marker = tmp_path / "ran"
    batch = Path(root) / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}))
    with pytest.raises(DataError, match="not allowed"):
        load_data("cifar10", path=str(root))
    assert not marker.exists()
