"""Checkpoints and the sessions that keep them: Ray Train's (a worker of a TorchTrainer) or this process's
(``train.num_workers=0``), with the same folder names, so that a rerun of the same name resumes the same way.

A checkpoint is a ``torch.save`` of plain data and tensors (`checkpoint_state`), loaded with ``weights_only=True``
and checked against the run that would resume from it (`restore`); the evaluated model is saved apart as the run's
``model.pt`` artifact (`save_model`, `MODEL_FORMAT`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from fliqs.errors import BadInput
from fliqs.run import schema
from fliqs.run.tracking import RunLogger
from fliqs.trainables.worker import TrainMethod, WorkerJob

CHECKPOINT_FORMAT = "fliqs-run/2"
MODEL_FORMAT = "fliqs-model/1"  # the evaluated model: config, state, assignment, reported metrics
CHECKPOINT_FILE = "state.pt"
FINAL_CHECKPOINT = "checkpoint_final"
KEEP_CHECKPOINTS = 2  # the newest checkpoints kept, by Ray Train's CheckpointConfig and by the in-process session


class CheckpointError(BadInput):
    """A corrupt or foreign checkpoint where a run would resume: the user must move it or pick another name."""


def save_model(saved: dict, logger: RunLogger) -> None:
    """The evaluated model as the run's ``model.pt`` artifact (`fliqs.trainables.saved` rebuilds it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / schema.MODEL_FILE
        torch.save(saved, path)
        logger.artifact(path)


def state_digest(obj) -> str:
    """sha256 of a (nested) state: dict keys in order, tensors by dtype, shape and bytes. Equal digests mean
    bit-identical states (used to check that a resume restored exactly what was checkpointed)."""
    digest = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                digest.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            # reshape(-1): a 0-dim tensor (Adam's step count) cannot be viewed as bytes directly.
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(repr(x).encode())

    walk(obj)
    return digest.hexdigest()


def _identity(job: WorkerJob) -> dict:
    """What a checkpoint must match to be resumed by this run: the method's class, the method and the MLflow run."""
    return {"worker": job.method, "method": job.cfg.method, "mlflow_run_id": job.run_id}


def checkpoint_state(job: WorkerJob, step: int, model: nn.Module, optimizer, scheduler, method: TrainMethod) -> dict:
    return {"format": CHECKPOINT_FORMAT, **_identity(job), "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "method_state": method.state_dict()}


def report(session: RaySession | LocalSession, metrics: dict, name: str, state: dict) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint holding ``state``."""
    if session.rank != 0:
        session.report(metrics, None, name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        session.report(metrics, tmp, name)


def load_checkpoint(folder: str | Path) -> dict:
    """A fliqs checkpoint's state (``weights_only``: tensors and plain data, no code); CheckpointError otherwise."""
    try:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is a corrupt or foreign checkpoint
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {folder} is corrupt or not a fliqs checkpoint: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {folder} is not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def restore(session, job: WorkerJob, model: nn.Module, optimizer, scheduler, method: TrainMethod) -> tuple[int, str]:
    """Load the latest checkpoint into the run; returns (step, sha256 of the restored method state) or (0, "")."""
    found = session.latest_checkpoint()
    if found is None:
        return 0, ""
    with found as folder:
        state = load_checkpoint(folder)
    expected = _identity(job)
    for key in ("worker", "method"):
        if state[key] != expected[key]:
            raise CheckpointError(f"checkpoint {folder} is a {state['method']} checkpoint ({state['worker']}), not "
                                  f"{expected['method']} ({expected['worker']})")
    if state["mlflow_run_id"] != expected["mlflow_run_id"]:
        raise CheckpointError(f"checkpoint {folder} belongs to MLflow run {state['mlflow_run_id']}, not "
                              f"{expected['mlflow_run_id']}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method_state"])
    except (RuntimeError, KeyError, ValueError) as err:  # shapes or keys of another model / space / method config
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {folder} does not fit this configuration (model, space or method "
                              f"changed since it was written): {reason[:300]}; use another name") from None
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), state_digest(state["method_state"])


class RaySession:
    """Rank, reports and checkpoints through Ray Train (a worker of a TorchTrainer)."""

    def __init__(self):
        import ray.train

        train = ray.train.get_context()
        self.rank, self.world = train.get_world_rank(), train.get_world_size()

    def report(self, metrics: dict, state_dir: str | None, name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(state_dir) if state_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)

    def latest_checkpoint(self):
        """A context manager yielding the latest checkpoint folder, or None."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else None


class LocalSession:
    """The same in the calling process, for ``num_workers=0`` where Ray Train's API is unavailable (inside a Ray
    Tune trial): checkpoints are folders under ``root`` with the same names, so a rerun resumes the same way."""

    rank, world = 0, 1

    def __init__(self, root: Path):
        self.root = Path(root)
        self.metrics: dict = {}

    def report(self, metrics: dict, state_dir: str | None, name: str) -> None:
        if state_dir:
            # Written under a temporary name, then renamed: a stop signal during the copy leaves no partial
            # checkpoint for a rerun to resume from (a rename within one folder is atomic).
            for stale in self.root.glob(".checkpoint_*.partial"):  # left by an earlier interrupted write
                shutil.rmtree(stale, ignore_errors=True)
            partial = self.root / f".{name}.partial"
            shutil.copytree(state_dir, partial)
            shutil.rmtree(self.root / name, ignore_errors=True)
            partial.rename(self.root / name)
            for old in sorted(self.root.glob("checkpoint_*"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        self.metrics = metrics

    def latest_checkpoint(self):
        found = sorted(self.root.glob("checkpoint_*"))  # checkpoint_final sorts after the numbered ones
        return nullcontext(str(found[-1])) if found else None
