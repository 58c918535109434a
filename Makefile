# Two entry points, both doing all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fliqs search output_dir=$(CURDIR)/runs/demo name=demo space=int_fp train.num_workers=2 \
		train.epochs=30 reward.target_fraction=0.35 reward.beta=-0.5
	@echo "Open the MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/demo/mlflow.db --port 5000"

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q --durations=12

# The edit loop: everything but the multi-worker / end-to-end tests (marked slow), in about a minute.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not slow" -x

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_overhead.py
	$(BIN)/python benchmarks/search_overhead.py

clean:
	rm -rf runs .pytest_cache
