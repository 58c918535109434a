"""`RunResult`: what one run of any method delivers, the same type for every method.

A training run's final report (`fliqs.trainables.loop`) becomes a `RunResult` in `fliqs.trainables.fit.fit`; a
method's runner may combine several (a multi-trial search's candidates and retraining, the sensitivity method's
phases) and add what is its own to ``extras``. Drivers log a result without knowing its method: `metrics` for MLflow,
`summary` for ``result.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from fliqs.run import schema

# The report's keys that are fields of a RunResult; everything else a method reports goes to ``extras``.
CORE = (schema.TEST_ACCURACY, schema.VALIDATION_ACCURACY, schema.GBOPS, schema.SIZE_MB, schema.GMACS, schema.TARGET)
SUMMARY_NAMES = {schema.TEST_ACCURACY: "accuracy", schema.TEST_ACCURACY_FINETUNED: "accuracy_finetuned",
                 schema.TEST_ACCURACY_BEFORE_RETRAINING: "accuracy_before_retraining"}


@dataclass(frozen=True)
class RunResult:
    """One method run's result at one target: the evaluated network's figures, its assignment, the whole
    accounting, the run whose ``model.pt`` it is, and the method's own extras (numbers are logged as metrics, text
    goes in ``result.json`` and the run's tags)."""

    test_accuracy: float
    validation_accuracy: float
    gbops: float
    size_mb: float
    gmacs: float
    target: float
    steps: int
    assignment: dict[str, dict[str, str]]
    decisions: list[dict]
    accounting: dict[str, float]  # `schema.ACCOUNTING`: epochs, train_wall_s, worker_s, peak_memory_mb
    model_run_id: str | None = None  # the MLflow run holding the model (None: the run it was reported to)
    extras: dict[str, float | str] = field(default_factory=dict)

    @classmethod
    def from_report(cls, report: dict, model_run_id: str | None = None) -> RunResult:
        """The result of a training run's final report."""
        known = {*CORE, *schema.ACCOUNTING, "steps", "assignment", "decisions"}
        return cls(*(float(report[k]) for k in CORE), steps=int(report["steps"]),
                   assignment=json.loads(report["assignment"]), decisions=json.loads(report["decisions"]),
                   accounting={k: float(report[k]) for k in schema.ACCOUNTING}, model_run_id=model_run_id,
                   extras={k: v for k, v in report.items() if k not in known and isinstance(v, int | float | str)})

    def with_extras(self, **extras: float | str) -> RunResult:
        return replace(self, extras={**self.extras, **extras})

    def with_accounting(self, accounting: dict[str, float]) -> RunResult:
        return replace(self, accounting=dict(accounting))

    def metrics(self) -> dict[str, float]:
        """Every number of the result, as the method run's MLflow metrics."""
        core = dict(zip(CORE, (self.test_accuracy, self.validation_accuracy, self.gbops, self.size_mb, self.gmacs,
                               self.target), strict=True))
        numbers = {k: float(v) for k, v in self.extras.items() if isinstance(v, int | float)}
        return {**core, **self.accounting, **numbers}

    def text(self) -> dict[str, str]:
        """The method's text extras (an extracted architecture)."""
        return {k: v for k, v in self.extras.items() if isinstance(v, str) and not _is_json(v)}

    def summary(self) -> dict:
        """``result.json``'s part that comes from the result (the driver adds where and how it ran)."""
        extras = {SUMMARY_NAMES.get(k, k): v for k, v in self.extras.items() if not _is_json(v)}
        return {"accuracy": self.test_accuracy, "accuracy_finetuned": None, "accuracy_before_retraining": None,
                **extras, "validation_accuracy": self.validation_accuracy, "gbops": self.gbops,
                "size_mb": self.size_mb, "gmacs": self.gmacs, "assignment": self.assignment,
                "decisions": self.decisions, **self.accounting, "steps": self.steps}


def _is_json(value) -> bool:
    """A method's structured extra (scores as JSON text): kept in its artifacts, not in the summary or tags."""
    return isinstance(value, str) and value[:1] in "[{"


def add_accounting(totals: dict, accounting: dict[str, float]) -> dict:
    """Sum the equal-budget accounting of the runs a method made (peak memory: the largest)."""
    for k in schema.ACCOUNTING:
        totals[k] = max(totals.get(k, 0.0), accounting[k]) if k == "peak_memory_mb" else \
            totals.get(k, 0.0) + accounting[k]
    return totals


def total_accounting(*results: RunResult | dict) -> dict[str, float]:
    """The accounting of several runs together (results, or accounting dicts)."""
    totals: dict = {}
    for r in results:
        add_accounting(totals, r.accounting if isinstance(r, RunResult) else r)
    return totals
