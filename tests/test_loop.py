"""The shared training loop, run in-process (`run_in_process`, no Ray): accounting, checkpoints, resume,
gradient clipping, seeds, and refusing corrupt or foreign checkpoints. A real MLflow SQLite store records the run."""

from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from fliqs.run.loading import load_config
from fliqs.run.tracking import get_or_create_experiment, start_run
from fliqs.searchers import methods
from fliqs.trainables.checkpoints import CHECKPOINT_FILE, CheckpointError, LocalSession, load_checkpoint, state_digest
from fliqs.trainables.loop import run_in_process
from fliqs.trainables.parallel import clip_gradients, training_model, use_compile
from fliqs.trainables.worker import WorkerJob, derived_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, *overrides, worker=None, **args) -> WorkerJob:
    cfg = load_config([f"output_dir={tmp_path}", "train.epochs=1", "train.log_every=5", *overrides])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = get_or_create_experiment(uri, "loop", (tmp_path / "art").as_uri())
    run_id, _ = start_run(uri, exp, f"run-{len(list(tmp_path.iterdir()))}", {}, {})
    return WorkerJob(cfg, worker or methods.get(cfg.method).worker, run_id, uri, 0.03, args)


def test_fixed_run_accounts_checkpoints_and_resumes(tmp_path):
    config = _config(tmp_path, "method=uniform", "quant.uniform_format=int8", "train.checkpoint_every=5")
    root = tmp_path / "ckpt"
    metrics = run_in_process(config, root)
    for key in ("test_accuracy", "gbops", "size_mb", "epochs", "train_wall_s", "worker_s", "peak_memory_mb"):
        assert key in metrics
    assert metrics["epochs"] == 1 and metrics["worker_s"] == pytest.approx(metrics["train_wall_s"])
    assert 0.3 < metrics["test_accuracy"] <= 1.0 and 0.3 < metrics["validation_accuracy"] <= 1.0
    names = sorted(p.name for p in root.glob("checkpoint_*"))
    assert names[-1] == "checkpoint_final" and len(names) == 2  # two kept, as CheckpointConfig(num_to_keep=2)
    # The final checkpoint holds the evaluated model, its assignment and the reported numbers.
    saved = load_checkpoint(root / "checkpoint_final")["result"]
    assert saved["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert {v["w"] for v in saved["assignment"].values()} == {"int8"}
    # A rerun restores the final state and trains nothing more: the same weights give the same accuracy.
    again = run_in_process(config, root)
    assert again["test_accuracy"] == metrics["test_accuracy"]
    history = MlflowClient(config.tracking_uri).get_metric_history(config.run_id, "train_loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 19]  # the rerun logged nothing again


def test_candidate_choices_train_that_assignment(tmp_path):
    cfg = load_config()
    choices = [0, 3, 8, 1]  # int2, int8, fp8_e5m2, int3 on the four layers of fliqs_cnn
    config = _config(tmp_path, "method=random", worker=methods.FIXED_QAT, choices=choices)
    metrics = run_in_process(config, tmp_path / "c")
    chosen = [cfg.space.candidates[c] for c in choices]
    assert [v["w"] for v in json.loads(metrics["assignment"]).values()] == chosen


def test_gradient_norm_is_clipped_before_every_step():
    params = [torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(5))]
    optimizer = torch.optim.SGD(params, lr=0.0)
    clip_gradients(optimizer, 0.5)
    for p in params:
        p.grad = torch.full_like(p, 1e3)
    optimizer.step()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert norm == pytest.approx(0.5, rel=1e-4)
    unclipped = [torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.SGD(unclipped, lr=0.0)
    clip_gradients(optimizer, None)  # off: gradients untouched
    unclipped[0].grad = torch.full((2,), 1e3)
    optimizer.step()
    assert torch.equal(unclipped[0].grad, torch.full((2,), 1e3))


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    config = _config(tmp_path, "method=uniform", "quant.uniform_format=int8")
    bad = tmp_path / "bad" / "checkpoint_0000005"
    bad.mkdir(parents=True)
    (bad / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a fliqs checkpoint"):
        run_in_process(config, tmp_path / "bad")
    root = tmp_path / "fixed"
    run_in_process(config, root)
    edmips = _config(tmp_path, "method=edmips")
    with pytest.raises(CheckpointError, match="is a uniform checkpoint .* not edmips"):
        run_in_process(dataclasses.replace(edmips, run_id=config.run_id), root)
    other = _config(tmp_path, "method=uniform", "quant.uniform_format=int8")
    with pytest.raises(CheckpointError, match="belongs to MLflow run"):
        run_in_process(other, root)


def test_compile_is_off_on_cpus_unless_asked():
    """``train.compile``: None compiles on GPUs only, never for an architecture search unless asked."""
    assert use_compile(None, torch.device("cuda")) and not use_compile(None, torch.device("cpu"))
    assert not use_compile(False, torch.device("cuda"))
    assert not use_compile(None, torch.device("cuda"), searches_architecture=True)  # a graph per architecture
    assert use_compile(True, torch.device("cpu"), searches_architecture=True)


def test_compiled_training_model_wraps_the_plain_module():
    """With ``train.compile=true`` the step runs a compiled wrapper of the module (lazily: nothing is traced until a
    step runs, so this stays fast); the checkpoint is taken from the module itself, so no ``_orig_mod`` keys."""
    model = torch.nn.Linear(3, 2)
    ctx = SimpleNamespace(world=1, device=torch.device("cpu"), cfg=SimpleNamespace(train=SimpleNamespace(compile=True)))
    wrapped = training_model(model, ctx, searches_architecture=False)
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and wrapped._orig_mod is model
    ctx.cfg.train.compile = None
    assert training_model(model, ctx, searches_architecture=False) is model


def test_fliqnas_run_resumes_after_extraction(tmp_path):
    """The final checkpoint of a joint search is written after the supernet became a standalone network: it must
    still hold the supernet, so that a rerun restores it and extracts the same network again."""
    config = _config(tmp_path, "method=fliqnas", "model=fliqnas_digits", "space=int_fp_4to8", "data.batch_size=128",
                     "data.val_fraction=0.3", "data.test_fraction=0.35", "train.checkpoint_every=2",
                     "train.bn_recalibration_batches=2")
    root = tmp_path / "nas"
    metrics = run_in_process(config, root)
    assert "checkpoint_final" in {p.name for p in root.iterdir()}
    client = MlflowClient(config.tracking_uri)
    logged = len(client.get_metric_history(config.run_id, "train_loss"))
    again = run_in_process(config, root)
    assert len(client.get_metric_history(config.run_id, "train_loss")) == logged  # nothing retrained
    assert again["architecture"] == metrics["architecture"] and again["gbops"] == metrics["gbops"]
    assert again["test_accuracy"] == metrics["test_accuracy"]


def test_state_digest_covers_scalars_and_changes_with_any_value():
    """Adam keeps its step count as a 0-dim tensor: the digest of a controller after a step must work and see it."""
    state = {"step": torch.tensor(3.0), "w": torch.ones(2, 2), "n": 1}
    assert state_digest(state) == state_digest({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    assert state_digest(state) != state_digest({**state, "step": torch.tensor(4.0)})
    assert state_digest(state) != state_digest({**state, "w": torch.ones(2, 2).double()})


def test_derived_seeds_do_not_collide_across_ranks_and_steps():
    """The old ``seed + 1000 * rank + step`` gave rank 1 at step 0 rank 0's stream at step 1000."""
    assert derived_seed(0, 1, 0) != derived_seed(0, 0, 1000)
    seeds = {derived_seed(s, r, t) for s in range(3) for r in range(4) for t in (0, 1, 50, 1000, 1001)}
    assert len(seeds) == 3 * 4 * 5
    assert derived_seed(0, 1, 0) == derived_seed(0, 1, 0) and 0 <= derived_seed(-1, 2**70) < 2**63


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A stop signal while an in-process run copies its checkpoint (a KeyboardInterrupt from the copy) leaves no
    partial ``checkpoint_*`` folder: a rerun resumes from the last complete one."""
    import shutil

    session = LocalSession(tmp_path / "run")
    state = tmp_path / "state"
    state.mkdir()
    (state / CHECKPOINT_FILE).write_bytes(b"step 10")
    session.report({"step": 10}, str(state), "checkpoint_0000010")

    real_copytree = shutil.copytree

    def copy_then_stop(src, dst, **kwargs):
        shutil.copy2(src, dst, **kwargs)  # the file lands, then the signal arrives before the copy returns
        raise KeyboardInterrupt

    def interrupted(src, dst, **kwargs):
        return real_copytree(src, dst, copy_function=copy_then_stop, **kwargs)

    monkeypatch.setattr(shutil, "copytree", interrupted)
    (state / CHECKPOINT_FILE).write_bytes(b"step 20")
    with pytest.raises(KeyboardInterrupt):
        session.report({"step": 20}, str(state), "checkpoint_0000020")
    monkeypatch.undo()

    assert [p.name for p in (tmp_path / "run").glob("checkpoint_*")] == ["checkpoint_0000010"]
    with session.latest_checkpoint() as found:
        assert (tmp_path / "run" / "checkpoint_0000010" / CHECKPOINT_FILE).read_bytes() == b"step 10"
        assert found.endswith("checkpoint_0000010")
    # The next complete write (here of another step) clears the leftover of the interrupted one.
    session.report({"step": 30}, str(state), "checkpoint_0000030")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_0000010", "checkpoint_0000030"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the resident peak needs Linux")
def test_a_fit_reports_its_own_peak_memory_not_the_processes(tmp_path):
    """A process that held more before the fit (a reused Ray Tune actor's previous trial, an earlier search phase)
    still reports the fit's own peak resident set."""
    held = torch.ones(50_000_000, dtype=torch.float64)  # 381 MiB, every page written
    del held
    lifetime_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = run_in_process(_config(tmp_path, "method=uniform", "quant.uniform_format=int8"), tmp_path / "ckpt")
    assert 0 < metrics["peak_memory_mb"] < lifetime_mb - 250, (metrics["peak_memory_mb"], lifetime_mb)
