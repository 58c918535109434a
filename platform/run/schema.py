"""The MLflow run schema: every tag, role, metric and artifact name that fliqs writes and reads back.

Writers (`fliqs.trainables`) and readers (`fliqs.analysis.fronts`, `fliqs evaluate`) both use these names, so a study's
record cannot drift from what its analysis expects.

A run has a *role*:

* ``search``: one `fliqs search` (a method at one target); its artifacts include ``result.json``.
* ``study``: a study's parent run; its children are its trials.
* ``trial``: one (method, target, seed) of a study: a point of its Pareto analysis.
* ``candidate`` / ``phase``: a training run inside a trial or a search (a multi-trial candidate, a phase of the
  sequential baseline): never a point of its own.

Every run with role ``search`` or ``trial`` has the tags `METHOD`, `FAMILY`, `SEED` and, where the method has a
target, `TARGET_FRACTION` (a fraction of the uniform-int8 cost) and the metric `TARGET` (the resolved target in the
cost unit); uniform runs have the tag `UNIFORM_FORMAT` instead.
"""

from __future__ import annotations

# -- tags ---------------------------------------------------------------------------------------------------------
RUN_NAME = "fliqs.run_name"  # the name a rerun finds its run by (resume)
ROLE = "role"
METHOD = "method"
FAMILY = "family"
SEED = "seed"
TARGET_FRACTION = "target_fraction"
UNIFORM_FORMAT = "uniform_format"
STUDY = "study"
MODEL = "model"
DATASET = "dataset"
SEARCH_SPACE = "search_space"
COST_TARGET = "cost_target"  # human-readable: "0.0124 GBOPs"
ASSIGNMENT_TAG = "assignment"
ARCHITECTURE_TAG = "architecture"
RESUMED_WITH_CHANGES = "fliqs.resumed_with_changes"  # allow_resume_changes=true: what differed (params stay)
MODEL_RUN = "fliqs.model_run"  # the run whose model.pt is this run's result (itself, a candidate, a phase)
PROGRESS = "fliqs.progress"  # "<step>/<total steps>", set by rank 0 at every log (the driver's progress bar)
SCORING_RUN = "fliqs.scoring_run"  # a sensitivity method's run: the phase run whose scores it solved with
RESUME_PREFIX = "fliqs.resume."  # + "<step>.method_state_sha256": what a resume restored
HYPERVOLUME_REFERENCE = "hypervolume_reference"
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"  # a run's or an experiment's description (markdown, shown on its page)
EXPERIMENT_KIND = "mlflow.experimentKind"  # what MLflow 3's UI opens an experiment as
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"  # runs and charts, not the GenAI overview
MLFLOW_RUN_NAME = "mlflow.runName"

# -- roles --------------------------------------------------------------------------------------------------------
SEARCH, STUDY_ROLE, TRIAL, CANDIDATE, PHASE = "search", "study", "trial", "candidate", "phase"
POINT_ROLES = (SEARCH, TRIAL)  # the runs that are points of a Pareto analysis

# -- metrics ------------------------------------------------------------------------------------------------------
TEST_ACCURACY = "test_accuracy"
VALIDATION_ACCURACY = "validation_accuracy"
BATCH_VAL_ACCURACY = "val_accuracy"  # a one-shot search's quality while it trains: validation batches, per log step
TEST_ACCURACY_FINETUNED = "test_accuracy_finetuned"
TEST_ACCURACY_BEFORE_RETRAINING = "test_accuracy_before_retraining"  # a baseline's search result, not retrained
# Before the final re-estimation of the activation ranges and BatchNorm statistics (the name predates the ranges).
TEST_ACCURACY_NO_RECALIBRATION = "test_accuracy_no_bn_recalibration"
# With calibrated (static) activation ranges, the default: the accuracy with each batch's own ranges, as the search
# trained, reported apart from test_accuracy (the deployable model's).
TEST_ACCURACY_DYNAMIC_RANGES = "test_accuracy_dynamic_ranges"
GBOPS = "gbops"
SIZE_MB = "size_mb"
GMACS = "gmacs"
TARGET = "target"
RESUMED_FROM_STEP = "resumed_from_step"
HYPERVOLUME_PREFIX = "hypervolume_"
# Equal-budget accounting of every method run: what it cost, retraining and candidates included.
ACCOUNTING = ("epochs", "train_wall_s", "worker_s", "peak_memory_mb")
# A sensitivity method's scoring is shared by every target of the same config: its part of the accounting (included
# in ACCOUNTING of every run that uses it), the scoring's own wall time, whether this run reused it, the solve time.
SHARED_EPOCHS = "shared_epochs"
SHARED_WORKER_S = "shared_worker_s"
SHARED_TRAIN_WALL_S = "shared_train_wall_s"
SCORING_WALL_S = "scoring_wall_s"
SCORING_REUSED = "scoring_reused"
SOLVE_S = "solve_s"
# A one-shot search's result against its target: the policy's argmax beside the extraction within the budget (an
# alternative assignment's metrics are "<label>_<metric>", e.g. argmax_test_accuracy), whether the extraction fit.
ARGMAX = "argmax"  # the label of the policy's argmax, evaluated beside an extraction within the budget
ARGMAX_COST_RATIO = "argmax_cost_ratio"
EXTRACTED_WITHIN_BUDGET = "extracted_within_budget"
EXTRACTION_CANDIDATES = "extraction_candidates"  # how many assignments within the budget were validated
COST_MULTIPLIER = "cost_multiplier"


def alternative_metric(label: str, metric: str) -> str:
    """The name of ``metric`` of an alternative assignment evaluated beside a run's result."""
    return f"{label}_{metric}"

# -- artifacts ----------------------------------------------------------------------------------------------------
RESULT_FILE = "result.json"
ASSIGNMENT_FILE = "assignment.json"
POLICY_HISTORY_FILE = "policy_history.json"
POLICY_PLOT_FILE = "policy_probs.png"
CANDIDATES_FILE = "candidates.json"
ARCHITECTURE_FILE = "architecture.json"
EXTRACTION_FILE = "extraction.json"  # a one-shot search's validated candidates within the budget
SCORES_FILE = "scores.json"  # a sensitivity phase run: score per decision x candidate
SENSITIVITY_FILE = "sensitivity.json"  # a sensitivity method's run: scores, costs, budget, solution, timings
MODEL_FILE = "model.pt"  # the evaluated model: config, state dict, assignment, metrics (`fliqs evaluate`)
FRONTS_FILE = "fronts.json"
SUMMARY_CSV = "summary.csv"
METHODS_CSV = "methods.csv"  # one row per method: trials, front, hypervolume, best point
PARETO_PLOT = "pareto.png"
RESULT_PLOT = "result.png"  # a search run's result against its target (its description shows it)
STUDY_FILES = (FRONTS_FILE, SUMMARY_CSV, METHODS_CSV, PARETO_PLOT)
