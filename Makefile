# Two entry points, both doing all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo study-mini test test-fast lint bench clean screenshots

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# setuptools notes every editable install made with a meta path finder (the fliqs -> platform/ mapping needs
	@# one) as a warning; it is information only.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fliqs search output_dir=$(CURDIR)/runs/demo name=demo space=int_fp train.num_workers=2 \
		train.epochs=30 reward.target_fraction=0.35 reward.beta=-0.5

# A study of a few minutes (conf/study/mini.yaml): the store the README's review section and `make screenshots` use.
study-mini: $(STAMP)
	rm -rf runs/study-mini
	$(BIN)/fliqs study study=mini output_dir=$(CURDIR)/runs/study-mini

lint: $(STAMP)
	$(BIN)/ruff check .

# The tests run torch's tiny tensors from many processes at once (two pytest processes, Ray workers, subprocesses):
# libgomp's default spin-wait after each parallel region then burns the cores the other processes need
# (benchmarks/RESULTS.md, issue 11). Every process of the suite inherits this.
test test-fast: export OMP_WAIT_POLICY := PASSIVE

# Two pytest processes, a test module at a time each (module fixtures such as the Ray session stay one per module):
# one module's idle waits (process starts, polls) overlap the other's work (benchmarks/RESULTS.md, issue 11, has the
# schedules tried).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=12

# The edit loop: everything but the multi-worker / end-to-end tests (marked slow).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 2 --dist loadfile -m "not slow" -x

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_overhead.py
	$(BIN)/python benchmarks/search_overhead.py

# The MLflow review path in headless Chromium (apt-get install -y chromium; not part of CI): PNGs of a finished
# `make demo` store and, when present, of runs/study-mini (see tools/review_screenshots.py).
screenshots: $(STAMP)
	$(BIN)/python tools/review_screenshots.py --search-store runs/demo \
		$$(test -f runs/study-mini/mlflow.db && echo --study-store runs/study-mini) --out review-screenshots

clean:
	rm -rf runs .pytest_cache
