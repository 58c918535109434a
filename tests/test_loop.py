"""The shared training loop, run in-process (`run_in_process`, no Ray): accounting, checkpoints, resume,
gradient clipping, and refusing corrupt or foreign checkpoints. A real MLflow SQLite store records the run."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fliqs.config import load_config
from fliqs.tracking import get_or_create_experiment, start_run
from fliqs.trainables.differentiable import DifferentiableRun
from fliqs.trainables.fixed import FixedRun
from fliqs.trainables.loop import CHECKPOINT_FILE, CheckpointError, LocalSession, run_in_process, use_compile

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, *overrides, **extra):
    cfg = load_config([f"output_dir={tmp_path}", "train.epochs=1", "train.log_every=5", *overrides])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = get_or_create_experiment(uri, "loop", (tmp_path / "art").as_uri())
    run_id, _ = start_run(uri, exp, f"run-{len(list(tmp_path.iterdir()))}", {}, {})
    return {"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "run_id": run_id,
            "tracking_uri": uri, "target": 0.03, **extra}


def test_fixed_run_accounts_checkpoints_and_resumes(tmp_path):
    config = _config(tmp_path, "train.checkpoint_every=5", uniform="int8")
    root = tmp_path / "ckpt"
    metrics = run_in_process(FixedRun, config, root)
    for key in ("test_accuracy", "gbops", "size_mb", "epochs", "train_wall_s", "worker_s", "peak_memory_mb"):
        assert key in metrics
    assert metrics["epochs"] == 1 and metrics["worker_s"] == pytest.approx(metrics["train_wall_s"])
    assert 0.3 < metrics["test_accuracy"] <= 1.0 and 0.3 < metrics["validation_accuracy"] <= 1.0
    names = sorted(p.name for p in root.glob("checkpoint_*"))
    assert names[-1] == "checkpoint_final" and len(names) == 2  # two kept, as CheckpointConfig(num_to_keep=2)
    # A rerun restores the final state and trains nothing more: the same weights give the same accuracy.
    again = run_in_process(FixedRun, config, root)
    assert again["test_accuracy"] == metrics["test_accuracy"]
    history = MlflowClient(config["tracking_uri"]).get_metric_history(config["run_id"], "train_loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 19]  # the rerun logged nothing again


def test_gradient_norm_is_clipped_before_every_step(tmp_path):
    run = FixedRun(_config(tmp_path, "train.grad_clip=0.5", uniform="int2"), LocalSession(tmp_path / "c"))
    params = [p for p in run.model.parameters()]
    for p in params:
        p.grad = torch.full_like(p, 1e3)
    run.optimizer.step()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert norm == pytest.approx(0.5, rel=1e-4)


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    config = _config(tmp_path, uniform="int8")
    bad = tmp_path / "bad" / "checkpoint_0000005"
    bad.mkdir(parents=True)
    (bad / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a fliqs checkpoint"):
        FixedRun(config, LocalSession(tmp_path / "bad"))
    root = tmp_path / "fixed"
    run_in_process(FixedRun, config, root)
    with pytest.raises(CheckpointError, match="edmips checkpoint"):
        DifferentiableRun({**config, "method": "edmips"}, LocalSession(root))
    other = _config(tmp_path, uniform="int8")
    with pytest.raises(CheckpointError, match="belongs to MLflow run"):
        FixedRun(other, LocalSession(root))


def test_compile_is_off_on_cpus_unless_asked(tmp_path):
    """``train.compile``: None compiles on GPUs only; true compiles here too (lazily: nothing is traced until a
    step runs, so this stays fast). The checkpointed model is the plain module either way."""
    assert use_compile(None, torch.device("cuda")) and not use_compile(None, torch.device("cpu"))
    assert not use_compile(False, torch.device("cuda"))
    assert not use_compile(None, torch.device("cuda"), searches_architecture=True)  # a graph per architecture
    assert use_compile(True, torch.device("cpu"), searches_architecture=True)
    run = FixedRun(_config(tmp_path, uniform="int8"), LocalSession(tmp_path / "a"))
    assert not run.compiled and run.train_model is run.model
    run = FixedRun(_config(tmp_path, "train.compile=true", uniform="int8"), LocalSession(tmp_path / "b"))
    assert run.compiled and isinstance(run.train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert run.train_model._orig_mod is run.model
    assert not any("_orig_mod" in key for key in run._state()["model"])


def test_fliqnas_run_resumes_after_extraction(tmp_path):
    """The final checkpoint of a joint search is written after the supernet became a standalone network: it must
    still hold the supernet, so that a rerun restores it and extracts the same network again."""
    from fliqs.trainables.fliqnas import FliqnasRun

    config = _config(tmp_path, "method=fliqnas", "model=fliqnas_digits", "space=int_fp_4to8", "data.batch_size=128",
                     "data.val_fraction=0.3", "data.test_fraction=0.35", "train.checkpoint_every=2",
                     "train.bn_recalibration_batches=2")
    root = tmp_path / "nas"
    metrics = run_in_process(FliqnasRun, config, root)
    assert "checkpoint_final" in {p.name for p in root.iterdir()}
    client = MlflowClient(config["tracking_uri"])
    logged = len(client.get_metric_history(config["run_id"], "train_loss"))
    again = run_in_process(FliqnasRun, config, root)
    assert len(client.get_metric_history(config["run_id"], "train_loss")) == logged  # nothing retrained
    assert again["architecture"] == metrics["architecture"] and again["gbops"] == metrics["gbops"]
    assert again["test_accuracy"] == metrics["test_accuracy"]


def test_state_digest_covers_scalars_and_changes_with_any_value():
    """Adam keeps its step count as a 0-dim tensor: the digest of a controller after a step must work and see it."""
    from fliqs.trainables.loop import state_digest

    state = {"step": torch.tensor(3.0), "w": torch.ones(2, 2), "n": 1}
    assert state_digest(state) == state_digest({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    assert state_digest(state) != state_digest({**state, "step": torch.tensor(4.0)})
    assert state_digest(state) != state_digest({**state, "w": torch.ones(2, 2).double()})
