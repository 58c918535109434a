"""Ray's private API that fliqs relies on (`fliqs.trainables.ray_private`) is still there: these fail when a Ray
upgrade renames or removes it, before a user meets a run that hangs on Ctrl-C or prints no log folder."""

from __future__ import annotations

import inspect
from pathlib import Path

import ray
from ray.train.torch import TorchTrainer

from fliqs.trainables.ray_private import SIGINT_HOOK, keeping_our_sigint, session_logs_dir


def test_ray_train_still_registers_its_sigint_handler_through_the_hook():
    hook = getattr(TorchTrainer, SIGINT_HOOK)
    assert list(inspect.signature(hook).parameters) == ["self", "controller"]
    fit_source = inspect.getsource(inspect.getmro(TorchTrainer)[1])  # DataParallelTrainer, which fit() lives in
    assert f"self.{SIGINT_HOOK}(controller)" in fit_source


def test_the_subclass_drops_ray_trains_handler():
    trainer = keeping_our_sigint(TorchTrainer)
    assert issubclass(trainer, TorchTrainer)
    assert getattr(trainer, SIGINT_HOOK) is not getattr(TorchTrainer, SIGINT_HOOK)
    assert getattr(trainer, SIGINT_HOOK)(object(), None) is None


def test_the_session_log_folder_is_found_through_the_private_node():
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        logs = Path(session_logs_dir())
        assert logs.name == "logs" and logs.parent.name.startswith("session_") and logs.is_dir()
    finally:
        ray.shutdown()
