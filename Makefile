# One-command set-up: `make train` and `make test` create .venv and install the project first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install train test test-fast mutants lint format clean

help:  ## show the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev,deploy]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its dev and deploy (ONNX) tools

train: $(STAMP)  ## train the default (a small Vim on the embedded digits, CPU); extra Hydra args: make train ARGS="..."
	$(PY) src/train.py $(ARGS)

test: $(STAMP)  ## run the test suite (CPU; GPU tests skip without CUDA), two worker processes
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the test suite without the slow learning checks
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

mutants:  ## mutation testing of the files [tool.mutmut] lists (docs/MUTATION.md; not in CI, installs nothing)
	rm -rf mutants
	$(PY) -m mutmut run --max-children 2
	$(PY) tools/mutation_report.py

lint: $(STAMP)  ## ruff check
	$(PY) -m ruff check src kernels tests benchmarks

format: $(STAMP)  ## ruff format + autofix
	$(PY) -m ruff format src kernels tests benchmarks
	$(PY) -m ruff check --fix src kernels tests benchmarks

clean:  ## remove caches, logs and generated data (keeps .venv)
	rm -rf .pytest_cache .ruff_cache logs outputs multirun wandb
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
