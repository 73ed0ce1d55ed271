# The two commands of the README: `make demo` and `make test`.
# Each creates or reuses .venv and installs the project with the pinned versions in constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export PYTHONUNBUFFERED ?= 1

.PHONY: install test lint demo clean

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==26.3
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m kernels.build --compile-check
	OMP_NUM_THREADS=1 $(PY) -m pytest

demo: install
	$(PY) -m pipeline run

clean:
	rm -rf outputs multirun kernels/_build
