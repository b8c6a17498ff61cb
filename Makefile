# smartbeam: `make demo` runs the main job, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.smartbeam-installed
# Analysis is timed on one BLAS thread; the tests do not need more either.
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export MPLBACKEND ?= Agg

.PHONY: demo test test-fast lint install system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

demo: install
	$(BIN)/smartbeam demo

lint: install
	$(BIN)/ruff check src sim_devices tests benchmarks profile_collection

# The whole suite, slow end-to-end tests included (CI runs exactly this).
test: install system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Quick loop while developing: skips the tests marked slow.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
