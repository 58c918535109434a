"""MLflow: the driver creates the experiment and the run; workers log into that run by id.

Embedded default: MLflow 3's local SQLite store at ``<output_dir>/mlflow.db`` with artifacts in
``<output_dir>/mlartifacts`` (explicit, so runs from other folders do not scatter files). ``tracking.uri`` points
at a server instead. The store is created by the driver before any worker starts: several processes creating
one fresh SQLite store at once corrupt it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fliqs.errors import BadInput
from fliqs.run import schema
from fliqs.run.config import RESUME_FREE_KEYS
from fliqs.run.inputs import check_run_ref
from fliqs.run.options import under

MAX_PARAM_LENGTH = 6000
SERVER_TIMEOUT_S = 10.0


def tracking_uri(uri: str | None, output_dir: str) -> str:
    return uri or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def artifact_location(location: str | None, output_dir: str) -> str:
    return location or (Path(output_dir).resolve() / "mlartifacts").as_uri()


def check_server(uri: str, timeout_s: float = SERVER_TIMEOUT_S) -> None:
    """Fail fast, naming the URI, when an http(s) tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
            if isinstance(getattr(err, "reason", err), ConnectionRefusedError):
                break  # nothing listens on that port: waiting cannot help
        time.sleep(0.5)
    raise BadInput(f"MLflow tracking server {uri} is unreachable ({last})")


def check_store(tracking_uri: str) -> None:
    """BadInput for a missing SQLite store (MLflow would silently create an empty one) or an unreachable server."""
    if tracking_uri.startswith("sqlite:///") and ":memory:" not in tracking_uri:
        db = Path(tracking_uri[len("sqlite:///"):].split("?")[0])
        if not db.exists():  # MLflow would silently create an empty store
            raise BadInput(f"no MLflow store at {db} (tracking URI {tracking_uri})")
    check_server(tracking_uri)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_experiment(uri: str, tracking, output_dir: Path) -> str:
    """Create ``output_dir`` and the experiment ``tracking.experiment`` if needed (explicit artifact location in
    ``output_dir`` for the embedded store, the server's default otherwise); returns the experiment id."""
    output_dir.mkdir(parents=True, exist_ok=True)
    location = tracking.artifact_location if tracking.uri else artifact_location(tracking.artifact_location,
                                                                                 str(output_dir))
    return get_or_create_experiment(uri, tracking.experiment, location)


# What a person reads on an experiment fliqs made: where to look (the review path, `fliqs.analysis.review`).
EXPERIMENT_NOTE = """\
fliqs runs. **Showing traces and tokens? Switch to Model training (top left), then Runs.** The runs table in chart
view compares the runs' metrics (test accuracy, GBOPs, the search's training curves). A search run's Overview shows
its result and format per layer; its Artifacts hold `policy_probs.png` (the policy over training),
`assignment.json`, `result.json` and `model.pt` (`fliqs export RUN --to DIR` takes it out). A study's parent run
(`study-<name>`) shows the per-method table and the Pareto plot; its trials are its child runs.
"""


def get_or_create_experiment(uri: str, name: str, location: str | None = None) -> str:
    """The experiment's id; a new one (or one without a kind) is made a "custom model development" experiment with
    the review path as its description (`EXPERIMENT_NOTE`), so MLflow's UI opens it on its runs, not on GenAI
    pages (`fliqs.analysis.review`)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=location, tags={
            schema.EXPERIMENT_KIND: schema.CUSTOM_MODEL_DEVELOPMENT, schema.NOTE: EXPERIMENT_NOTE})
    if schema.EXPERIMENT_KIND not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, schema.EXPERIMENT_KIND, schema.CUSTOM_MODEL_DEVELOPMENT)
        if schema.NOTE not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, schema.NOTE, EXPERIMENT_NOTE)
    return exp.experiment_id


def find_run(uri: str, experiment_id: str, run_name: str) -> str | None:
    check_run_ref(run_name)  # the name goes into a filter string: only names of the documented set
    runs = client(uri).search_runs([experiment_id], filter_string=f"tags.`{schema.RUN_NAME}` = '{run_name}'",
                                   max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(uri: str, experiment_id: str, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str], parent_run_id: str | None = None,
              allow_changes: bool = False) -> tuple[str, bool]:
    """Create the run (or find the one with this name: a resume, refused when ``params`` differ from the stored
    ones but for the resume-free keys, unless ``allow_changes``). Returns (run id, resumed)."""
    existing = find_run(uri, experiment_id, run_name)
    if existing:
        if params:
            check_resume(uri, existing, run_name, params, allow_changes)
        return existing, True
    all_tags = {schema.RUN_NAME: run_name, schema.MLFLOW_RUN_NAME: run_name, **tags}
    if parent_run_id:
        all_tags[schema.PARENT] = parent_run_id
    run = client(uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
    RunLogger(uri, run.info.run_id).params(params)
    return run.info.run_id, False




def changed_params(stored: Mapping[str, str], params: Mapping[str, Any]) -> list[str]:
    """The keys whose value differs between a run's stored params and ``params`` (as MLflow stores them)."""
    keys = set(stored) | {k for k, v in params.items() if v is not None}
    # The keys a resume may change (`fliqs.run.config.RESUME_FREE_KEYS`): where the run's files and services are, how
    # often it logs, how many retries, a study's grid (a rerun with more seeds or methods adds trials). Everything
    # else changes what is trained.
    return sorted(k for k in keys if not under(k, RESUME_FREE_KEYS)
                  and stored.get(k, "None") != str(params.get(k))[:MAX_PARAM_LENGTH])


def check_resume(uri: str, run_id: str, run_name: str, params: Mapping[str, Any], allow_changes: bool) -> None:
    stored = client(uri).get_run(run_id).data.params
    changed = changed_params(stored, params)
    if not changed:
        return
    diff = ", ".join(f"{k}: {stored.get(k, 'unset')} -> {params.get(k, 'unset')}" for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    if not allow_changes:
        raise BadInput(f"run {run_name!r} exists with another configuration ({diff}{more}); choose another name, "
                       f"or resume it anyway with allow_resume_changes=true")
    client(uri).set_tag(run_id, schema.RESUMED_WITH_CHANGES, diff + more)  # its params stay the first ones


def end_status(err: BaseException) -> str:
    """The MLflow status of a run its code left through ``err``: KILLED for a stop signal, FAILED otherwise."""
    return "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"  # SIGINT and SIGTERM (`fliqs.run.signals`)


def end_run_tree(uri: str, experiment_id: str, run_id: str, status: str) -> None:
    """``run_id`` and every descendant still RUNNING (a study's trials and their candidate or phase runs, whose
    processes were stopped with Ray) end as ``status``."""
    c = client(uri)
    c.set_terminated(run_id, status)
    children = c.search_runs([experiment_id], filter_string=f"tags.`{schema.PARENT}` = '{run_id}' and "
                             f"attributes.status = 'RUNNING'")
    for child in children:
        end_run_tree(uri, experiment_id, child.info.run_id, status)


class RunLogger:
    """Logs into an existing run by id (used on rank 0 inside Ray workers and on the driver)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)

    def params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: Mapping[str, float], step: int, tags: Mapping[str, str] | None = None) -> None:
        """Metrics at ``step`` (and ``tags``, in the same request)."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if items or run_tags:
            self._client.log_batch(self.run_id, metrics=items, tags=run_tags)

    def tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def json_artifact(self, name: str, data: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2))
            self.artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status)
