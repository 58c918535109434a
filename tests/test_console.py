"""What the terminal shows: the progress bar (in a log: a line per quarter), the training loop's lines left to the
bar in its process, and the driver's bars read from MLflow (`fliqs.run.watch`) for a run and for a study."""

from __future__ import annotations

import io
import time

from fliqs.run import schema
from fliqs.run.console import ProgressBar, duration, step_line
from fliqs.run.tracking import RunLogger, client, get_or_create_experiment, start_run
from fliqs.run.watch import parse_progress, watch_run, watch_study


def test_bar_in_a_log_writes_a_line_per_quarter_with_an_eta():
    stream = io.StringIO()
    bar = ProgressBar("demo", "steps", stream=stream)
    for done in range(0, 101, 5):
        bar.update(done, 100, "train_loss 0.1")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("| ")[1].split(" steps")[0] for line in lines] == ["25/100", "50/100", "75/100", "100/100"]
    assert "ETA" in lines[0] and "ETA" not in lines[-1] and lines[-1].endswith("train_loss 0.1")
    assert duration(42) == "42 s" and duration(185) == "3m05s" and duration(3720) == "1h02m"


def test_a_bar_in_this_process_takes_over_the_loops_lines(capfd):
    step_line("step 1/2")
    bar = ProgressBar("x", "steps", stream=io.StringIO())
    step_line("step 2/2")
    bar.close()
    assert capfd.readouterr().out == "[fliqs] step 1/2\n"


def _wait(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_driver_bars_follow_mlflow(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = get_or_create_experiment(uri, "watch", (tmp_path / "art").as_uri())
    run_id, _ = start_run(uri, exp, "search", {}, {})
    RunLogger(uri, run_id).metrics({"train_loss": 0.5}, 5, tags={schema.PROGRESS: "5/20"})
    assert parse_progress("5/20") == (5, 20) and parse_progress(None) is None
    with watch_run(uri, run_id, "search", interval=0.05) as bar:
        assert _wait(lambda: bar.done == 5)
        assert bar.total == 20 and bar.note == "train_loss 0.5"

    parent, _ = start_run(uri, exp, "study", {}, {schema.ROLE: schema.STUDY_ROLE})
    trials = [start_run(uri, exp, f"t{i}", {}, {schema.ROLE: schema.TRIAL}, parent_run_id=parent)[0] for i in range(2)]
    client(uri).set_terminated(trials[0])
    with watch_study(uri, exp, parent, 3, "study", interval=0.05) as bar:
        assert _wait(lambda: bar.done == 1)
        assert bar.total == 3 and bar.note == "1 running"
    out = capfd.readouterr().out  # not a terminal: the final state of each bar, one line each
    assert "5/20 steps" in out and "1/3 trials" in out
