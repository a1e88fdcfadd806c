# Activation Guard: set-up, tests and the sidecar, each installing what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: install test lint typecheck unit protos run bench clean

# The virtual environment is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

## make test: set up, lint, type-check and run the whole test suite.
test: lint typecheck unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest

## make protos: regenerate guard/v1/*_pb2*.py(i) from protos/guard/v1/guard.proto.
protos: $(STAMP)
	$(PY) protos/generate.py

## make run: start the sidecar on the embedded default configuration.
run: $(STAMP)
	$(VENV)/bin/guard serve

## make bench: the benchmarks in bench/ (installs the CPU torch wheel for references).
bench: $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) bench/transport.py
	$(PY) bench/sae_encode.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
