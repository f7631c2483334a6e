# Every target sets up .venv itself when it is missing (torch's CPU build first, then pyradiomics,
# which must be built without isolation, then the project in editable mode).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1

.PHONY: demo evidence test test-fast bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q numpy versioneer wheel setuptools
	$(BIN)/pip install -q --no-build-isolation "pyradiomics>=3.0.1"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/osteo-sim

# The benchmark the README's results come from (configs/experiment/evidence.yaml); EXPERIMENT=evidence_quick for a
# few-minute check of the pipeline. JOBS: processes that prepare the scenarios x seeds, then train the methods
# on each (0 = one per CPU).
EXPERIMENT ?= evidence
JOBS ?= 0
evidence: $(STAMP)
	$(BIN)/python -m osteofl.simulation.evidence --experiment $(EXPERIMENT) --jobs $(JOBS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf outputs .pytest_cache
