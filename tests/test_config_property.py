"""Property tests over the whole config (issue 15): random values for every numeric key and random strings for every
name-like key never give a traceback, a hang, or a RUNNING MLflow run; the input is refused in one line (exit 2) or
the search completes. Examples are derandomized: CI runs the same ones every time."""

from __future__ import annotations

import dataclasses
import signal
import types
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from fliqs import cli
from fliqs.errors import BadInput
from fliqs.run.config import BOUNDS, LIST_BOUNDS, FliqsConfig
from fliqs.run.loading import load_config
from fliqs.trainables.plan import make_plan


def _numeric_keys(cls=FliqsConfig, prefix="") -> dict[str, type]:
    """Every int / float key of the structured config (Optional ones included), by dotted name."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        base = args[0] if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1 else t
        if dataclasses.is_dataclass(base):
            keys.update(_numeric_keys(base, f"{prefix}{f.name}."))
        elif base in (int, float) and base is not bool:
            keys[f"{prefix}{f.name}"] = base
    return keys


NUMERIC = _numeric_keys()
NAMES = ["name", "study.name", "tracking.experiment", "model.name", "data.name", "space.name", "method",
         "quant.uniform_format", "quant.default_format", "ray_address", "tracking.uri", "data.path"]
# Keys that scale the work a valid run does: pinned small in the end-to-end property (random elsewhere).
WORK = {"train.epochs": 1, "data.batch_size": 64, "multi_trial.trial_epochs": 1, "multi_trial.budget": 1.0,
        "multi_trial.retrain_epochs": 1, "relaxed.retrain_epochs": 1, "train.finetune_epochs": 0,
        "sensitivity.batches": 1, "sensitivity.hutchinson_samples": 2, "sensitivity.pretrain_epochs": 1,
        "sensitivity.qat_epochs": 1, "train.bn_recalibration_batches": 1, "model.input_size": 8,
        "train.num_workers": 0, "data.loader_workers": 0, "train.log_every": 1000, "train.checkpoint_every": 1000,
        "study.max_concurrent_trials": 1}


def test_every_numeric_key_has_its_bounds():
    assert set(NUMERIC) == set(BOUNDS), set(NUMERIC) ^ set(BOUNDS)
    assert set(LIST_BOUNDS) <= {"study.target_fractions", "study.seeds"}


def _number(kind):
    special = st.sampled_from([0, -1, 1, 2**31, 2**40, 1e-12, 0.5, 0.999999])
    if kind is int:
        return st.one_of(special.map(int), st.integers(-10**12, 10**12))
    return st.one_of(special.map(float), st.floats(allow_nan=True, allow_infinity=True),
                     st.floats(-2.0, 2.0))


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)


def _render(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@st.composite
def overrides(draw, pin_work: bool):
    keys = draw(st.lists(st.sampled_from(sorted(NUMERIC)), max_size=6, unique=True))
    out = {k: _render(draw(_number(NUMERIC[k]))) for k in keys}
    for k in draw(st.lists(st.sampled_from(NAMES), max_size=2, unique=True)):
        out[k] = draw(st.one_of(TEXT, st.sampled_from(["fliqs", "uniform", "random", "edmips", "dnas", "hawq",
                                                        "int4", "fp8_e4m3", "digits", "int_fp", "a'b", "../x",
                                                        "sqlite:///x.db", "auto", "h:1"])))
    if pin_work:
        out.update({k: str(v) for k, v in WORK.items()})
        for k in ("tracking.uri", "ray_address", "data.path"):
            out.pop(k, None)
    return [f"{k}={v}" for k, v in out.items()]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                     HealthCheck.function_scoped_fixture])
@given(overrides(pin_work=False))
def test_the_validation_pass_refuses_in_one_line_or_accepts(tmp_path, argv):
    """What `fliqs search` runs before any work (the config, then the plan): BadInput with one line, or a plan;
    never another exception, never a file written."""
    out = tmp_path / "never-written"
    try:
        make_plan(load_config([f"output_dir={out}", *argv]))
    except BadInput as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
    assert not out.exists()


class _Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Hang("the search ran past 30 s")


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                   HealthCheck.function_scoped_fixture])
@given(overrides(pin_work=True))
@pytest.mark.slow
def test_a_search_completes_or_exits_2_and_leaves_no_running_run(tmp_path_factory, capsys, argv):
    out = tmp_path_factory.mktemp("search")
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        rc = cli.run(["search", f"output_dir={out}", *argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert rc in (0, 2)
    err = capsys.readouterr().err
    if rc == 2:  # one line (MLflow's INFO lines aside: in-process, MLflow was imported before the CLI set its level)
        lines = [line for line in err.splitlines() if line.strip() and " INFO mlflow." not in line]
        assert len(lines) == 1 and "Traceback" not in err, err
    store = Path(out) / "mlflow.db"
    if store.exists():
        c = MlflowClient(f"sqlite:///{store}")
        running = [r.info.run_name for e in c.search_experiments() for r in c.search_runs([e.experiment_id])
                   if r.info.status == "RUNNING"]
        assert not running, running
