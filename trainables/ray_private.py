"""The two places fliqs relies on Ray's private API, each because no public one does the job (Ray 2.60). Nothing
else in fliqs touches ``ray._private`` or a private method; tests/test_ray_private.py fails when Ray changes either.

* `session_logs_dir`: the local session's log folder, printed so that a user finds the workers' output.
* `keeping_our_sigint`: a `TorchTrainer` subclass that keeps fliqs' SIGINT handler. Ray Train's own handler
  (``DataParallelTrainer._register_sigint_handler``) aborts the controller and exits the process with status 1,
  leaving the MLflow run RUNNING and itself installed after the fit (`fliqs.run.signals` ends runs KILLED).
"""

from __future__ import annotations

FALLBACK_LOGS = "/tmp/ray/session_latest/logs"
SIGINT_HOOK = "_register_sigint_handler"  # DataParallelTrainer's method that installs Ray Train's handler


def session_logs_dir() -> str:
    """The log folder of the Ray session this process is connected to (Ray's default folder when unknown)."""
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - only a printed line depends on it
        return FALLBACK_LOGS


def keeping_our_sigint(trainer_class: type) -> type:
    """``trainer_class`` (a Ray Train ``TorchTrainer``) without Ray Train's SIGINT handler."""

    def keep(self, controller) -> None:
        """Keep `fliqs.run.signals`' handler."""

    return type(f"{trainer_class.__name__}KeepingSigint", (trainer_class,), {SIGINT_HOOK: keep})
